"""The store on a real S3 server (SeaweedFS on loopback): the same guarantees as on a local folder."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import cohort.store
from cohort.shard import KEY_COLUMNS
from cohort.store.location import Location
from cohort.store.objects import Commit, ObjectTable, open_table
from cohort.store.parquet import read_table, write_part
from tests.s3server import S3Server, bucket_url

KEYS = list(KEY_COLUMNS)
pytestmark = pytest.mark.s3


def _rows(ids: list[int], payload: int = 8, stamp: float = 0.0) -> pa.Table:
    return pa.table(
        {
            "series_uid": [f"s{i:05d}" for i in ids],
            "rtstruct_uid": ["r1"] * len(ids),
            "roi_source": ["GTV"] * len(ids),
            "processed_at": pa.array([pd.Timestamp(stamp, unit="s", tz="UTC")] * len(ids)),
            **{f"f{j}": np.full(len(ids), float(j)) for j in range(payload)},
        }
    )


@pytest.fixture
def store_url(s3_server: S3Server) -> str:
    return bucket_url(s3_server, "cohort-tests", f"store-{uuid.uuid4().hex[:8]}")


def _raw(url: str, columns: list[str] | None = None) -> pd.DataFrame:
    """What a user's plain pandas call sees (credentials and endpoint from the AWS environment)."""
    return pd.read_parquet(url, columns=columns)


def test_locations_parse_urls_and_write_whole_objects(store_url: str) -> None:
    where = Location.parse(store_url)
    assert not where.is_local and where.url == store_url
    write_part(_rows([1, 2]), where / "failures" / "run", ["a", "b"])
    write_part(_rows([1, 2]), where / "failures" / "run", ["b", "a"])  # a retry replaces its own part
    table = read_table(where / "failures" / "run")
    assert table is not None and table.num_rows == 2
    assert (where / "x.json").create_exclusive(b"1") and not (where / "x.json").create_exclusive(b"2")
    assert (where / "x.json").read_bytes() == b"1"


def test_appends_add_each_key_once_and_plain_pandas_reads_the_table(store_url: str) -> None:
    table = open_table(f"{store_url}/features/t")
    assert isinstance(table, ObjectTable)
    first = table.append(_rows([1, 2, 3]), KEYS)
    second = table.append(_rows([2, 3, 4, 5]), KEYS)
    again = table.append(_rows([1, 5]), KEYS)
    assert (first.written, second.written, second.skipped_existing) == (3, 2, 2)
    assert (again.written, again.skipped_existing) == (0, 2)
    frame = _raw(f"{store_url}/features/t", KEYS)
    assert sorted(frame["series_uid"]) == [f"s{i:05d}" for i in (1, 2, 3, 4, 5)]
    assert table.row_count() == 5 and table.part_count() == 2
    store = cohort.store.open(store_url)
    assert store.table_names() == ["t"]
    assert store.tables().loc[0, "rows"] == 5
    read = store.read("t", columns=["f3"], filters=[("series_uid", ">=", "s00003")])
    assert read["f3"].tolist() == [3.0, 3.0, 3.0]


def test_a_commit_left_unpublished_by_a_crash_is_read_by_the_api_and_published_by_the_next_writer(
    store_url: str,
) -> None:
    table = ObjectTable(Location.parse(f"{store_url}/features/t"))
    table.append(_rows([1, 2]), KEYS)
    # A writer that died between its commit and its publication:
    state = table.latest()
    part = table._stage(_rows([3, 4]), KEYS, "part-crashed.parquet")
    parts = {**state.parts, "part-crashed.parquet": part}
    assert table._commit(Commit(state.version + 1, parts, op="append"))
    assert len(_raw(f"{store_url}/features/t", KEYS)) == 2  # not visible to a listing yet
    assert len(cohort.store.open(store_url).read("t")) == 4  # the API follows the log
    assert table.append(_rows([4, 5]), KEYS).written == 1  # sees key 4 as present; publishes the rest
    assert sorted(_raw(f"{store_url}/features/t", KEYS)["series_uid"]) == [f"s{i:05d}" for i in range(1, 6)]


def test_compaction_replaces_parts_and_a_stale_publisher_cannot_resurrect_them(store_url: str) -> None:
    url = f"{store_url}/features/t"
    table = ObjectTable(Location.parse(url))
    for start in range(0, 60, 10):
        table.append(_rows(list(range(start, start + 10)), stamp=1.0), KEYS)
    stale = table.latest()
    result = table.compact(KEYS)
    assert (result.parts_before, result.parts_after, result.rows) == (6, 1, 60)
    listed = [e.name for e in Location.parse(url).listdir()]
    assert len(listed) == 1 and len(_raw(url, KEYS)) == 60
    # A publisher that read the log before the compaction copies its old parts back …
    for name, part in stale.parts.items():
        table.where.fs.copy(table._object(part.data).path, (table.where / name).path)
    assert len(_raw(url, KEYS)) == 120
    table.publish()  # … and any publication removes them again (they are retired in the log)
    assert len(_raw(url, KEYS)) == 60


def _writer(url: str, seed: int, n_keys: int, env: dict[str, str]) -> None:
    os.environ.update(env)
    rng = np.random.default_rng(seed)
    table = open_table(url)
    for _ in range(12):
        ids = sorted(rng.choice(n_keys, size=15, replace=False).tolist())
        table.append(_rows(ids), KEYS)


def test_two_writers_at_once_add_each_key_once(store_url: str, s3_server: S3Server) -> None:
    url = f"{store_url}/features/t"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, seed, 100, s3_server.env)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0
    expected: set[int] = set()
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        for _ in range(12):
            expected |= set(rng.choice(100, size=15, replace=False).tolist())
    frame = _raw(url, KEYS)
    assert sorted(frame["series_uid"]) == [f"s{i:05d}" for i in sorted(expected)]
    assert open_table(url).row_count() == len(expected)


def _slow_writer(url: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    table = open_table(url)
    table.append(_rows(list(range(10))), KEYS)
    while True:  # killed from outside while writing big parts
        table.append(_rows(list(range(10, 100_000)), payload=40), KEYS)


def test_a_writer_killed_mid_write_leaves_no_partial_rows_and_a_rerun_completes(
    store_url: str, s3_server: S3Server
) -> None:
    url = f"{store_url}/features/t"
    proc = mp.get_context("spawn").Process(target=_slow_writer, args=(url, s3_server.env))
    proc.start()
    staging = Location.parse(f"{store_url}/features/.t.staging")
    deadline = time.time() + 90
    while time.time() < deadline and len(staging.listdir()) < 2:  # first part staged, big one under way
        time.sleep(0.02)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert len(_raw(url, KEYS)) in (10, 100_000)
    table = open_table(url)
    result = table.append(_rows(list(range(100_000)), payload=40), KEYS)
    assert result.written + result.skipped_existing == 100_000
    final = _raw(url, KEYS)
    assert len(final) == 100_000 and not final.duplicated().any()
    assert table.compact(KEYS).rows == 100_000
    assert len(_raw(url, KEYS)) == 100_000


def test_a_row_made_from_changed_inputs_replaces_the_committed_one(store_url: str) -> None:
    url = f"{store_url}/features/t"
    table = open_table(url)

    def versioned(ids: list[int], version: str) -> pa.Table:
        return _rows(ids).append_column("image_hash", pa.array([version] * len(ids)))

    table.append(versioned([1, 2, 3], "a"), KEYS, ["image_hash"])
    assert table.append(versioned([1, 2], "a"), KEYS, ["image_hash"]).skipped_existing == 2
    changed = table.append(versioned([2, 4], "b"), KEYS, ["image_hash"])
    assert (changed.written, changed.replaced) == (1, 1)
    frame = _raw(url).set_index("series_uid")
    assert sorted(frame.index) == ["s00001", "s00002", "s00003", "s00004"]
    assert frame.loc["s00002", "image_hash"] == "b" and frame.loc["s00003", "image_hash"] == "a"
    assert len(cohort.store.open(store_url).read("t")) == 4
