"""One-shot crawl of local files into (instances, quarantine) tables, with absolute paths.

The incremental index (:func:`cohort.index.incremental.update_index`) is the
way to index an archive that is crawled more than once; these functions read
given files every time, with the same reader (:mod:`cohort.index.read`).
Symbolic links are not listed by :func:`list_archive`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from cohort.errors import DicomReadError
from cohort.index.read import read_entry, read_instance
from cohort.index.schema import INSTANCE_SCHEMA, QUARANTINE_SCHEMA
from cohort.index.source import EntryKind, FileEntry, LocalArchive


def list_archive(root: str | Path) -> list[str]:
    """Every regular file under ``root`` (absolute paths, sorted); symbolic links are skipped."""
    archive = LocalArchive(Path(root).absolute())
    return sorted(archive.absolute(e.path) for e in archive.walk() if e.kind is EntryKind.FILE)


def is_dicom_file(path: str) -> bool:
    """True when the file has the DICOM Part 10 preamble and ``DICM`` marker."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_index_row(path: str) -> dict[str, Any]:
    """Read (hash and parse) one file into an index row whose ``path`` is ``path``.

    Raises :class:`DicomReadError` naming the file when it is not an indexable
    DICOM instance; the reason says why.
    """
    try:
        with open(path, "rb", buffering=0) as fh:
            st = os.fstat(fh.fileno())
            return read_instance(fh, path=path, size=st.st_size, mtime_ns=st.st_mtime_ns).row
    except OSError as exc:
        raise DicomReadError(f"cannot read: {exc.strerror or exc}", subject=path) from exc


def index_files(paths: Sequence[str] | Iterable[str]) -> tuple[pa.Table, pa.Table]:
    """Index ``paths``: (instances table, quarantine table), both with fixed schemas."""
    rows: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    for path in paths:
        absolute = os.path.abspath(path)
        archive = LocalArchive(Path(os.path.dirname(absolute)))
        name = os.path.basename(absolute)
        try:
            st = os.lstat(absolute)
            kind = (
                EntryKind.FILE
                if stat.S_ISREG(st.st_mode)
                else EntryKind.SYMLINK
                if stat.S_ISLNK(st.st_mode)
                else EntryKind.OTHER
            )
            entry = FileEntry(name, st.st_size, st.st_mtime_ns, kind)
        except OSError:
            entry = FileEntry(name, -1, 0)
        outcome = read_entry(archive, entry)
        row = {**outcome.row, "path": path}
        (quarantined if outcome.quarantined else rows).append(row)
    return (
        pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA),
        pa.Table.from_pylist(quarantined, schema=QUARANTINE_SCHEMA),
    )


def concat_index(
    instance_parts: Iterable[pa.Table], quarantine_parts: Iterable[pa.Table]
) -> tuple[pa.Table, pa.Table]:
    """Join chunk results into the (instances, quarantine) tables, sorted by path.

    No chunk at all still gives two empty tables with the fixed schemas.
    """
    instances = pa.concat_tables([pa.Table.from_pylist([], schema=INSTANCE_SCHEMA), *instance_parts])
    quarantine = pa.concat_tables([pa.Table.from_pylist([], schema=QUARANTINE_SCHEMA), *quarantine_parts])
    return instances.sort_by("path"), quarantine.sort_by("path")


def iter_chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
