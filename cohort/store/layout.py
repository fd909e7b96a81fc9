"""Where things live under a store root.

::

    <store>/
      index/instances/part-NN.parquet   one row per DICOM instance of the archive (partitioned)
      index/quarantine/part-NN.parquet  files that could not be indexed, with the reason
      index/changes/<run>.parquet       files added, changed, deleted by each index update
      features/<feature set>/        one table per radiomics settings hash
          part-<shard key>.parquet
      failures/<run id>/part-*.parquet   one row per failed (case, ROI, stage)
      stability/<feature set>/           features under each perturbation (when enabled)
      stability-icc/<feature set>.parquet   per-feature ICC across perturbations
      runs/<run id>/selection.parquet    one row per image series: selected or not, why
      runs/<run id>/summary.json         counts and timings of the run

Every folder is a Parquet dataset that ``pandas.read_parquet(folder)`` reads. The
root is a local folder or an object-store URL (``s3://bucket/prefix``; see
:mod:`cohort.store.location`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cohort.store.location import Location


@dataclass(frozen=True)
class StoreLayout:
    root: Location

    @classmethod
    def at(cls, root: str | os.PathLike[str] | Location) -> StoreLayout:
        return cls(Location.parse(root))

    @property
    def index_dir(self) -> Location:
        return self.root / "index"

    @property
    def instances(self) -> Location:
        return self.index_dir / "instances"

    @property
    def quarantine(self) -> Location:
        return self.index_dir / "quarantine"

    def features(self, feature_set: str) -> Location:
        return self.root / "features" / feature_set

    def stability(self, feature_set: str) -> Location:
        return self.root / "stability" / feature_set

    def stability_icc(self, feature_set: str) -> Location:
        return self.root / "stability-icc" / f"{feature_set}.parquet"

    def failures(self, run_id: str) -> Location:
        return self.root / "failures" / run_id

    @property
    def failures_root(self) -> Location:
        return self.root / "failures"

    def run_dir(self, run_id: str) -> Location:
        return self.root / "runs" / run_id
