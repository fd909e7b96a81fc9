"""Fixed Arrow schemas of the index tables."""

from __future__ import annotations

import pyarrow as pa

_f64 = pa.float64()
_str = pa.string()

#: One row per DICOM instance.
INSTANCE_SCHEMA = pa.schema(
    [
        ("path", _str),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("sha256", _str),
        ("transfer_syntax_uid", _str),
        ("sop_class_uid", _str),
        ("sop_instance_uid", _str),
        ("patient_id", _str),
        ("study_uid", _str),
        ("series_uid", _str),
        ("frame_of_reference_uid", _str),
        ("modality", _str),
        ("series_description", _str),
        ("study_date", _str),
        ("institution", _str),
        ("manufacturer", _str),
        ("manufacturer_model", _str),
        ("convolution_kernel", _str),
        ("kvp", _f64),
        ("exposure", _f64),
        ("tube_current", _f64),
        ("contrast_agent", _str),
        ("slice_thickness", _f64),
        ("pixel_spacing_row", _f64),
        ("pixel_spacing_col", _f64),
        ("rows", pa.int32()),
        ("columns", pa.int32()),
        ("instance_number", pa.int32()),
        ("image_position", pa.list_(_f64)),
        ("image_orientation", pa.list_(_f64)),
        ("rescale_slope", _f64),
        ("rescale_intercept", _f64),
        ("referenced_series_uids", pa.list_(_str)),
        ("roi_names", pa.list_(_str)),
    ]
)

#: One row per file that could not be indexed, with the reason.
QUARANTINE_SCHEMA = pa.schema([("path", _str), ("size", pa.int64()), ("reason", _str)])
