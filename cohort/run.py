"""Plain helpers a cohort run needs between stages: skip done work, summarise."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cohort.curate.select import WorkItem
from cohort.store.location import Location


def _only_itself(source: str, canonical: str) -> list[str]:
    return [source]


def remaining_work(
    items: Sequence[WorkItem],
    done: set[tuple[str, ...]],
    keys_of: Callable[[str, str], list[str]] = _only_itself,
) -> tuple[list[WorkItem], int]:
    """Drop ROIs whose (series, RTSTRUCT, ROI) rows are all in the store already.

    ``keys_of(source name, canonical name)`` lists the ``roi_source`` keys an
    RTSTRUCT ROI produces (itself, and its sub-volumes when configured). Returns
    the items still to process (with only their unfinished ROIs) and the number
    of ROIs skipped because they are done.
    """
    todo: list[WorkItem] = []
    skipped = 0
    for item in items:
        missing = tuple(
            r
            for r in item.rois
            if any(
                (item.series_uid, item.rtstruct_uid, key) not in done
                for key in keys_of(r.source_name, r.canonical)
            )
        )
        skipped += len(item.rois) - len(missing)
        if missing:
            todo.append(dataclasses.replace(item, rois=missing))
    return todo, skipped


@dataclass(frozen=True)
class RunSummary:
    """What a cohort run did, as printed by the CLI and saved in ``runs/<id>/summary.json``."""

    run_id: str
    store: str
    feature_set: str
    feature_table: str
    files_seen: int
    files_quarantined: int
    image_series: int
    cases_selected: int
    cases_processed: int
    cases_failed: int
    cases_skipped: int
    rows_written: int
    rows_skipped: int
    failures: int
    shards: int
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def write(self, folder: Location) -> Location:
        path = folder / "summary.json"
        path.write_bytes_atomic(self.to_json().encode())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        return cls(**data)


def add_seconds(total: dict[str, float], more: Iterable[tuple[str, float]]) -> None:
    for key, value in more:
        total[key] = total.get(key, 0.0) + value
