"""Atomic Parquet writes and key reads.

A part file is written under a hidden temporary name in its final folder and
renamed into place, so a reader never sees a half-written file (pyarrow and
pandas skip names starting with ``.``). Part names are derived from the keys of
the rows they hold, so a retried shard replaces its own file instead of adding
a second copy.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cohort.errors import StoreError


def part_name(keys: Iterable[str]) -> str:
    """Deterministic part file name for a set of row keys."""
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
    return f"part-{digest[:20]}.parquet"


def write_table_atomic(table: pa.Table, path: Path) -> Path:
    """Write ``table`` to ``path`` so that readers see all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {exc}", subject=str(path)) from exc
    return path


def write_part(table: pa.Table, folder: Path, keys: Sequence[str]) -> Path | None:
    """Write one part of a table into ``folder``; nothing is written for no rows."""
    if table.num_rows == 0:
        return None
    return write_table_atomic(table, folder / part_name(keys))


def read_table(folder: Path, columns: Sequence[str] | None = None) -> pa.Table | None:
    """Read a Parquet dataset folder (or file); None when it does not exist yet."""
    if not folder.exists():
        return None
    dataset = ds.dataset(str(folder), format="parquet", exclude_invalid_files=False)
    if not dataset.files:
        return None
    return dataset.to_table(columns=list(columns) if columns else None)
