"""A small Python API over a store: list tables, read with filters, join clinical data.

>>> import cohort.store
>>> store = cohort.store.open("demo/store")          # or "s3://bucket/prefix"
>>> store.tables()                      # feature sets with row counts
>>> df = store.read(columns=["patient_id", "roi", "original_shape_VoxelVolume"],
...                 filters=[("roi", "==", "GTV")])
>>> df = store.join_clinical(df, "demo/archive/clinical.csv", clinical_key="PatientID")
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from cohort.errors import StoreError
from cohort.shard import KEY_COLUMNS, VERSION_COLUMNS
from cohort.store.layout import StoreLayout
from cohort.store.location import Location
from cohort.store.objects import FeatureTable, open_table
from cohort.store.parquet import read_table
from cohort.store.table import CompactResult

Filters = Sequence[tuple[str, str, Any]]


class Store:
    """Read access (and compaction) for one store root, local or on an object store."""

    def __init__(self, root: str | os.PathLike[str] | Location) -> None:
        self.root = Location.parse(root)
        if not self.root.exists():
            raise StoreError("store does not exist", subject=self.root.url)
        self.layout = StoreLayout(self.root)

    def table_names(self) -> list[str]:
        """Feature tables: visible folders, and (object stores) tables known by their commit log."""
        names = set()
        for entry in (self.root / "features").listdir():
            if not entry.name.startswith("."):
                names.add(entry.name)
            elif entry.name.endswith(".log") and not self.root.is_local:
                names.add(entry.name[1:].removesuffix(".log"))
        return sorted(n for n in names if open_table(self.layout.features(n)).exists())

    def tables(self) -> pd.DataFrame:
        """One row per feature table: name, rows, parts, settings hash, path."""
        rows = []
        for name in self.table_names():
            table = open_table(self.layout.features(name))
            dataset = table.dataset()
            digest = None
            if dataset is not None and "settings_hash" in dataset.schema.names:
                head = dataset.head(1, columns=["settings_hash"])
                digest = head.column("settings_hash")[0].as_py() if head.num_rows else None
            rows.append(
                {
                    "table": name,
                    "rows": table.row_count(),
                    "parts": table.part_count(),
                    "settings_hash": digest,
                    "path": table.url,
                }
            )
        return pd.DataFrame(rows, columns=["table", "rows", "parts", "settings_hash", "path"])

    def _table(self, table: str | None) -> FeatureTable:
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
                f"no feature table {table!r}; tables: {', '.join(names) or 'none'}", subject=self.root.url
            )
        return open_table(self.layout.features(table))

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
        of defence.
        """
        dataset = self._table(table).dataset()
        wanted = None if columns is None else list(dict.fromkeys([*KEY_COLUMNS, *columns]))
        if dataset is None:
            return pd.DataFrame(columns=wanted or list(KEY_COLUMNS))
        expression = pq.filters_to_expression(list(filters)) if filters else None
        frame = dataset.to_table(columns=wanted, filter=expression).to_pandas()
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
        pseudonymise: bool = False,
        secret_env: str = "COHORT_DEID_SECRET",
    ) -> pd.DataFrame:
        """Join a clinical table (a DataFrame or a CSV path) on the patient id.

        With ``pseudonymise`` (a store written with ``privacy.patient_ids: pseudonymise``)
        the clinical IDs are turned into the same keyed pseudonyms first, with the key
        in ``secret_env``; the result holds pseudonyms only.
        """
        table = pd.read_csv(clinical) if isinstance(clinical, str | Path) else clinical
        if clinical_key not in table.columns:
            raise StoreError(f"clinical table has no column {clinical_key!r}", subject=str(clinical)[:200])
        if pseudonymise:
            from cohort.curate.deid import DeidSettings, pseudonym_for

            secret = os.environ.get(secret_env)
            if not secret:
                raise StoreError(f"set {secret_env} to the store's pseudonym key", subject=secret_env)
            pseudonym_key = DeidSettings(secret=secret.encode())
            aliases = [pseudonym_for(str(v), pseudonym_key) for v in table[clinical_key]]
            table = table.assign(**{clinical_key: aliases})
        if table[clinical_key].duplicated().any():
            raise StoreError(f"clinical table repeats {clinical_key} values", subject=str(clinical)[:200])
        joined = features.merge(table, left_on=key, right_on=clinical_key, how=how)  # type: ignore[arg-type]
        return joined.drop(columns=[clinical_key]) if clinical_key != key else joined

    def failures(self, run_id: str | None = None) -> pd.DataFrame:
        table = read_table(self.layout.failures(run_id) if run_id else self.layout.failures_root)
        return pd.DataFrame() if table is None else table.to_pandas()

    def instances(self) -> pd.DataFrame:
        """The archive index: one row per DICOM instance (absolute paths for a local store)."""
        if self.root.is_local and (self.layout.index_dir / "manifest.json").exists():
            from cohort.index import read_instances

            return read_instances(self.layout.index_dir.local_path(), absolute_paths=True).to_pandas()
        table = read_table(self.layout.instances)
        if table is None:
            raise StoreError("the store has no index yet", subject=self.layout.instances.url)
        return table.to_pandas()

    def runs(self) -> pd.DataFrame:
        """Summaries of every run in the store, newest last."""
        summaries = [run / "summary.json" for run in (self.root / "runs").listdir()]
        rows = []
        for path in sorted((p for p in summaries if p.exists()), key=Location.modified):
            data = json.loads(path.read_text())
            data.pop("seconds", None)
            rows.append(data)
        return pd.DataFrame(rows)

    def compact(self, table: str | None = None) -> CompactResult:
        """Rewrite a feature table as one part (atomically; see :mod:`cohort.store.table`)."""
        return self._table(table).compact(KEY_COLUMNS, version_columns=VERSION_COLUMNS)


def open_store(root: str | os.PathLike[str] | Location) -> Store:
    """Open a store root, a folder or ``s3://bucket/prefix`` (``cohort.store.open``)."""
    return Store(root)
