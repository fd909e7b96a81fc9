"""Writing a shard's results into the store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cohort.shard import KEY_COLUMNS, VERSION_COLUMNS, ShardResult, ShardSettings
from cohort.store.layout import StoreLayout
from cohort.store.objects import open_table
from cohort.store.parquet import write_part

#: Key of a perturbed-feature row.
STABILITY_KEY_COLUMNS = (*KEY_COLUMNS, "perturbation")


@dataclass(frozen=True)
class ShardWrite:
    rows_written: int
    rows_already_present: int
    rows_replaced: int = 0


def write_shard_result(
    layout: StoreLayout, settings: ShardSettings, result: ShardResult, keys: Sequence[str]
) -> ShardWrite:
    """Append features (and perturbed features) once per key; record failures of this run."""
    features = open_table(layout.features(settings.feature_set))
    appended = features.append(result.features, KEY_COLUMNS, VERSION_COLUMNS)
    write_part(result.failures, layout.failures(settings.run_id), keys)
    if result.stability is not None:
        stability = open_table(layout.stability(settings.feature_set))
        stability.append(result.stability, STABILITY_KEY_COLUMNS, VERSION_COLUMNS)
    return ShardWrite(appended.written, appended.skipped_existing, appended.replaced)
