"""Fixed Arrow schemas of the index tables."""

from __future__ import annotations

import hashlib

import pyarrow as pa

_f64 = pa.float64()
_str = pa.string()
_i32 = pa.int32()
_time = pa.timestamp("us", tz="UTC")

#: One row per DICOM instance. ``path`` is relative to the archive root in an
#: incremental index (:mod:`cohort.index.incremental`) and as given to
#: :func:`cohort.index.crawl.index_files` otherwise.
INSTANCE_SCHEMA = pa.schema(
    [
        # the file
        ("path", _str),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("sha256", _str),
        ("part10", pa.bool_()),  # False: a raw dataset without preamble and file meta, read with force
        ("transfer_syntax_uid", _str),
        ("sop_class_uid", _str),
        ("sop_instance_uid", _str),
        # patient, study, series
        ("patient_id", _str),
        ("patient_sex", _str),
        ("patient_age", _str),
        ("study_uid", _str),
        ("study_date", _str),
        ("study_time", _str),
        ("study_description", _str),
        ("series_uid", _str),
        ("series_number", _i32),
        ("series_date", _str),
        ("series_time", _str),
        ("series_description", _str),
        ("frame_of_reference_uid", _str),
        ("modality", _str),
        ("body_part_examined", _str),
        ("patient_position", _str),
        # the instance within its series
        ("image_type", pa.list_(_str)),
        ("acquisition_number", _i32),
        ("acquisition_date", _str),
        ("acquisition_time", _str),
        ("content_date", _str),
        ("instance_number", _i32),
        ("temporal_position_identifier", _i32),
        ("number_of_frames", _i32),
        # equipment
        ("institution", _str),
        ("station_name", _str),
        ("manufacturer", _str),
        ("manufacturer_model", _str),
        ("device_serial_number", _str),
        ("software_versions", _str),
        # acquisition and reconstruction
        ("convolution_kernel", _str),
        ("kvp", _f64),
        ("exposure", _f64),
        ("exposure_time", _f64),
        ("tube_current", _f64),
        ("contrast_agent", _str),
        ("slice_thickness", _f64),
        ("spacing_between_slices", _f64),
        ("reconstruction_diameter", _f64),
        # geometry and pixels
        ("pixel_spacing_row", _f64),
        ("pixel_spacing_col", _f64),
        ("rows", _i32),
        ("columns", _i32),
        ("samples_per_pixel", _i32),
        ("photometric_interpretation", _str),
        ("bits_allocated", _i32),
        ("bits_stored", _i32),
        ("pixel_representation", _i32),
        ("image_position", pa.list_(_f64)),
        ("image_orientation", pa.list_(_f64)),
        ("rescale_slope", _f64),
        ("rescale_intercept", _f64),
        ("has_pixel_data", pa.bool_()),
        ("pixel_decodable", pa.bool_()),  # null without pixel data; see cohort.index.codecs
        # structure sets and segmentations
        ("referenced_series_uids", pa.list_(_str)),
        ("roi_names", pa.list_(_str)),
        # keywords of elements present but malformed (their columns are null)
        ("invalid_tags", pa.list_(_str)),
    ]
)

#: One row per file that could not be indexed, with the reason.
QUARANTINE_SCHEMA = pa.schema(
    [("path", _str), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("reason", _str)]
)

#: One row per file added, changed or deleted by an incremental update.
CHANGE_SCHEMA = pa.schema(
    [
        ("run_id", _str),
        ("run_at", _time),
        ("path", _str),
        ("kind", _str),  # ChangeKind: added | changed | deleted
        ("status", _str),  # indexed | quarantined (after the change); null when deleted
        ("content_changed", pa.bool_()),  # changed only: whether the sha256 differs (null if unknown)
    ]
)

#: One row per incremental update run.
RUN_SCHEMA = pa.schema(
    [
        ("run_id", _str),
        ("started_at", _time),
        ("finished_at", _time),
        ("archive", _str),
        ("rebuild", pa.bool_()),
        ("listed", pa.int64()),
        ("added", pa.int64()),
        ("changed", pa.int64()),
        ("content_changed", pa.int64()),
        ("deleted", pa.int64()),
        ("unchanged", pa.int64()),
        ("instances", pa.int64()),
        ("quarantined", pa.int64()),
        ("files_read", pa.int64()),
        ("bytes_read", pa.int64()),
        ("partitions_written", pa.int64()),
        ("workers", pa.int64()),
        ("seconds", _f64),
    ]
)


def schema_fingerprint(*schemas: pa.Schema, extra: str = "") -> str:
    """Short stable digest of schemas (and a reader version): a change forces a re-index."""
    text = "\n".join(s.to_string(show_schema_metadata=False) for s in schemas) + extra
    return hashlib.sha256(text.encode()).hexdigest()[:16]
