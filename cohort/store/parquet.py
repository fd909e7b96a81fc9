"""Atomic Parquet writes and reads, on a local folder or an object store.

Locally a part file is written under a hidden temporary name in its final folder
and renamed into place, so a reader never sees a half-written file (pyarrow and
pandas skip names starting with ``.``). On an object store one PUT is atomic
already. Part names are derived from the keys of the rows they hold, so a
retried shard replaces its own file instead of adding a second copy.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cohort.errors import StoreError
from cohort.store.location import Location

PathLike = str | os.PathLike[str] | Location


def part_name(keys: Iterable[str]) -> str:
    """Deterministic part file name for a set of row keys."""
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
    return f"part-{digest[:20]}.parquet"


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_table_atomic(table: pa.Table, path: PathLike) -> Location:
    """Write ``table`` to ``path`` so that readers see all of it or nothing."""
    where = Location.parse(path)
    if not where.is_local:
        try:
            where.write_bytes_atomic(parquet_bytes(table))
        except OSError as exc:
            raise StoreError(f"cannot write {where}: {exc}", subject=where.url) from exc
        return where
    local = where.local_path()
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.parent / f".{local.name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, local)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {local}: {exc}", subject=str(local)) from exc
    return where


def write_part(table: pa.Table, folder: PathLike, keys: Sequence[str]) -> Location | None:
    """Write one part of a table into ``folder``; nothing is written for no rows."""
    if table.num_rows == 0:
        return None
    return write_table_atomic(table, Location.parse(folder) / part_name(keys))


def read_table(folder: PathLike, columns: Sequence[str] | None = None) -> pa.Table | None:
    """Read a Parquet dataset folder (or file); None when it does not exist yet."""
    where = Location.parse(folder)
    if not where.exists():
        return None
    dataset = ds.dataset(where.path, filesystem=where.fs, format="parquet", exclude_invalid_files=False)
    if not dataset.files:
        return None
    return dataset.to_table(columns=list(columns) if columns else None)
