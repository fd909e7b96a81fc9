"""Archive index: header-only reads of every DICOM file into a Parquet table."""

from cohort.index.crawl import index_files, is_dicom_file, list_archive, read_index_row
from cohort.index.schema import INSTANCE_SCHEMA, QUARANTINE_SCHEMA

__all__ = [
    "INSTANCE_SCHEMA",
    "QUARANTINE_SCHEMA",
    "index_files",
    "is_dicom_file",
    "list_archive",
    "read_index_row",
]
