"""The incremental, partitioned index: re-crawls read only what changed, readers see one current index."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import duckdb
import fsspec
import pandas as pd
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cohort.index.incremental as incremental
from cohort.index import (
    INSTANCE_SCHEMA,
    FileEntry,
    FsspecArchive,
    IndexUpdateError,
    LocalArchive,
    commit_update,
    partition_of,
    plan_update,
    read_changes,
    read_entries,
    read_instances,
    read_plan,
    read_quarantine,
    read_runs,
    update_index,
)
from tests.index.files import write_instance


@dataclass(frozen=True)
class CountingArchive:
    """A local archive that counts the files it opens (the reader's only way to a file body)."""

    inner: LocalArchive
    opened: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.inner.url

    def walk(self) -> Iterator[FileEntry]:
        return self.inner.walk()

    def open(self, entry: FileEntry) -> tuple[BinaryIO, FileEntry]:
        self.opened.append(entry.path)
        return self.inner.open(entry)

    def absolute(self, path: str) -> str:
        return self.inner.absolute(path)


def _archive(root: Path, patients: int = 3, files: int = 4) -> Path:
    for p in range(patients):
        for i in range(files):
            write_instance(root / f"P{p}" / "CT" / f"{i}.dcm", seed=p * 100 + i)
    (root / "P0" / "notes.txt").write_text("not DICOM")
    return root


def _table(index: Path) -> pd.DataFrame:
    """The index as a reader sees it: pandas straight from the folder."""
    return pd.read_parquet(index / "instances").sort_values("path").reset_index(drop=True)


def _fresh(archive: Path, tmp: Path) -> pd.DataFrame:
    """The index a first crawl of the archive as it is now builds."""
    where = tmp / f"fresh-{len(list(tmp.glob('fresh-*')))}"
    update_index(archive, where)
    return _table(where)


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return a.drop(columns=["mtime_ns"]).equals(b.drop(columns=["mtime_ns"])) and a.mtime_ns.equals(b.mtime_ns)


def test_first_crawl_builds_a_partitioned_index_that_every_reader_reads(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive")
    index = tmp_path / "index"
    update = update_index(archive, index)
    assert (update.listed, update.added, update.instances, update.quarantined) == (13, 13, 12, 1)
    assert (update.files_read, update.changed, update.deleted, update.rebuild) == (13, 0, 0, True)
    df = _table(index)
    assert len(df) == 12 and df.path.is_unique and df.sop_instance_uid.is_unique
    assert df.path.str.startswith("P").all() and df.path.str.endswith(".dcm").all()  # relative paths
    assert df.sha256.str.len().eq(64).all() and df.modality.eq("CT").all()
    quarantine = pd.read_parquet(index / "quarantine")
    assert quarantine.path.tolist() == ["P0/notes.txt"] and quarantine.reason[0].startswith("not DICOM")
    # One partition per series folder; DuckDB and pyarrow read the same folder.
    buckets = {partition_of(p, incremental.DEFAULT_PARTITIONS) for p in df.path}
    assert len(list((index / "instances").glob("part-*.parquet"))) == len(buckets)
    query = f"select count(*) from read_parquet('{index}/instances/*.parquet') where modality = 'CT'"
    assert duckdb.execute(query).fetchall() == [(12,)]
    assert read_instances(index).schema == INSTANCE_SCHEMA
    absolute = read_instances(index, columns=["path"], absolute_paths=True).column("path").to_pylist()
    assert all(Path(p).is_file() and Path(p).is_relative_to(archive) for p in absolute)
    changes = read_changes(index).to_pandas()
    assert changes.kind.eq("added").all() and len(changes) == 13
    assert changes.status.value_counts().to_dict() == {"indexed": 12, "quarantined": 1}
    assert read_runs(index).num_rows == 1


def test_a_recrawl_of_an_unchanged_archive_reads_no_file_and_writes_no_partition(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive")
    index = tmp_path / "index"
    update_index(archive, index)
    before = _table(index)
    parts = {p: p.stat().st_mtime_ns for p in index.rglob("part-*.parquet")}
    source = CountingArchive(LocalArchive(archive))
    again = update_index(source, index)
    assert source.opened == [] and (again.files_read, again.bytes_read) == (0, 0)
    assert (again.unchanged, again.added, again.changed, again.deleted) == (13, 0, 0, 0)
    assert again.partitions_written == 0 and again.rebuild is False
    assert {p: p.stat().st_mtime_ns for p in index.rglob("part-*.parquet")} == parts
    assert _same_rows(_table(index), before)
    assert read_runs(index).column("files_read").to_pylist() == [13, 0]
    assert len(list((index / "changes").glob("*.parquet"))) == 1  # no change, no change file


def test_touched_modified_deleted_added_and_broken_files_are_each_recorded(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive")
    index = tmp_path / "index"
    update_index(archive, index)
    target = archive / "P1" / "CT" / "2.dcm"

    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touch
    source = CountingArchive(LocalArchive(archive))
    touched = update_index(source, index)
    assert source.opened == ["P1/CT/2.dcm"] and (touched.changed, touched.content_changed) == (1, 0)
    assert touched.partitions_written == 1  # the one instance partition; its quarantine part is unchanged
    assert _same_rows(_table(index), _fresh(archive, tmp_path))

    write_instance(target, seed=77)  # modified content
    modified = update_index(archive, index)
    assert (modified.changed, modified.content_changed, modified.files_read) == (1, 1, 1)
    assert _same_rows(_table(index), _fresh(archive, tmp_path))

    (archive / "P2" / "CT" / "0.dcm").unlink()
    deleted = update_index(archive, index)
    assert (deleted.deleted, deleted.files_read, deleted.instances) == (1, 0, 11)
    assert "P2/CT/0.dcm" not in set(_table(index).path)

    others = {p: p.stat().st_mtime_ns for p in (index / "instances").glob("part-*.parquet")}
    write_instance(archive / "P9" / "CT" / "0.dcm")
    added = update_index(archive, index)
    assert (added.added, added.files_read, added.partitions_written, added.instances) == (1, 1, 1, 12)
    new_part = index / "instances" / incremental._part_name(partition_of("P9/CT/0.dcm", 64), 64)
    untouched = {p: m for p, m in others.items() if p != new_part}
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # no other partition rewritten

    target.write_text("overwritten by a report")  # an instance becomes junk
    broken = update_index(archive, index)
    assert broken.changed == 1 and (broken.instances, broken.quarantined) == (11, 2)
    assert "P1/CT/2.dcm" in read_quarantine(index).column("path").to_pylist()
    assert _same_rows(_table(index), _fresh(archive, tmp_path))

    log = read_changes(index).to_pandas()
    assert log.groupby("kind").size().to_dict() == {"added": 14, "changed": 3, "deleted": 1}
    assert log[log.kind == "changed"].content_changed.tolist() == [False, True, None]
    assert log[log.path == "P1/CT/2.dcm"].status.tolist()[-1] == "quarantined"
    assert read_runs(index).num_rows == 6


_KINDS = st.sampled_from(["add", "modify", "touch", "delete", "junk"])
_OPS = st.lists(
    st.tuples(_KINDS, st.integers(0, 5), st.integers(0, 3)),
    min_size=1,
    max_size=6,
)


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_after_any_sequence_of_changes_the_index_equals_a_fresh_crawl(tmp_path_factory, ops) -> None:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("ops")
    archive = _archive(tmp / "archive", patients=2, files=2)
    index = tmp / "index"
    update_index(archive, index, partitions=4)
    for op, folder, name in ops:
        path = archive / f"P{folder}" / f"{name}.dcm"
        if op == "add" or (op in ("modify", "touch", "junk") and not path.exists()):
            write_instance(path, seed=folder + name)
        elif op == "modify":
            write_instance(path, seed=folder + name + 1)
        elif op == "touch":
            os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
        elif op == "delete" and path.exists():
            path.unlink()
        elif op == "junk":
            path.write_bytes(b"junk")
        update_index(archive, index)
        fresh = tmp / "fresh"
        shutil.rmtree(fresh, ignore_errors=True)
        update_index(archive, fresh, partitions=4)
        assert _same_rows(_table(index), _table(fresh))
        q, fq = read_quarantine(index).sort_by("path"), read_quarantine(fresh).sort_by("path")
        assert q.equals(fq)


def test_worker_processes_give_the_same_index(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive")
    one = update_index(archive, tmp_path / "one")
    two = update_index(archive, tmp_path / "two", workers=2, chunk_files=4)
    assert (two.files_read, two.instances, two.workers) == (one.files_read, one.instances, 2)
    assert _same_rows(_table(tmp_path / "one"), _table(tmp_path / "two"))


def test_a_new_reader_or_schema_rebuilds_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _archive(tmp_path / "archive")
    index = tmp_path / "index"
    update_index(archive, index)
    before = _table(index)
    monkeypatch.setattr(incremental, "FINGERPRINT", "another-reader")
    rebuilt = update_index(archive, index)
    assert (rebuilt.rebuild, rebuilt.files_read, rebuilt.unchanged, rebuilt.instances) == (True, 13, 13, 12)
    assert _same_rows(_table(index), before)
    assert update_index(archive, index).files_read == 0


def test_an_update_cut_short_is_finished_by_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _archive(tmp_path / "archive", patients=4)
    index = tmp_path / "index"
    update_index(archive, index)
    for p in range(4):
        write_instance(archive / f"P{p}" / "CT" / "9.dcm")
    real = incremental._rewrite
    calls = []

    def crash_after_two(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) > 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(incremental, "_rewrite", crash_after_two)
    with pytest.raises(OSError):
        update_index(archive, index)
    monkeypatch.setattr(incremental, "_rewrite", real)
    df = _table(index)
    assert df.path.is_unique  # partly updated, never duplicated
    update_index(archive, index)
    assert _same_rows(_table(index), _fresh(archive, tmp_path))


def test_wrong_use_is_refused_with_what_to_do(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive", patients=1)
    index = tmp_path / "index"
    update_index(archive, index)
    other = _archive(tmp_path / "other", patients=1)
    with pytest.raises(IndexUpdateError, match="belongs to the archive"):
        update_index(other, index)
    with pytest.raises(IndexUpdateError, match="partitions"):
        update_index(archive, index, partitions=8)
    with pytest.raises(IndexUpdateError, match="inside the archive"):
        update_index(archive, archive / ".index")
    plan = plan_update(archive, index)
    update_index(archive, index)  # someone else updates in between
    with pytest.raises(IndexUpdateError, match="plan again"):
        commit_update(plan, read_plan(plan))
    (index / "manifest.json").write_text("{not json")
    with pytest.raises(IndexUpdateError, match="move the folder away"):
        update_index(archive, index)


def test_plan_read_commit_is_the_same_as_update(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive")
    index = tmp_path / "index"
    plan = plan_update(archive, index)
    chunks = plan.chunks(5)
    assert [len(c) for c in chunks] == [5, 5, 3]
    update = commit_update(plan, [read_entries(plan.archive, c) for c in chunks])
    assert (update.added, update.instances, update.files_read) == (13, 12, 13)
    assert _same_rows(_table(index), _fresh(archive, tmp_path))
    assert commit_update(plan_update(archive, index), []).unchanged == 13  # nothing to read
    write_instance(archive / "P7" / "x.dcm")
    with pytest.raises(IndexUpdateError, match="do not match the plan"):
        commit_update(plan_update(archive, index), [])  # a result is missing


def test_concurrent_updates_are_serialised(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive")
    index = tmp_path / "index"
    results = []

    def run() -> None:
        results.append(update_index(archive, index))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.files_read for r in results) == [0, 0, 13]
    assert _table(index).path.is_unique and len(_table(index)) == 12


def test_an_fsspec_archive_is_crawled_the_same_way(tmp_path: Path) -> None:
    local = _archive(tmp_path / "archive", patients=2)
    memory = fsspec.filesystem("memory")
    for path in local.rglob("*"):
        if path.is_file():
            memory.pipe(f"/archive/{path.relative_to(local).as_posix()}", path.read_bytes())
    source = FsspecArchive(memory, "/archive")
    index = tmp_path / "index"
    first = update_index(source, index)
    assert (first.instances, first.quarantined) == (8, 1) and source.url == "memory:///archive"
    assert update_index(source, index).files_read == 0
    memory.rm("/archive/P1/CT/0.dcm")
    assert update_index(source, index).deleted == 1
    # fsspec's local file system: symbolic links are listed, never followed.
    (local / "P0" / "link.dcm").symlink_to(local / "P1" / "CT" / "1.dcm")
    over_fsspec = update_index(FsspecArchive(LocalFileSystem(), str(local)), tmp_path / "local-index")
    assert (over_fsspec.instances, over_fsspec.quarantined) == (8, 2)
    reasons = read_quarantine(tmp_path / "local-index").to_pandas().set_index("path").reason
    assert reasons["P0/link.dcm"] == "symbolic link, not followed"


def test_an_empty_archive_gives_an_empty_index_readers_can_open(tmp_path: Path) -> None:
    (tmp_path / "archive").mkdir()
    update = update_index(tmp_path / "archive", tmp_path / "index")
    assert (update.listed, update.instances) == (0, 0)
    assert pd.read_parquet(tmp_path / "index" / "instances").empty
    assert pa.Table.from_pandas(pd.read_parquet(tmp_path / "index" / "quarantine")).num_rows == 0
