"""A store table on an object store (S3 and compatibles), safe without rename or locks.

Object stores have atomic single-object PUTs and, on current S3, MinIO and
SeaweedFS, conditional creation (``If-None-Match: *``); they have no rename, no
symbolic links and no locks. A table ``T`` in prefix ``F`` is therefore kept as::

    F/T/part-*.parquet                     published parts: what pandas/DuckDB read
    F/.T.log/0000000042.json               commit N: the complete list of live parts
    F/.T.staging/<uuid>/part-*.parquet     each part as first written (immutable)
    F/.T.staging/<uuid>/keys-part-*.parquet   its key columns

A writer stages its part, then creates commit ``N+1`` only if nobody created it
first (conditional PUT); the loser re-reads the keys and tries again, so each key
is committed once even with two runs at once. Committed parts are then
*published* (server-side copy into ``F/T``); anyone's next operation finishes a
publication a crashed writer left half done. Compaction commits one part that
replaces all live parts and retires the old names; publishers delete retired
names after copying, so a stale publisher cannot resurrect them.

Readers of the library API (:meth:`ObjectTable.read`) follow the latest commit
and are always exact. A raw listing reader (``pandas.read_parquet("s3://…/T")``)
sees whole parts only and each key once, except during the few milliseconds
between a compaction's copy and its batch delete (or after a crash in that
window, until the next operation on the table), when a key can appear twice.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cohort.errors import StoreError
from cohort.store.location import Location
from cohort.store.parquet import parquet_bytes, part_name
from cohort.store.table import (
    AppendResult,
    CompactResult,
    TableDir,
    classify,
    deduplicate,
    key_strings,
    key_tuples,
    key_versions,
    merge_part_keys,
    present_columns,
)

#: Attempts to win a commit before giving up (each loses only to a concurrent commit).
MAX_COMMIT_ATTEMPTS = 64
#: Retired part names are remembered this long (seconds) so late publishers cannot resurrect them.
RETIRED_KEEP_SECONDS = 86400.0
#: Staged objects no commit refers to are deleted by compaction once older than this.
STALE_STAGING_SECONDS = 3600.0
#: Log entries kept behind the latest one.
LOG_KEEP = 100


@dataclass(frozen=True)
class Part:
    data: str
    keys: str
    rows: int


@dataclass(frozen=True)
class Commit:
    version: int
    parts: dict[str, Part] = field(default_factory=dict)
    retired: dict[str, float] = field(default_factory=dict)
    op: str = "empty"

    def to_json(self) -> bytes:
        body = {
            "version": self.version,
            "op": self.op,
            "time": datetime.now(UTC).isoformat(),
            "parts": {n: {"data": p.data, "keys": p.keys, "rows": p.rows} for n, p in self.parts.items()},
            "retired": self.retired,
        }
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Commit:
        body = json.loads(data)
        parts = {n: Part(p["data"], p["keys"], int(p["rows"])) for n, p in body["parts"].items()}
        return cls(int(body["version"]), parts, dict(body.get("retired", {})), body.get("op", ""))


class ObjectTable:
    """One logical table on an object store (see the module docstring)."""

    def __init__(self, where: Location) -> None:
        self.where = where
        self.folder = where.parent
        self.log = self.folder / f".{where.name}.log"
        self.staging = self.folder / f".{where.name}.staging"
        self._keys_cache: dict[tuple[str, tuple[str, ...]], dict[tuple[str, ...], tuple[str, ...]]] = {}

    @property
    def url(self) -> str:
        return self.where.url

    # -- the log ----------------------------------------------------------------
    def latest(self) -> Commit:
        versions = sorted(
            int(entry.name.removesuffix(".json"))
            for entry in self.log.listdir()
            if entry.name.endswith(".json") and entry.name.removesuffix(".json").isdigit()
        )
        if not versions:
            return Commit(0)
        return Commit.from_json((self.log / _log_name(versions[-1])).read_bytes())

    def _commit(self, commit: Commit) -> bool:
        return (self.log / _log_name(commit.version)).create_exclusive(commit.to_json())

    def _object(self, relative: str) -> Location:
        return self.folder / relative

    def _stage(self, table: pa.Table, side_columns: Sequence[str], name: str) -> Part:
        batch = f"{self.staging.name}/{uuid.uuid4().hex}"
        data, keys = f"{batch}/{name}", f"{batch}/keys-{name}"
        self._object(data).write_bytes_atomic(parquet_bytes(table))
        side = table.select(present_columns(table, side_columns))
        self._object(keys).write_bytes_atomic(parquet_bytes(side))
        return Part(data, keys, table.num_rows)

    # -- reading ----------------------------------------------------------------
    def exists(self) -> bool:
        return self.latest().version > 0

    def part_count(self) -> int:
        return len(self.latest().parts)

    def row_count(self) -> int:
        return sum(p.rows for p in self.latest().parts.values())

    def dataset(self, commit: Commit | None = None) -> ds.Dataset | None:
        """The live parts of the latest commit (as first written: exact even mid-publication)."""
        state = commit or self.latest()
        if not state.parts:
            return None
        files = [self._object(p.data).path for _, p in sorted(state.parts.items())]
        return ds.dataset(files, filesystem=self.where.fs, format="parquet")

    def read(self, columns: Sequence[str] | None = None, commit: Commit | None = None) -> pa.Table | None:
        dataset = self.dataset(commit)
        return None if dataset is None else dataset.to_table(columns=list(columns) if columns else None)

    def keys(self, key_columns: Sequence[str]) -> set[tuple[str, ...]]:
        return set(merge_part_keys(self.part_keys(key_columns)))

    def key_versions(
        self, key_columns: Sequence[str], version_columns: Sequence[str]
    ) -> dict[tuple[str, ...], tuple[str, ...]]:
        return merge_part_keys(self.part_keys(key_columns, version_columns))

    def part_keys(
        self, key_columns: Sequence[str], version_columns: Sequence[str] = (), commit: Commit | None = None
    ) -> dict[str, dict[tuple[str, ...], tuple[str, ...]]]:
        """Per live part, its keys and their version columns (from its key object; parts are immutable)."""
        state = commit or self.latest()
        found = {}
        for name, part in state.parts.items():
            cache_key = (name, tuple(version_columns))
            if cache_key not in self._keys_cache:
                keys = pq.read_table(self._object(part.keys).path, filesystem=self.where.fs)
                self._keys_cache[cache_key] = key_versions(keys, key_columns, version_columns)
            found[name] = self._keys_cache[cache_key]
        return found

    # -- writing ----------------------------------------------------------------
    def append(
        self, table: pa.Table, key_columns: Sequence[str], version_columns: Sequence[str] = ()
    ) -> AppendResult:
        """Commit the rows of ``table`` whose key is not committed yet.

        With ``version_columns``, a row whose key is committed with other versions
        replaces it: the same commit swaps the parts holding those keys for
        rewritten ones (the old names are retired).
        """
        if table.num_rows == 0:
            return AppendResult(0, 0, None)
        keys = key_tuples(table, key_columns)
        if len(set(keys)) != len(keys):
            raise StoreError("rows to append repeat a key", subject=self.url)
        side_columns = [*key_columns, *version_columns]
        staged: tuple[str, Part] | None = None
        for attempt in range(MAX_COMMIT_ATTEMPTS):
            state = self.latest()
            by_part = self.part_keys(key_columns, version_columns, state)
            present = merge_part_keys(by_part)
            write, replaced = classify(table, key_columns, version_columns, present)
            new = table.filter(pa.array(write))
            if new.num_rows == 0:
                self.publish()
                return AppendResult(0, table.num_rows, None)
            name = part_name("\x1f".join(k) for k, kept in zip(keys, write, strict=True) if kept)
            if staged is None or staged[0] != name:
                staged = (name, self._stage(new, side_columns, name))
            parts, retired = dict(state.parts), dict(state.retired)
            for old_name, old_keys in by_part.items():
                if replaced.intersection(old_keys):
                    del parts[old_name]
                    retired[old_name] = time.time()
                    rows = pq.read_table(
                        self._object(state.parts[old_name].data).path, filesystem=self.where.fs
                    )
                    kept = rows.filter(pa.array([k not in replaced for k in key_tuples(rows, key_columns)]))
                    if kept.num_rows:
                        kept_name = part_name(key_strings(kept, key_columns))
                        parts[kept_name] = self._stage(kept, side_columns, kept_name)
            parts[name] = staged[1]
            if self._commit(Commit(state.version + 1, parts, retired, "append")):
                self.publish()
                written = new.num_rows - len(replaced)
                return AppendResult(
                    written, table.num_rows - new.num_rows, (self.where / name).url, len(replaced)
                )
            _backoff(attempt)
        raise StoreError(
            f"no commit won in {MAX_COMMIT_ATTEMPTS} attempts (too many writers?)", subject=self.url
        )

    def compact(
        self,
        key_columns: Sequence[str],
        order_by: str | None = "processed_at",
        version_columns: Sequence[str] = (),
    ) -> CompactResult:
        """Replace all live parts by one (one row per key, the latest by ``order_by``)."""
        for attempt in range(MAX_COMMIT_ATTEMPTS):
            state = self.latest()
            table = self.read(commit=state)
            if table is None:
                return CompactResult(0, 0, 0, 0, 0)
            before = table.num_rows
            table = deduplicate(table, key_columns, order_by)
            name = part_name(key_strings(table, key_columns))
            part = self._stage(table, [*key_columns, *version_columns], name)
            now = time.time()
            retired = {n: t for n, t in state.retired.items() if now - t < RETIRED_KEEP_SECONDS}
            retired.update({n: now for n in state.parts if n != name})
            if self._commit(Commit(state.version + 1, {name: part}, retired, "compact")):
                self.publish()
                stale = self._collect_garbage()
                return CompactResult(len(state.parts), 1, table.num_rows, before - table.num_rows, stale)
            _backoff(attempt)
        raise StoreError(
            f"no commit won in {MAX_COMMIT_ATTEMPTS} attempts (too many writers?)", subject=self.url
        )

    def publish(self) -> int:
        """Make the published folder match the latest commit; returns the objects changed.

        Copies committed parts that are not visible yet (a writer may have died
        after committing), then deletes visible parts the latest commit retired —
        re-reading the log after copying, so a copy made from a stale commit is
        undone by the same call.
        """
        state = self.latest()
        visible = {entry.name for entry in self.where.listdir()}
        changed = 0
        for name, part in state.parts.items():
            if name not in visible:
                self.where.fs.copy(self._object(part.data).path, (self.where / name).path)
                visible.add(name)
                changed += 1
        state = self.latest()
        doomed = [
            (self.where / n).path for n in sorted(visible) if n in state.retired and n not in state.parts
        ]
        if doomed:
            self.where.fs.rm(doomed)
            changed += len(doomed)
        return changed

    def _collect_garbage(self) -> int:
        """Delete staged batches no commit refers to (old ones only) and old log entries."""
        state = self.latest()
        live = {p.data.split("/")[1] for p in state.parts.values()}
        now = time.time()
        removed = 0
        for batch in self.staging.listdir():
            if batch.name in live:
                continue
            times = [o.modified() for o in batch.listdir()]
            if times and all(now - t > STALE_STAGING_SECONDS for t in times):
                self.where.fs.rm(batch.path, recursive=True)
                removed += 1
        old = [
            entry.path
            for entry in self.log.listdir()
            if entry.name.removesuffix(".json").isdigit()
            and int(entry.name.removesuffix(".json")) < state.version - LOG_KEEP
        ]
        if old:
            self.where.fs.rm(old)
        return removed


def _too_many_writers(url: str) -> StoreError:
    return StoreError(f"no commit won in {MAX_COMMIT_ATTEMPTS} attempts (too many writers?)", subject=url)


def _log_name(version: int) -> str:
    return f"{version:010d}.json"


def _backoff(attempt: int) -> None:
    time.sleep(min(2.0, 0.01 * 2 ** min(attempt, 8)) * random.uniform(0.5, 1.5))


FeatureTable = TableDir | ObjectTable


def open_table(where: str | Location) -> FeatureTable:
    """The table at ``where``: a versioned folder locally, a commit-logged prefix on an object store."""
    location = Location.parse(where)
    return TableDir(location.local_path()) if location.is_local else ObjectTable(location)
