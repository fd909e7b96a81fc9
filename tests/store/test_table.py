"""Versioned tables: no duplicates and no partial files, whatever the writers do."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from cohort.errors import StoreError
from cohort.store.table import TableDir

KEYS = ["series_uid", "roi_source"]


def _rows(ids: list[int], payload: int = 8, stamp: float = 0.0) -> pa.Table:
    return pa.table(
        {
            "series_uid": [f"s{i:05d}" for i in ids],
            "roi_source": ["GTV"] * len(ids),
            "processed_at": pa.array([pd.Timestamp(stamp, unit="s", tz="UTC")] * len(ids)),
            **{f"f{j}": np.full(len(ids), float(j)) for j in range(payload)},
        }
    )


def _writer(path: str, seed: int, n_keys: int) -> None:
    rng = np.random.default_rng(seed)
    table = TableDir(path)
    for _ in range(20):
        ids = sorted(rng.choice(n_keys, size=15, replace=False).tolist())
        table.append(_rows(ids), KEYS)


def test_two_writers_at_once_add_each_key_once(tmp_path: Path) -> None:
    path = tmp_path / "features" / "t"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), seed, 120)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    expected: set[int] = set()
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        for _ in range(20):
            expected |= set(rng.choice(120, size=15, replace=False).tolist())
    frame = pd.read_parquet(path)
    assert len(frame) == len(expected)
    assert sorted(frame["series_uid"]) == [f"s{i:05d}" for i in sorted(expected)]


def _slow_writer(path: str) -> None:
    table = TableDir(path)
    table.append(_rows(list(range(10))), KEYS)
    while True:  # killed from outside while writing big parts
        table.append(_rows(list(range(10, 200_000)), payload=40), KEYS)


def test_a_writer_killed_mid_write_leaves_no_partial_rows_and_a_rerun_completes(tmp_path: Path) -> None:
    path = tmp_path / "features" / "t"
    proc = mp.get_context("spawn").Process(target=_slow_writer, args=(str(path),))
    proc.start()
    version = tmp_path / "features" / ".t.versions" / "v000001"
    deadline = time.time() + 60

    def writing_the_big_part() -> bool:  # the first part is in place and a later one is being written
        return any(version.glob("part-*.parquet")) and any(version.glob(".part-*.tmp"))

    while time.time() < deadline and not writing_the_big_part():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    frame = pd.read_parquet(path)
    assert len(frame) in (10, 200_000)  # the first part, and the big one only if it got renamed in
    table = TableDir(path)
    result = table.append(_rows(list(range(200_000)), payload=40), KEYS)
    assert result.written + result.skipped_existing == 200_000
    final = pd.read_parquet(path, columns=KEYS)
    assert len(final) == 200_000 and not final.duplicated().any()
    compacted = table.compact(KEYS)
    assert compacted.rows == 200_000 and compacted.parts_after == 1


def test_readers_never_see_duplicates_while_compaction_swaps_versions(tmp_path: Path) -> None:
    table = TableDir(tmp_path / "t")
    for start in range(0, 300, 10):
        table.append(_rows(list(range(start, start + 10))), KEYS)
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                frame = pd.read_parquet(table.path, columns=KEYS)
                seen.append(len(frame))
                assert not frame.duplicated().any()
            except FileNotFoundError:  # an old version removed under a slow reader: retried
                continue
            except BaseException as exc:
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    for _ in range(15):
        table.compact(KEYS)
    stop.set()
    thread.join()
    assert not errors
    assert seen and set(seen) == {300}
    assert len(table.parts()) == 1
    assert (
        len([v for v in table.versions.iterdir() if not v.name.endswith(".keys")]) == 2
    )  # current + previous


def test_compaction_keeps_the_latest_row_per_key(tmp_path: Path) -> None:
    table = TableDir(tmp_path / "t")
    table.append(_rows([1, 2], stamp=100.0), KEYS)
    # A store written without the lock (an object store) could hold a second copy of a key.
    extra = _rows([2], stamp=200.0).set_column(3, "f0", pa.array([42.0]))
    extra_path = table.current() / "part-manual.parquet"
    pd.DataFrame(extra.to_pandas()).to_parquet(extra_path)
    assert len(pd.read_parquet(table.path)) == 3
    result = table.compact(KEYS)
    assert (result.rows, result.duplicates_removed) == (2, 1)
    frame = pd.read_parquet(table.path).set_index("series_uid")
    assert frame.loc["s00002", "f0"] == 42.0


def test_append_refuses_repeated_keys_and_plain_folders(tmp_path: Path) -> None:
    table = TableDir(tmp_path / "t")
    with pytest.raises(StoreError, match="repeat a key"):
        table.append(_rows([1, 1]), KEYS)
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="plain folder"):
        TableDir(tmp_path / "plain").append(_rows([1]), KEYS)


def test_appends_look_up_keys_in_narrow_side_files_and_survive_a_missing_one(tmp_path: Path) -> None:
    table = TableDir(tmp_path / "t")
    first = table.append(_rows([1, 2, 3], payload=50), KEYS)
    table.append(_rows([4, 5], payload=50), KEYS)
    assert first.path is not None
    part = Path(first.path)
    side = part.parent.parent / f"{part.parent.name}.keys" / part.name
    assert pd.read_parquet(side).columns.tolist() == KEYS
    side.unlink()  # as if the writer died between the part and its key file
    again = table.append(_rows([1, 2, 3, 6], payload=50), KEYS)
    assert (again.written, again.skipped_existing) == (1, 3)
    assert sorted(pd.read_parquet(table.path)["series_uid"]) == [f"s{i:05d}" for i in range(1, 7)]


def _versioned(ids: list[int], version: str, stamp: float) -> pa.Table:
    rows = _rows(ids, stamp=stamp)
    return rows.append_column("image_hash", pa.array([version] * len(ids)))


def test_a_row_made_from_changed_inputs_replaces_the_stored_one_in_one_swap(tmp_path: Path) -> None:
    table = TableDir(tmp_path / "t")
    table.append(_versioned([1, 2, 3], "a", 1.0), KEYS, ["image_hash"])
    table.append(_versioned([4, 5], "a", 1.0), KEYS, ["image_hash"])
    unchanged = table.append(_versioned([1, 2], "a", 2.0), KEYS, ["image_hash"])
    assert (unchanged.written, unchanged.skipped_existing, unchanged.replaced) == (0, 2, 0)
    before = table.current()
    changed = table.append(_versioned([2, 6], "b", 2.0), KEYS, ["image_hash"])
    assert (changed.written, changed.replaced, changed.skipped_existing) == (1, 1, 0)
    assert table.current() != before  # a new version: readers saw the old table or the new one
    frame = pd.read_parquet(table.path).set_index("series_uid")
    assert sorted(frame.index) == [f"s{i:05d}" for i in (1, 2, 3, 4, 5, 6)]
    assert frame.loc["s00002", "image_hash"] == "b" and frame.loc["s00001", "image_hash"] == "a"
    assert table.key_versions(KEYS, ["image_hash"])[("s00002", "GTV")] == ("b",)
    # The untouched part is shared with the old version (hard link), not copied.
    untouched = [p for p in table.parts() if p.stat().st_nlink > 1]
    assert len(untouched) == 1
