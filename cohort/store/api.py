"""A small Python API over a store: list tables, read with filters, join clinical data.

>>> import cohort.store
>>> store = cohort.store.open("demo/store")
>>> store.tables()                      # feature sets with row counts
>>> df = store.read(columns=["patient_id", "roi", "original_shape_VoxelVolume"],
...                 filters=[("roi", "==", "GTV")])
>>> df = store.join_clinical(df, "demo/archive/clinical.csv", clinical_key="PatientID")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from cohort.errors import StoreError
from cohort.shard import KEY_COLUMNS
from cohort.store.layout import StoreLayout
from cohort.store.table import CompactResult, TableDir

Filters = Sequence[tuple[str, str, Any]]


class Store:
    """Read access (and compaction) for one store root."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError("store folder does not exist", subject=str(self.root))
        self.layout = StoreLayout(self.root)

    def table_names(self) -> list[str]:
        folder = self.root / "features"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.exists())

    def tables(self) -> pd.DataFrame:
        """One row per feature table: name, rows, parts, settings hash, path."""
        rows = []
        for name in self.table_names():
            table = TableDir(self.layout.features(name))
            files = table.parts()
            n_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
            head = table.read(["settings_hash"])
            digest = head.column("settings_hash")[0].as_py() if head is not None and head.num_rows else None
            rows.append(
                {
                    "table": name,
                    "rows": n_rows,
                    "parts": len(files),
                    "settings_hash": digest,
                    "path": str(table.path),
                }
            )
        return pd.DataFrame(rows, columns=["table", "rows", "parts", "settings_hash", "path"])

    def _table(self, table: str | None) -> TableDir:
        names = self.table_names()
        if table is None:
            if len(names) != 1:
                raise StoreError(
                    f"{len(names)} feature tables; name one of: {', '.join(names) or 'none'}",
                    subject=str(self.root),
                )
            table = names[0]
        if table not in names:
            raise StoreError(
                f"no feature table {table!r}; tables: {', '.join(names) or 'none'}", subject=str(self.root)
            )
        return TableDir(self.layout.features(table))

    def read(
        self,
        table: str | None = None,
        *,
        columns: Sequence[str] | None = None,
        filters: Filters | None = None,
    ) -> pd.DataFrame:
        """Rows of a feature table, one per (series, RTSTRUCT, ROI).

        ``filters`` are pyarrow/pandas style tuples, e.g. ``[("roi", "==", "GTV")]``.
        Rows are deduplicated by key (the latest ``processed_at`` wins) as a last line
        of defence for stores whose file system cannot lock (object stores).
        """
        target = self._table(table)
        wanted = None if columns is None else list(dict.fromkeys([*KEY_COLUMNS, *columns]))
        frame = pq.read_table(
            target.path, columns=wanted, filters=list(filters) if filters else None
        ).to_pandas()
        if "processed_at" in frame.columns:
            frame = frame.sort_values("processed_at", ascending=False)
        frame = frame.drop_duplicates(list(KEY_COLUMNS)).sort_values(list(KEY_COLUMNS)).reset_index(drop=True)
        return frame if columns is None else frame[list(columns)]

    def join_clinical(
        self,
        features: pd.DataFrame,
        clinical: pd.DataFrame | str | Path,
        *,
        key: str = "patient_id",
        clinical_key: str = "PatientID",
        how: str = "inner",
    ) -> pd.DataFrame:
        """Join a clinical table (a DataFrame or a CSV path) on the patient id."""
        table = pd.read_csv(clinical) if isinstance(clinical, str | Path) else clinical
        if clinical_key not in table.columns:
            raise StoreError(f"clinical table has no column {clinical_key!r}", subject=str(clinical)[:200])
        if table[clinical_key].duplicated().any():
            raise StoreError(f"clinical table repeats {clinical_key} values", subject=str(clinical)[:200])
        joined = features.merge(table, left_on=key, right_on=clinical_key, how=how)  # type: ignore[arg-type]
        return joined.drop(columns=[clinical_key]) if clinical_key != key else joined

    def failures(self, run_id: str | None = None) -> pd.DataFrame:
        folder = self.layout.failures(run_id) if run_id else self.layout.failures_root
        if not folder.exists():
            return pd.DataFrame()
        return pd.read_parquet(folder)

    def instances(self) -> pd.DataFrame:
        return pd.read_parquet(self.layout.instances)

    def runs(self) -> pd.DataFrame:
        """Summaries of every run in the store, newest last."""
        rows = []
        for path in sorted((self.root / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime):
            data = json.loads(path.read_text())
            data.pop("seconds", None)
            rows.append(data)
        return pd.DataFrame(rows)

    def compact(self, table: str | None = None) -> CompactResult:
        """Rewrite a feature table as one part (atomically; see :mod:`cohort.store.table`)."""
        return self._table(table).compact(KEY_COLUMNS)


def open_store(root: str | Path) -> Store:
    """Open a store root for reading (``cohort.store.open``)."""
    return Store(root)
