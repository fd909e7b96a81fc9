from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from cohort.store.table import COMPACT_AFTER_PARTS, TableDir
from flows.process_cohort import compact_if_fragmented
from tests.store.test_table import KEYS, _rows


def test_a_run_compacts_a_table_only_once_it_is_fragmented(tmp_path: Path) -> None:
    table = TableDir(tmp_path / "t")
    for i in range(COMPACT_AFTER_PARTS):
        table.append(_rows([i]), KEYS)
    compact_if_fragmented(table, KEYS, logging.getLogger("test"))
    assert len(table.parts()) == COMPACT_AFTER_PARTS  # not yet
    table.append(_rows([COMPACT_AFTER_PARTS]), KEYS)
    compact_if_fragmented(table, KEYS, logging.getLogger("test"))
    assert len(table.parts()) == 1
    assert len(pd.read_parquet(table.path)) == COMPACT_AFTER_PARTS + 1
