"""Plain helpers a cohort run needs between stages: skip done work, summarise."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cohort.curate.select import WorkItem
from cohort.store.location import Location


def _only_itself(source: str, canonical: str) -> list[str]:
    return [source]


def remaining_work(
    items: Sequence[WorkItem],
    done: Mapping[tuple[str, ...], tuple[str, ...]] | set[tuple[str, ...]],
    keys_of: Callable[[str, str], list[str]] = _only_itself,
) -> tuple[list[WorkItem], int]:
    """Drop ROIs whose (series, RTSTRUCT, ROI) rows are in the store already, made from the same inputs.

    ``done`` maps each stored key to its input content hashes (``image_hash``,
    ``rtstruct_hash``; empty when unknown). A ROI whose stored row was made from
    other inputs (a slice added or replaced, a contour edited) is redone, and its
    new row replaces the old one. ``keys_of(source name, canonical name)`` lists
    the ``roi_source`` keys an RTSTRUCT ROI produces (itself, and its sub-volumes
    when configured). Returns the items still to process (with only their
    unfinished ROIs) and the number of ROIs skipped because they are done.
    """
    versions = done if isinstance(done, Mapping) else dict.fromkeys(done, ())
    todo: list[WorkItem] = []
    skipped = 0
    for item in items:
        current = (item.image_hash, item.rtstruct_hash)

        def is_done(key: tuple[str, ...], current: tuple[str, str] = current) -> bool:
            stored = versions.get(key)
            return stored is not None and (not stored or tuple(stored) == current)

        missing = tuple(
            r
            for r in item.rois
            if not all(
                is_done((item.series_uid, item.rtstruct_uid, key))
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
    rows_replaced: int = 0

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
