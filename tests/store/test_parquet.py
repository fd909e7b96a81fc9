from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa

from cohort.store.parquet import part_name, read_table, write_part


def _table(keys: list[str]) -> pa.Table:
    return pa.table(
        {
            "series_uid": keys,
            "rtstruct_uid": ["r"] * len(keys),
            "roi_source": ["GTV"] * len(keys),
            "value": [float(i) for i in range(len(keys))],
        }
    )


def test_rewriting_a_part_with_the_same_keys_replaces_it(tmp_path: Path) -> None:
    write_part(_table(["a", "b"]), tmp_path, ["a", "b"])
    write_part(_table(["a", "b"]), tmp_path, ["b", "a"])  # a retry of the same shard
    write_part(_table(["c"]), tmp_path, ["c"])
    df = pd.read_parquet(tmp_path)
    assert sorted(df["series_uid"]) == ["a", "b", "c"]
    keys = set(zip(df["series_uid"], df["roi_source"], strict=True))
    assert keys == {("a", "GTV"), ("b", "GTV"), ("c", "GTV")} and len(df) == 3


def test_hidden_temporary_files_are_invisible_to_readers(tmp_path: Path) -> None:
    write_part(_table(["a"]), tmp_path, ["a"])
    (tmp_path / ".part-x.parquet.123.tmp").write_bytes(b"PAR1 half written")
    assert len(pd.read_parquet(tmp_path)) == 1
    table = read_table(tmp_path)
    assert table is not None and table.num_rows == 1


def test_no_rows_write_nothing_and_missing_tables_read_as_none(tmp_path: Path) -> None:
    assert write_part(_table([]), tmp_path / "t", []) is None
    assert read_table(tmp_path / "t") is None
    assert part_name(["b", "a"]) == part_name(["a", "b"]) != part_name(["a"])
