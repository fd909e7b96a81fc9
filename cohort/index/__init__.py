"""Archive index: header-only reads of every DICOM file into a Parquet table.

:func:`update_index` keeps an incremental, partitioned index of an archive;
:func:`index_files` indexes given files once.
"""

from cohort.index.codecs import CodecStatus, can_decode, codec_table, decodable_transfer_syntaxes
from cohort.index.crawl import (
    concat_index,
    index_files,
    is_dicom_file,
    iter_chunks,
    list_archive,
    read_index_row,
)
from cohort.index.incremental import (
    ChangeKind,
    IndexLayout,
    IndexUpdate,
    IndexUpdateError,
    UpdatePlan,
    commit_update,
    partition_of,
    plan_update,
    read_changes,
    read_instances,
    read_plan,
    read_quarantine,
    read_runs,
    update_index,
)
from cohort.index.read import ReadResult, read_entries
from cohort.index.schema import CHANGE_SCHEMA, INSTANCE_SCHEMA, QUARANTINE_SCHEMA, RUN_SCHEMA
from cohort.index.source import ArchiveSource, EntryKind, FileEntry, FsspecArchive, LocalArchive, open_archive

__all__ = [
    "CHANGE_SCHEMA",
    "INSTANCE_SCHEMA",
    "QUARANTINE_SCHEMA",
    "RUN_SCHEMA",
    "ArchiveSource",
    "ChangeKind",
    "CodecStatus",
    "EntryKind",
    "FileEntry",
    "FsspecArchive",
    "IndexLayout",
    "IndexUpdate",
    "IndexUpdateError",
    "LocalArchive",
    "ReadResult",
    "UpdatePlan",
    "can_decode",
    "codec_table",
    "commit_update",
    "concat_index",
    "decodable_transfer_syntaxes",
    "index_files",
    "is_dicom_file",
    "iter_chunks",
    "list_archive",
    "open_archive",
    "partition_of",
    "plan_update",
    "read_changes",
    "read_entries",
    "read_index_row",
    "read_instances",
    "read_plan",
    "read_quarantine",
    "read_runs",
    "update_index",
]
