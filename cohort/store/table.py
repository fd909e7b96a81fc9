"""One logical table of the store, safe under retries, crashes and concurrent writers.

Layout of a table named ``T`` in folder ``F``::

    F/T -> .T.versions/v000002        a symbolic link: what readers open
    F/.T.versions/v000002/part-*.parquet
    F/.T.versions/v000002.keys/part-*.parquet   the key columns of each part (cheap look-ups)
    F/.T.versions/v000001/...         the previous version, kept for readers in flight
    F/.T.lock                         writers and compaction hold it exclusively

Guarantees for anyone reading ``F/T`` (``pandas.read_parquet``, pyarrow, DuckDB,
polars, Dask):

* **no partial files**: a part is written under a hidden name and renamed into
  place; readers skip hidden names;
* **no duplicates**: an append holds the table lock, re-reads the keys present
  and writes only rows whose key is new — so retries, re-runs and two runs at
  once add each key once;
* **compaction is atomic**: the compacted table is written as a new version and
  the link is swapped with one rename; a reader sees the old version or the new
  one, never both. The previous version is deleted at the next compaction.

The lock is ``fcntl.flock`` on a local or NFSv4 file system. Object stores have
no rename or lock; tables there are :class:`cohort.store.objects.ObjectTable`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cohort.errors import StoreError
from cohort.store.parquet import part_name, write_table_atomic

#: A run compacts a table it appended to once it holds more parts than this.
COMPACT_AFTER_PARTS = 16
#: Temporary files older than this (seconds) are leftovers of crashed writers.
STALE_TMP_SECONDS = 3600.0


@dataclass(frozen=True)
class AppendResult:
    written: int
    skipped_existing: int
    path: str | None
    replaced: int = 0


@dataclass(frozen=True)
class CompactResult:
    parts_before: int
    parts_after: int
    rows: int
    duplicates_removed: int
    stale_files_removed: int


def key_tuples(table: pa.Table, key_columns: Sequence[str]) -> list[tuple[str, ...]]:
    columns = [table.column(c).cast(pa.string()).fill_null("").to_pylist() for c in key_columns]
    return list(zip(*columns, strict=True))


def present_columns(table: pa.Table | pa.Schema, columns: Sequence[str]) -> list[str]:
    names = table.names if isinstance(table, pa.Schema) else table.column_names
    return [c for c in columns if c in names]


def key_versions(
    table: pa.Table, key_columns: Sequence[str], version_columns: Sequence[str]
) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Key -> the values of its version columns (input content hashes): what decides "changed"."""
    versions = key_tuples(table, present_columns(table, version_columns)) if version_columns else None
    keys = key_tuples(table, key_columns)
    if not versions or not versions[0]:
        return {k: () for k in keys}
    return dict(zip(keys, versions, strict=True))


def merge_part_keys(
    by_part: Mapping[Any, Mapping[tuple[str, ...], tuple[str, ...]]],
) -> dict[tuple[str, ...], tuple[str, ...]]:
    """One key -> versions mapping over all parts."""
    return {key: version for keys in by_part.values() for key, version in keys.items()}


def classify(
    incoming: pa.Table,
    key_columns: Sequence[str],
    version_columns: Sequence[str],
    present: dict[tuple[str, ...], tuple[str, ...]],
) -> tuple[list[bool], set[tuple[str, ...]]]:
    """Which incoming rows to write (new keys, and keys whose inputs changed) and which keys they replace.

    A stored row whose version columns are unknown (written before they were kept)
    counts as unchanged.
    """
    incoming_versions = key_versions(incoming, key_columns, version_columns)
    write, replaced = [], set()
    for key, version in incoming_versions.items():
        stored = present.get(key)
        if stored is None:
            write.append(True)
        elif stored and version and stored != version:
            write.append(True)
            replaced.add(key)
        else:
            write.append(False)
    return write, replaced


def key_strings(table: pa.Table, key_columns: Sequence[str]) -> list[str]:
    return ["\x1f".join(key) for key in key_tuples(table, key_columns)]


class TableDir:
    """A versioned Parquet table folder (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.versions = self.path.parent / f".{self.path.name}.versions"
        self.lock_path = self.path.parent / f".{self.path.name}.lock"

    # -- layout -----------------------------------------------------------------
    @property
    def url(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.exists()

    def part_count(self) -> int:
        return len(self.parts())

    def row_count(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.parts())

    def current(self) -> Path:
        """The folder of the current version, created on first use."""
        if self.path.is_symlink():
            return self.path.resolve()
        if self.path.exists():
            raise StoreError(
                "is a plain folder, not a versioned table; move it aside or migrate it",
                subject=str(self.path),
            )
        first = self.versions / "v000001"
        first.mkdir(parents=True, exist_ok=True)
        self._point_to(first)
        return first

    def _point_to(self, version: Path) -> None:
        tmp = self.path.parent / f".{self.path.name}.link-{uuid.uuid4().hex}"
        os.symlink(os.path.relpath(version, self.path.parent), tmp)
        os.replace(tmp, self.path)

    def parts(self) -> list[Path]:
        if not self.path.exists():
            return []
        return sorted(
            p for p in self.current().iterdir() if p.name.endswith(".parquet") and p.name[0] not in "._"
        )

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive table lock (blocks until free)."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- reading ----------------------------------------------------------------
    def dataset(self) -> ds.Dataset | None:
        if not self.path.exists():
            return None
        dataset = ds.dataset(str(self.path), format="parquet")
        return dataset if dataset.files else None

    def read(self, columns: Sequence[str] | None = None) -> pa.Table | None:
        dataset = self.dataset()
        return None if dataset is None else dataset.to_table(columns=list(columns) if columns else None)

    def keys(self, key_columns: Sequence[str]) -> set[tuple[str, ...]]:
        """Keys present (see :meth:`part_keys`)."""
        return set(merge_part_keys(self.part_keys(key_columns)))

    def key_versions(
        self, key_columns: Sequence[str], version_columns: Sequence[str]
    ) -> dict[tuple[str, ...], tuple[str, ...]]:
        """Key -> its version columns (input content hashes), over all parts."""
        return merge_part_keys(self.part_keys(key_columns, version_columns))

    def part_keys(
        self, key_columns: Sequence[str], version_columns: Sequence[str] = ()
    ) -> dict[Path, dict[tuple[str, ...], tuple[str, ...]]]:
        """Per part, its keys and their version columns, from the part's narrow key file (``v<N>.keys/``).

        Reading the key columns of a wide part parses its whole footer (~6 ms for
        1,200 features); the key files keep an append's look-up cheap. A part
        without a key file (a writer died between the two writes), or whose key
        file predates the version columns, is read directly.
        """
        found = {}
        for part in self.parts():
            side = _keys_folder(part.parent) / part.name
            wanted = [*key_columns, *version_columns]
            source = part
            if side.exists() and set(wanted) <= set(pq.read_schema(side).names):
                source = side
            schema = pq.read_schema(source)
            table = pq.read_table(source, columns=present_columns(schema, wanted))
            found[part] = key_versions(table, key_columns, version_columns)
        return found

    # -- writing ----------------------------------------------------------------
    def append(
        self, table: pa.Table, key_columns: Sequence[str], version_columns: Sequence[str] = ()
    ) -> AppendResult:
        """Add the rows of ``table`` whose key is not in the table yet.

        With ``version_columns`` (the input content hashes), a row whose key is
        present with other versions replaces the stored row: the table moves to a
        new version folder in one link swap (untouched parts hard-linked, parts
        holding replaced keys rewritten without them), so a reader never sees both.
        """
        if table.num_rows == 0:
            return AppendResult(0, 0, None)
        keys = key_tuples(table, key_columns)
        if len(set(keys)) != len(keys):
            raise StoreError("rows to append repeat a key", subject=str(self.path))
        side_columns = [*key_columns, *present_columns(table, version_columns)]
        with self.lock():
            folder = self.current()
            by_part = self.part_keys(key_columns, version_columns)
            present = merge_part_keys(by_part)
            write, replaced = classify(table, key_columns, version_columns, present)
            new = table.filter(pa.array(write))
            if new.num_rows == 0:
                return AppendResult(0, table.num_rows, None)
            new_keys = ["\x1f".join(k) for k, kept in zip(keys, write, strict=True) if kept]
            name = part_name(new_keys)
            if replaced:
                folder = self._new_version_without(folder, by_part, replaced, key_columns, side_columns)
            write_table_atomic(new, folder / name)
            write_table_atomic(new.select(side_columns), _keys_folder(folder) / name)
            if replaced:
                self._point_to(folder)
                self._drop_old_versions(keep=folder)
        return AppendResult(
            new.num_rows - len(replaced), table.num_rows - new.num_rows, str(folder / name), len(replaced)
        )

    def _new_version_without(
        self,
        old: Path,
        by_part: dict[Path, dict[tuple[str, ...], tuple[str, ...]]],
        dropped: set[tuple[str, ...]],
        key_columns: Sequence[str],
        side_columns: Sequence[str],
    ) -> Path:
        """A new version folder holding the current parts minus the rows of ``dropped`` keys."""
        number = int(old.name.removeprefix("v")) + 1
        new = self.versions / f"v{number:06d}"
        new.mkdir(parents=True, exist_ok=False)
        _keys_folder(new).mkdir(parents=True, exist_ok=True)
        for part, keys in by_part.items():
            side = _keys_folder(old) / part.name
            if not dropped.intersection(keys):
                os.link(part, new / part.name)
                if side.exists():
                    os.link(side, _keys_folder(new) / part.name)
                continue
            rows = pq.read_table(part)
            kept = rows.filter(pa.array([k not in dropped for k in key_tuples(rows, key_columns)]))
            if kept.num_rows:
                name = part_name(key_strings(kept, key_columns))
                write_table_atomic(kept, new / name)
                write_table_atomic(kept.select(present_columns(kept, side_columns)), _keys_folder(new) / name)
        return new

    def _drop_old_versions(self, keep: Path) -> None:
        """Keep ``keep`` and the version before it (readers in flight); remove older ones."""
        number = int(keep.name.removeprefix("v"))
        wanted = {f"v{number:06d}", f"v{number - 1:06d}"}
        for version in self.versions.iterdir():
            if version.name.removesuffix(".keys") not in wanted and version.is_dir():
                shutil.rmtree(version, ignore_errors=True)

    def compact(
        self,
        key_columns: Sequence[str],
        order_by: str | None = "processed_at",
        version_columns: Sequence[str] = (),
    ) -> CompactResult:
        """Rewrite the table as one part (one row per key, the latest by ``order_by``)."""
        with self.lock():
            old = self.current()
            parts = self.parts()
            stale = _remove_stale_tmp(old)
            table = self.read()
            if table is None:
                return CompactResult(len(parts), len(parts), 0, 0, stale)
            before = table.num_rows
            table = deduplicate(table, key_columns, order_by)
            number = int(old.name.removeprefix("v")) + 1
            new = self.versions / f"v{number:06d}"
            new.mkdir(parents=True, exist_ok=False)
            name = part_name(key_strings(table, key_columns))
            write_table_atomic(table, new / name)
            side = [*key_columns, *present_columns(table, version_columns)]
            write_table_atomic(table.select(side), _keys_folder(new) / name)
            self._point_to(new)
            self._drop_old_versions(keep=new)
        return CompactResult(len(parts), 1, table.num_rows, before - table.num_rows, stale)


def _keys_folder(version: Path) -> Path:
    """The key columns of each part of a version, beside it (so no reader of the table sees them)."""
    return version.parent / f"{version.name}.keys"


def deduplicate(table: pa.Table, key_columns: Sequence[str], order_by: str | None) -> pa.Table:
    if order_by and order_by in table.column_names:
        order = pc.sort_indices(table, sort_keys=[(order_by, "descending")])
        table = table.take(order)
    keys = key_strings(table, key_columns)
    seen: set[str] = set()
    keep = []
    for key in keys:
        keep.append(key not in seen)
        seen.add(key)
    deduped = table.filter(pa.array(keep))
    sort_keys = [(c, "ascending") for c in key_columns]
    return deduped.take(pc.sort_indices(deduped, sort_keys=sort_keys))


def _remove_stale_tmp(folder: Path, older_than: float = STALE_TMP_SECONDS) -> int:
    now = time.time()
    removed = 0
    for path in folder.glob(".*.tmp"):
        try:
            if now - path.stat().st_mtime > older_than:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed
