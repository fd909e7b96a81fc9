from __future__ import annotations

from pathlib import Path

import dask.dataframe as dd
import pandas as pd
import pyarrow as pa
import pytest

import cohort.store
from cohort.errors import StoreError
from cohort.shard import KEY_COLUMNS
from cohort.store.table import TableDir


def _features(n: int, roi: str, t: float = 0.0) -> pa.Table:
    return pa.table(
        {
            "patient_id": [f"P{i:03d}" for i in range(n)],
            "series_uid": [f"1.{i}" for i in range(n)],
            "rtstruct_uid": [f"2.{i}" for i in range(n)],
            "roi": [roi] * n,
            "roi_source": [roi.lower()] * n,
            "settings_hash": ["abc"] * n,
            "processed_at": pa.array([pd.Timestamp(t, unit="s", tz="UTC")] * n),
            "original_shape_VoxelVolume": [float(1000 + i) for i in range(n)],
        }
    )


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    table = TableDir(tmp_path / "features" / "radiomics-abc")
    table.append(_features(5, "GTV"), KEY_COLUMNS)
    table.append(_features(5, "Lung"), KEY_COLUMNS)
    return tmp_path


def test_tables_read_filters_and_columns(store_root: Path) -> None:
    store = cohort.store.open(store_root)
    tables = store.tables()
    assert tables[["table", "rows", "parts", "settings_hash"]].values.tolist() == [
        ["radiomics-abc", 10, 2, "abc"]
    ]
    gtv = store.read(columns=["patient_id", "original_shape_VoxelVolume"], filters=[("roi", "==", "GTV")])
    assert list(gtv.columns) == ["patient_id", "original_shape_VoxelVolume"]
    assert gtv["original_shape_VoxelVolume"].tolist() == [1000.0, 1001.0, 1002.0, 1003.0, 1004.0]
    # The same data through Dask and pandas directly.
    assert len(dd.read_parquet(tables.loc[0, "path"]).compute()) == 10
    assert len(pd.read_parquet(tables.loc[0, "path"])) == 10


def test_read_deduplicates_by_key_keeping_the_latest(store_root: Path) -> None:
    table = TableDir(store_root / "features" / "radiomics-abc")
    late = _features(1, "GTV", t=500.0).set_column(7, "original_shape_VoxelVolume", pa.array([7.0]))
    late.to_pandas().to_parquet(table.current() / "part-object-store-copy.parquet")
    frame = cohort.store.open(store_root).read()
    assert len(frame) == 10
    assert frame.set_index(["roi", "patient_id"]).loc[("GTV", "P000"), "original_shape_VoxelVolume"] == 7.0


def test_join_clinical_and_clear_errors(store_root: Path, tmp_path: Path) -> None:
    clinical = tmp_path / "clinical.csv"
    pd.DataFrame({"PatientID": ["P000", "P001", "P009"], "survival_days": [100, 200, 300]}).to_csv(
        clinical, index=False
    )
    store = cohort.store.open(store_root)
    joined = store.join_clinical(store.read(filters=[("roi", "==", "GTV")]), clinical)
    assert joined[["patient_id", "survival_days"]].values.tolist() == [["P000", 100], ["P001", 200]]
    with pytest.raises(StoreError, match="no feature table 'nope'"):
        store.read("nope")
    with pytest.raises(StoreError, match="no column 'PID'"):
        store.join_clinical(store.read(), clinical, clinical_key="PID")
    with pytest.raises(StoreError, match="does not exist"):
        cohort.store.open(tmp_path / "missing")
    result = store.compact()
    assert (result.parts_before, result.parts_after, result.rows) == (2, 1, 10)


def test_duckdb_and_polars_read_the_same_rows(store_root: Path) -> None:
    import duckdb
    import polars as pl

    path = cohort.store.open(store_root).tables().loc[0, "path"]
    query = "SELECT count(*), sum(original_shape_VoxelVolume) FROM read_parquet('{}/*.parquet') WHERE roi = ?"
    via_duckdb = duckdb.execute(query.format(path), ["GTV"]).fetchall()
    assert via_duckdb == [(5, 5010.0)]
    via_polars = pl.read_parquet(f"{path}/*.parquet").filter(pl.col("roi") == "Lung")
    assert via_polars.height == 5 and via_polars["original_shape_VoxelVolume"].sum() == 5010.0


def test_pseudonymised_stores_join_clinical_tables_through_the_same_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cohort.curate.deid import DeidSettings, pseudonym_for

    secret = "an-example-key-of-32-characters!"
    monkeypatch.setenv("COHORT_DEID_SECRET", secret)
    alias = pseudonym_for("P-7", DeidSettings(secret=secret.encode()))
    features = pd.DataFrame({"patient_id": [alias], "volume": [12.5]})
    clinical = pd.DataFrame({"PatientID": ["P-7", "P-8"], "event": [1, 0]})
    (tmp_path / "store").mkdir()
    store = cohort.store.open(tmp_path / "store")
    joined = store.join_clinical(features, clinical, pseudonymise=True)
    assert joined.to_dict("records") == [{"patient_id": alias, "volume": 12.5, "event": 1}]
    assert "P-7" not in joined.to_string()
