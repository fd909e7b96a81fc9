"""Read archive files into index rows or quarantine rows; the shard worker of the index.

A file is read once: its bytes are hashed (sha256) and its header parsed from
the same buffer. Files larger than :data:`WHOLE_READ_LIMIT` are hashed in
chunks and their header parsed from the first :data:`HEAD_BYTES`. Files are
recognised by content (the ``DICM`` marker, or a data set starting at byte 0),
never by name. No input file raises: each becomes an instance row or a
quarantine row with the reason.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa

from cohort.errors import DicomReadError
from cohort.index.header import (
    NeedWholeFile,
    header_columns,
    is_raw_dataset_start,
    read_with_pydicom,
    row_from_header,
)
from cohort.index.schema import INSTANCE_SCHEMA, QUARANTINE_SCHEMA
from cohort.index.source import ArchiveSource, EntryKind, FileEntry

#: Files up to this size are read into memory in one call.
WHOLE_READ_LIMIT = 8 << 20
#: For larger files, the header is parsed from this many leading bytes (pydicom reads it otherwise).
HEAD_BYTES = 1 << 20
_HASH_CHUNK = 8 << 20
#: Files asked of the kernel ahead of the one being read (where the source can prefetch).
PREFETCH_FILES = 8

_ENTRY_REASONS = {
    EntryKind.SYMLINK: "symbolic link, not followed",
    EntryKind.OTHER: "not a regular file (fifo, socket or device)",
    EntryKind.UNLISTABLE: "folder cannot be listed; the files in it are not indexed",
}


@dataclass(frozen=True)
class FileRead:
    """The outcome of reading one file: a row for the index or for the quarantine."""

    row: dict[str, Any]
    quarantined: bool
    bytes_read: int
    reader: str  # "fast", "pydicom" or "" (not parsed)


@dataclass(frozen=True)
class ReadResult:
    """Rows of one batch of files (the output of a shard), with what reading them cost."""

    instances: pa.Table
    quarantine: pa.Table
    files_read: int
    bytes_read: int
    fast_path: int
    pydicom_path: int
    seconds: float


def _sniff(head: bytes, size: int, path: str) -> bool:
    """True for Part 10 (preamble + DICM), False for a raw data set; raises for anything else."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if is_raw_dataset_start(head[:8], size):
        return False
    raise DicomReadError("not DICOM: no DICM marker at byte 128 and no data set at byte 0", subject=path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_instance(handle: BinaryIO, *, path: str, size: int, mtime_ns: int) -> FileRead:
    """Hash and parse one opened file. Raises :class:`DicomReadError` with the reason to quarantine."""
    if size == 0:
        raise DicomReadError("empty file (0 bytes)", subject=path)
    digest = hashlib.sha256()
    if size <= WHOLE_READ_LIMIT:
        data = handle.read()
        size = len(data)  # what was hashed, should the file have changed since it was listed
        if size == 0:
            raise DicomReadError("empty file (0 bytes)", subject=path)
        part10 = _sniff(data, size, path)
        sha256 = _sha256(data)
        columns, reader = header_columns(data, size=size, part10=part10, path=path)
        row = {"path": path, "size": size, "mtime_ns": mtime_ns, "sha256": sha256, **columns}
        return FileRead(row, False, size, reader)
    else:
        head = handle.read(HEAD_BYTES)
        part10 = _sniff(head, size, path)
        digest.update(head)
        size = len(head)
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        try:
            columns, reader = header_columns(head, size=size, part10=part10, path=path)
        except NeedWholeFile:
            handle.seek(0)
            header = read_with_pydicom(handle, size, part10=part10, path=path)
            columns, reader = row_from_header(header, path=path), header.reader
    row = {"path": path, "size": size, "mtime_ns": mtime_ns, "sha256": digest.hexdigest(), **columns}
    return FileRead(row, False, size, reader)


def quarantine_row(path: str, size: int, mtime_ns: int, reason: str) -> dict[str, Any]:
    return {"path": path, "size": size, "mtime_ns": mtime_ns, "reason": reason}


def read_entry(source: ArchiveSource, entry: FileEntry) -> FileRead:
    """One listed entry into a row; never raises."""
    if entry.kind is not EntryKind.FILE:
        reason = _ENTRY_REASONS[entry.kind]
        return FileRead(quarantine_row(entry.path, entry.size, entry.mtime_ns, reason), True, 0, "")
    try:
        handle, opened = source.open(entry)
    except FileNotFoundError:
        reason = "file disappeared during the crawl"
        return FileRead(quarantine_row(entry.path, entry.size, entry.mtime_ns, reason), True, 0, "")
    except OSError as exc:
        reason = f"cannot open: {exc.strerror or exc}"
        return FileRead(quarantine_row(entry.path, entry.size, entry.mtime_ns, reason), True, 0, "")
    with handle:
        try:
            return read_instance(handle, path=entry.path, size=opened.size, mtime_ns=opened.mtime_ns)
        except DicomReadError as exc:
            reason = exc.reason
        except OSError as exc:
            reason = f"read error: {exc.strerror or exc}"
        except Exception as exc:  # a file must never stop the crawl: the failure is recorded
            reason = f"unexpected error while reading: {type(exc).__name__}: {exc}"
    return FileRead(quarantine_row(entry.path, opened.size, opened.mtime_ns, reason), True, opened.size, "")


def read_entries(source: ArchiveSource, entries: Iterable[FileEntry]) -> ReadResult:
    """Read a batch of entries: the shard worker (output schemas INSTANCE_SCHEMA, QUARANTINE_SCHEMA)."""
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    files = size = fast = slow = 0
    batch = list(entries)
    prefetch = getattr(source, "prefetch", None)  # optional: local archives read ahead
    if prefetch is not None:
        for ahead in batch[:PREFETCH_FILES]:
            prefetch(ahead)
    for i, entry in enumerate(batch):
        if prefetch is not None and i + PREFETCH_FILES < len(batch):
            prefetch(batch[i + PREFETCH_FILES])
        outcome = read_entry(source, entry)
        (quarantined if outcome.quarantined else rows).append(outcome.row)
        if outcome.bytes_read:
            files += 1
            size += outcome.bytes_read
        fast += outcome.reader == "fast"
        slow += outcome.reader == "pydicom"
    return ReadResult(
        pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA),
        pa.Table.from_pylist(quarantined, schema=QUARANTINE_SCHEMA),
        files,
        size,
        fast,
        slow,
        time.perf_counter() - t0,
    )
