"""An incremental, partitioned Parquet index of an archive.

Layout under the index root::

    manifest.json                     archive, partition count, schema fingerprint, generation
    instances/part-NN.parquet         one row per DICOM instance, rows of one partition, sorted by path
    quarantine/part-NN.parquet        one row per file that is not an indexable instance, with the reason
    changes/<run id>.parquet          files added, changed or deleted by one run (none when nothing changed)
    runs.parquet                      one row per run: counts, bytes read, seconds

A file's partition is a hash of its folder (a series or patient folder), so a new
series touches one partition and an update rewrites only the partitions it
touches, each atomically (hidden temporary name, then ``os.replace``). Every
partition is complete on its own, so a crash between two partitions leaves an
index that is still correct for each file (old or new state) and the next run
finishes the job. ``pandas.read_parquet(root / "instances")`` reads the index.

A re-crawl lists the archive (stat only) and reads only files whose size or
mtime changed, or that are new; listed files that disappeared are deleted from
the index. Updates of one index are serialised by a lock file.
"""

from __future__ import annotations

import fcntl
import json
import math
import multiprocessing
import os
import threading
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cohort.errors import CohortError, Stage
from cohort.index.read import ReadResult, read_entries
from cohort.index.schema import (
    CHANGE_SCHEMA,
    INSTANCE_SCHEMA,
    QUARANTINE_SCHEMA,
    RUN_SCHEMA,
    schema_fingerprint,
)
from cohort.index.source import ArchiveSource, FileEntry, LocalArchive, open_archive

#: Partitions of a new index (fixed for its lifetime).
DEFAULT_PARTITIONS = 64
#: Files per read batch (one task of a process pool or of a flow).
CHUNK_FILES = 256
INDEX_FORMAT = "cohort-archive-index"
#: Bump when the rows read from an unchanged file change; a new version re-reads every file.
READER_VERSION = "2"
FINGERPRINT = schema_fingerprint(INSTANCE_SCHEMA, QUARANTINE_SCHEMA, extra=READER_VERSION)


class IndexUpdateError(CohortError):
    """The index folder cannot be updated (another archive's index, a concurrent update, ...)."""

    stage = Stage.INDEX


class IndexChangedError(IndexUpdateError):
    """Another update committed after this one was planned: plan again (nothing was written)."""


class ChangeKind(StrEnum):
    ADDED = "added"
    CHANGED = "changed"
    DELETED = "deleted"


@dataclass(frozen=True)
class IndexLayout:
    """Where the parts of an index live under its root folder."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def instances(self) -> Path:
        return self.root / "instances"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def changes(self) -> Path:
        return self.root / "changes"

    @property
    def runs(self) -> Path:
        return self.root / "runs.parquet"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"


@dataclass(frozen=True)
class Manifest:
    archive: str
    partitions: int
    fingerprint: str
    generation: int
    updated_at: str
    format: str = INDEX_FORMAT

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return cls(**data)
        except (ValueError, TypeError, OSError) as exc:
            raise IndexUpdateError(
                f"unreadable index manifest ({exc}); move the folder away to rebuild the index",
                subject=str(path),
            ) from exc

    def save(self, path: Path) -> None:
        _write_atomic(path, json.dumps(asdict(self), indent=1).encode())


def partition_of(path: str, partitions: int) -> int:
    """Partition of a relative path: a stable hash of its folder (of the name, at the root)."""
    folder = path.rpartition("/")[0] or path
    return zlib.crc32(folder.encode()) % partitions


def _part_name(bucket: int, partitions: int) -> str:
    return f"part-{bucket:0{len(str(partitions - 1))}d}.parquet"


def _bucket_of_file(name: str) -> int | None:
    if not (name.startswith("part-") and name.endswith(".parquet")):
        return None
    digits = name[len("part-") : -len(".parquet")]
    return int(digits) if digits.isdigit() else None


@dataclass(frozen=True)
class UpdatePlan:
    """What one update will do: decided from the listing and the index, before any file is read.

    Picklable: a flow may plan, read :meth:`chunks` on its workers with
    :func:`cohort.index.read.read_entries`, and :func:`commit_update` the results.
    """

    run_id: str
    started_at: datetime
    archive: ArchiveSource
    index_root: Path
    partitions: int
    generation: int
    rebuild: bool
    listed: int
    unchanged: int
    instances_before: int
    quarantined_before: int
    to_read: tuple[FileEntry, ...]
    changes: pa.Table  # path, kind, old_sha256, was_quarantined
    touched: frozenset[int]

    def chunks(self, size: int = CHUNK_FILES) -> list[list[FileEntry]]:
        """``to_read`` in batches of at most ``size`` files."""
        return [list(self.to_read[i : i + size]) for i in range(0, len(self.to_read), size)]


@dataclass(frozen=True)
class IndexUpdate:
    """The outcome of one update run (also a row of ``runs.parquet``)."""

    run_id: str
    started_at: datetime
    finished_at: datetime
    archive: str
    rebuild: bool
    listed: int
    added: int
    changed: int
    content_changed: int
    deleted: int
    unchanged: int
    instances: int
    quarantined: int
    files_read: int
    bytes_read: int
    partitions_written: int
    workers: int
    seconds: float

    def row(self) -> dict[str, Any]:
        return asdict(self)


# -- reading the index --------------------------------------------------------


def _read_part(path: Path, schema: pa.Schema, columns: Sequence[str] | None = None) -> pa.Table:
    """One partition file (small: one thread; ``pq.read_table`` costs ~5x more per file here)."""
    names = list(columns) if columns else schema.names
    table = pq.ParquetFile(path).read(columns=names, use_threads=False)
    wanted = pa.schema([schema.field(n) for n in names])
    return table if table.schema.equals(wanted) else table.cast(wanted)


def _read_parts(folder: Path, schema: pa.Schema, columns: Sequence[str] | None = None) -> pa.Table:
    files = sorted(p for p in folder.glob("part-*.parquet")) if folder.is_dir() else []
    names = list(columns) if columns else schema.names
    parts = [_read_part(f, schema, names) for f in files]
    empty = pa.Table.from_pylist([], schema=schema).select(names)
    return pa.concat_tables([empty, *parts]) if parts else empty


def read_instances(
    index_root: str | os.PathLike[str], *, columns: Sequence[str] | None = None, absolute_paths: bool = False
) -> pa.Table:
    """The index's instance rows (``path`` relative to the archive, or absolute with ``absolute_paths``)."""
    layout = IndexLayout(Path(index_root))
    table = _read_parts(layout.instances, INSTANCE_SCHEMA, columns)
    if absolute_paths and "path" in table.column_names:
        manifest = Manifest.load(layout.manifest)
        if manifest is None:
            raise IndexUpdateError("no index here yet: run update_index first", subject=str(layout.root))
        prefix = open_archive(manifest.archive).url.rstrip("/") + "/"
        joined = pc.binary_join_element_wise(pa.scalar(prefix), table.column("path"), "")
        table = table.set_column(table.schema.get_field_index("path"), "path", joined)
    return table


def read_quarantine(index_root: str | os.PathLike[str]) -> pa.Table:
    """The index's quarantine rows: files that are not indexable instances, with the reason."""
    return _read_parts(IndexLayout(Path(index_root)).quarantine, QUARANTINE_SCHEMA)


def read_changes(index_root: str | os.PathLike[str]) -> pa.Table:
    """Every recorded change, oldest run first."""
    folder = IndexLayout(Path(index_root)).changes
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    parts = [pq.read_table(f, schema=CHANGE_SCHEMA) for f in files]
    table = pa.concat_tables([pa.Table.from_pylist([], schema=CHANGE_SCHEMA), *parts])
    return table.sort_by([("run_at", "ascending"), ("path", "ascending")])


def read_runs(index_root: str | os.PathLike[str]) -> pa.Table:
    """One row per completed update run, oldest first."""
    path = IndexLayout(Path(index_root)).runs
    if not path.exists():
        return pa.Table.from_pylist([], schema=RUN_SCHEMA)
    return pq.read_table(path, schema=RUN_SCHEMA)


# -- planning -----------------------------------------------------------------


def _check_not_inside(source: ArchiveSource, index_root: Path) -> None:
    if isinstance(source, LocalArchive):
        root, index = source.root.resolve(), index_root.resolve()
        if index == root or root in index.parents:
            raise IndexUpdateError(
                "the index folder is inside the archive it indexes; put it elsewhere", subject=str(index)
            )


def _state(layout: IndexLayout) -> tuple[dict[str, tuple[int, int, str | None, bool]], int, int]:
    """path -> (size, mtime_ns, sha256, quarantined) of every file in the index."""
    state: dict[str, tuple[int, int, str | None, bool]] = {}
    inst = _read_parts(layout.instances, INSTANCE_SCHEMA, ["path", "size", "mtime_ns", "sha256"])
    cols = [inst.column(c).to_pylist() for c in ("path", "size", "mtime_ns", "sha256")]
    for path, size, mtime, sha in zip(*cols, strict=True):
        state[path] = (size, mtime, sha, False)
    quar = _read_parts(layout.quarantine, QUARANTINE_SCHEMA, ["path", "size", "mtime_ns"])
    qcols = [quar.column(c).to_pylist() for c in ("path", "size", "mtime_ns")]
    for path, size, mtime in zip(*qcols, strict=True):
        state[path] = (size, mtime, None, True)
    return state, inst.num_rows, quar.num_rows


def plan_update(
    archive: str | os.PathLike[str] | ArchiveSource,
    index_root: str | os.PathLike[str],
    *,
    partitions: int | None = None,
) -> UpdatePlan:
    """List the archive (stat only) and compare it with the index: what to read, what changed."""
    started = datetime.now(UTC)
    source = open_archive(archive)
    layout = IndexLayout(Path(index_root).absolute())
    _check_not_inside(source, layout.root)
    manifest = Manifest.load(layout.manifest)
    if manifest is not None and manifest.archive != source.url:
        raise IndexUpdateError(
            f"this index belongs to the archive {manifest.archive}, not {source.url}; use another folder",
            subject=str(layout.root),
        )
    count = manifest.partitions if manifest else (partitions or DEFAULT_PARTITIONS)
    if partitions is not None and partitions != count:
        raise IndexUpdateError(
            f"the index has {count} partitions, not {partitions}; rebuild it in a new folder to change that",
            subject=str(layout.root),
        )
    if count < 1:
        raise IndexUpdateError(f"partitions must be >= 1, not {count}", subject=str(layout.root))
    rebuild = manifest is None or manifest.fingerprint != FINGERPRINT
    state, n_instances, n_quarantined = _state(layout)

    to_read: list[FileEntry] = []
    paths: list[str] = []
    kinds: list[str] = []
    old_sha: list[str | None] = []
    was_quarantined: list[bool | None] = []
    touched: set[int] = set()
    listed = unchanged = 0
    for entry in source.walk():
        listed += 1
        old = state.pop(entry.path, None)
        if old is not None and old[0] == entry.size and old[1] == entry.mtime_ns:
            unchanged += 1
            if rebuild:
                to_read.append(entry)
                touched.add(partition_of(entry.path, count))
            continue
        to_read.append(entry)
        touched.add(partition_of(entry.path, count))
        paths.append(entry.path)
        kinds.append(ChangeKind.ADDED if old is None else ChangeKind.CHANGED)
        old_sha.append(None if old is None else old[2])
        was_quarantined.append(None if old is None else old[3])
    for path, old in state.items():  # listed no more
        touched.add(partition_of(path, count))
        paths.append(path)
        kinds.append(ChangeKind.DELETED)
        old_sha.append(old[2])
        was_quarantined.append(old[3])
    if rebuild:
        touched.update(_existing_buckets(layout))
    changes = pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "kind": pa.array([str(k) for k in kinds], pa.string()),
            "old_sha256": pa.array(old_sha, pa.string()),
            "was_quarantined": pa.array(was_quarantined, pa.bool_()),
        }
    )
    return UpdatePlan(
        run_id=f"{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}",
        started_at=started,
        archive=source,
        index_root=layout.root,
        partitions=count,
        generation=manifest.generation if manifest else 0,
        rebuild=rebuild,
        listed=listed,
        unchanged=unchanged,
        instances_before=n_instances,
        quarantined_before=n_quarantined,
        to_read=tuple(to_read),
        changes=changes,
        touched=frozenset(touched),
    )


def _existing_buckets(layout: IndexLayout) -> set[int]:
    found: set[int] = set()
    for folder in (layout.instances, layout.quarantine):
        if folder.is_dir():
            found.update(b for p in folder.iterdir() if (b := _bucket_of_file(p.name)) is not None)
    return found


# -- committing ---------------------------------------------------------------


def _write_atomic(path: Path, data: bytes | pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        if isinstance(data, pa.Table):
            pq.write_table(data, tmp, compression="zstd")
        else:
            tmp.write_bytes(data)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise IndexUpdateError(f"cannot write {path.name}: {exc}", subject=str(path)) from exc


@contextmanager
def _locked(layout: IndexLayout) -> Iterator[None]:
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.lock, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _by_bucket(table: pa.Table, partitions: int) -> dict[int, pa.Table]:
    if table.num_rows == 0:
        return {}
    buckets = pa.array([partition_of(p, partitions) for p in table.column("path").to_pylist()], pa.int32())
    out: dict[int, pa.Table] = {}
    for bucket in pc.unique(buckets).to_pylist():
        out[bucket] = table.filter(pc.equal(buckets, bucket))
    return out


def _rewrite(
    folder: Path,
    schema: pa.Schema,
    bucket: int,
    partitions: int,
    drop: pa.Array,
    new: pa.Table | None,
    rebuild: bool,
) -> int:
    """Rewrite one partition without the ``drop`` paths and with the ``new`` rows; 1 if written."""
    path = folder / _part_name(bucket, partitions)
    old = _read_part(path, schema) if path.exists() and not rebuild else None
    parts = []
    if old is not None and old.num_rows:
        remove = drop if new is None else pa.concat_arrays([drop, new.column("path").combine_chunks()])
        keep = pc.invert(pc.is_in(old.column("path"), value_set=remove))
        parts.append(old.filter(keep))
    if new is not None:
        parts.append(new)
    table = pa.concat_tables(parts).sort_by("path") if parts else pa.Table.from_pylist([], schema=schema)
    if table.num_rows == 0:
        if path.exists():
            path.unlink()
            return 1
        return 0
    if old is not None and table.equals(old):
        return 0
    _write_atomic(path, table)
    return 1


def _ensure_not_empty(folder: Path, schema: pa.Schema, partitions: int) -> None:
    """Readers of an empty folder fail: keep one empty partition file for the schema."""
    if not any(folder.glob("part-*.parquet")):
        _write_atomic(folder / _part_name(0, partitions), pa.Table.from_pylist([], schema=schema))


def commit_update(plan: UpdatePlan, results: Iterable[ReadResult], *, workers: int = 1) -> IndexUpdate:
    """Write the rows read for ``plan`` into the index (touched partitions only) and log the run."""
    layout = IndexLayout(plan.index_root)
    with _locked(layout):
        manifest = Manifest.load(layout.manifest)
        if (manifest.generation if manifest else 0) != plan.generation:
            raise IndexChangedError(
                "the index changed since this update was planned (another update ran); plan again",
                subject=str(layout.root),
            )
        return _commit_locked(plan, list(results), workers)


def _commit_locked(plan: UpdatePlan, results: list[ReadResult], workers: int) -> IndexUpdate:
    layout = IndexLayout(plan.index_root)
    count = plan.partitions
    instances = pa.concat_tables(
        [pa.Table.from_pylist([], schema=INSTANCE_SCHEMA), *(r.instances for r in results)]
    )
    quarantine = pa.concat_tables(
        [pa.Table.from_pylist([], schema=QUARANTINE_SCHEMA), *(r.quarantine for r in results)]
    )
    read_paths = set(instances.column("path").to_pylist()) | set(quarantine.column("path").to_pylist())
    expected = {e.path for e in plan.to_read}
    if read_paths != expected:
        missing = sorted(expected - read_paths)[:3]
        raise IndexUpdateError(
            f"the read results do not match the plan ({len(expected - read_paths)} files missing, "
            f"e.g. {missing}; {len(read_paths - expected)} unexpected)",
            subject=str(layout.root),
        )

    changes = plan.changes
    kinds = changes.column("kind").to_pylist()
    change_paths = changes.column("path").to_pylist()
    new_sha = dict(
        zip(instances.column("path").to_pylist(), instances.column("sha256").to_pylist(), strict=True)
    )
    indexed = set(new_sha)
    status: list[str | None] = []
    content_changed: list[bool | None] = []
    for path, kind, old in zip(change_paths, kinds, changes.column("old_sha256").to_pylist(), strict=True):
        status.append(None if kind == ChangeKind.DELETED else "indexed" if path in indexed else "quarantined")
        if kind == ChangeKind.CHANGED:
            new = new_sha.get(path)
            content_changed.append(None if old is None or new is None else old != new)
        else:
            content_changed.append(None)
    if changes.num_rows:
        log = pa.table(
            {
                "run_id": pa.array([plan.run_id] * changes.num_rows, pa.string()),
                "run_at": pa.array([plan.started_at] * changes.num_rows, CHANGE_SCHEMA.field("run_at").type),
                "path": changes.column("path"),
                "kind": changes.column("kind"),
                "status": pa.array(status, pa.string()),
                "content_changed": pa.array(content_changed, pa.bool_()),
            },
            schema=CHANGE_SCHEMA,
        )
        _write_atomic(layout.changes / f"{plan.run_id}.parquet", log)

    # Paths whose old rows go: changed and deleted ones (new rows of re-read files replace theirs).
    drop_paths = [p for p, k in zip(change_paths, kinds, strict=True) if k != ChangeKind.ADDED]
    drop_by_bucket: dict[int, list[str]] = {}
    for path in drop_paths:
        drop_by_bucket.setdefault(partition_of(path, count), []).append(path)
    new_instances = _by_bucket(instances, count)
    new_quarantine = _by_bucket(quarantine, count)
    written = 0
    for bucket in sorted(plan.touched):
        drop = pa.array(drop_by_bucket.get(bucket, []), pa.string())
        written += _rewrite(
            layout.instances, INSTANCE_SCHEMA, bucket, count, drop, new_instances.get(bucket), plan.rebuild
        )
        new_bad = new_quarantine.get(bucket)
        written += _rewrite(layout.quarantine, QUARANTINE_SCHEMA, bucket, count, drop, new_bad, plan.rebuild)
    _ensure_not_empty(layout.instances, INSTANCE_SCHEMA, count)
    _ensure_not_empty(layout.quarantine, QUARANTINE_SCHEMA, count)

    was_quarantined = changes.column("was_quarantined").to_pylist()
    gone = [q for k, q in zip(kinds, was_quarantined, strict=True) if k != ChangeKind.ADDED]
    gone_instances, gone_quarantined = gone.count(False), gone.count(True)
    if plan.rebuild:  # unchanged files were re-read too: their old rows are replaced as well
        n_instances, n_quarantined = instances.num_rows, quarantine.num_rows
    else:
        n_instances = plan.instances_before - gone_instances + instances.num_rows
        n_quarantined = plan.quarantined_before - gone_quarantined + quarantine.num_rows
    finished = datetime.now(UTC)
    update = IndexUpdate(
        run_id=plan.run_id,
        started_at=plan.started_at,
        finished_at=finished,
        archive=plan.archive.url,
        rebuild=plan.rebuild,
        listed=plan.listed,
        added=kinds.count(ChangeKind.ADDED),
        changed=kinds.count(ChangeKind.CHANGED),
        content_changed=sum(1 for c in content_changed if c),
        deleted=kinds.count(ChangeKind.DELETED),
        unchanged=plan.unchanged,
        instances=n_instances,
        quarantined=n_quarantined,
        files_read=sum(r.files_read for r in results),
        bytes_read=sum(r.bytes_read for r in results),
        partitions_written=written,
        workers=workers,
        seconds=(finished - plan.started_at).total_seconds(),
    )
    runs = pa.concat_tables([read_runs(layout.root), pa.Table.from_pylist([update.row()], schema=RUN_SCHEMA)])
    _write_atomic(layout.runs, runs)
    generation = (plan.generation or 0) + 1
    Manifest(plan.archive.url, count, FINGERPRINT, generation, finished.isoformat()).save(layout.manifest)
    return update


# -- all in one ---------------------------------------------------------------


def read_plan(plan: UpdatePlan, *, workers: int = 1, chunk_files: int = CHUNK_FILES) -> list[ReadResult]:
    """Read every file of ``plan``: in this process, or in ``workers`` spawned processes."""
    if workers <= 1 or len(plan.to_read) <= chunk_files:
        return [read_entries(plan.archive, plan.to_read)]
    size = max(16, min(chunk_files, math.ceil(len(plan.to_read) / (workers * 4))))
    chunks = plan.chunks(size)
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=_pool_context()) as pool:
        return list(pool.map(read_entries, [plan.archive] * len(chunks), chunks))


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork when this process has one thread (fast start, warm workers); else forkserver.

    Forking a process that runs other threads (Prefect, Dask) can copy a lock some
    thread holds; the fork server is a clean single-threaded process instead.
    """
    if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["cohort.index.read"])
    return context


def update_index(
    archive: str | os.PathLike[str] | ArchiveSource,
    index_root: str | os.PathLike[str],
    *,
    workers: int = 1,
    partitions: int | None = None,
    chunk_files: int = CHUNK_FILES,
) -> IndexUpdate:
    """Bring the index at ``index_root`` up to date with ``archive``; returns what changed.

    Only new files and files whose size or mtime changed are read (and hashed);
    ``workers`` > 1 reads them in that many processes.
    """
    layout = IndexLayout(Path(index_root).absolute())
    with _locked(layout):
        plan = plan_update(archive, layout.root, partitions=partitions)
        results = read_plan(plan, workers=workers, chunk_files=chunk_files)
        return _commit_locked(plan, results, workers)
