"""Series selection and RTSTRUCT linking, on the index table alone (no pixel reads).

Every image series in the index gets one decision row saying whether it was
selected and why, so a curator can always answer "why is this case missing?".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from cohort.spec import CohortSpec

#: Acquisition metadata copied from the first slice of a series onto every
#: feature row (the batch variables of a later harmonisation).
METADATA_COLUMNS = (
    "series_description",
    "study_date",
    "institution",
    "manufacturer",
    "manufacturer_model",
    "convolution_kernel",
    "kvp",
    "exposure",
    "tube_current",
    "contrast_agent",
    "slice_thickness",
    "pixel_spacing_row",
    "pixel_spacing_col",
)

#: Modalities that annotate image series rather than being selectable images.
ANNOTATION_MODALITIES = frozenset({"RTSTRUCT", "SEG"})

DECISION_SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("study_uid", pa.string()),
        ("series_uid", pa.string()),
        ("modality", pa.string()),
        ("n_instances", pa.int64()),
        ("rtstruct_uid", pa.string()),
        ("selected", pa.bool_()),
        ("reason", pa.string()),
    ]
)


@dataclass(frozen=True)
class RoiSelection:
    """An RTSTRUCT ROI picked for extraction, under its harmonised name."""

    source_name: str
    canonical: str


@dataclass(frozen=True)
class WorkItem:
    """One image series with one RTSTRUCT and the ROIs to extract from it."""

    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    image_paths: tuple[str, ...]
    image_hash: str
    rtstruct_path: str
    rtstruct_uid: str
    rtstruct_hash: str
    rois: tuple[RoiSelection, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    role: str | None = None

    @property
    def n_slices(self) -> int:
        return len(self.image_paths)


def harmonise_roi_name(name: str, rois: Mapping[str, Sequence[str]]) -> str | None:
    """The canonical name whose patterns fully match ``name`` (case-insensitive), if any.

    Canonical names are tried in the order of the spec, and their patterns in order.
    """
    cleaned = " ".join(name.split())
    for canonical, patterns in rois.items():
        for pattern in patterns:
            if re.fullmatch(pattern, cleaned, flags=re.IGNORECASE):
                return canonical
    return None


def series_role(description: Any, roles: Mapping[str, str]) -> str | None:
    """The first role whose pattern is found (case-insensitive) in the series description."""
    text = (
        ""
        if description is None or (isinstance(description, float) and pd.isna(description))
        else str(description)
    )
    for role, pattern in roles.items():
        if re.search(pattern, text, flags=re.IGNORECASE):
            return role
    return None


def series_hash(sop_uids: Sequence[str], file_hashes: Sequence[str]) -> str:
    """Content hash of a series: sha256 over its instances' (SOP UID, file sha256), sorted."""
    digest = hashlib.sha256()
    for uid, sha in sorted(zip(sop_uids, file_hashes, strict=True)):
        digest.update(f"{uid}:{sha}\n".encode())
    return digest.hexdigest()


def _none_if_na(value: Any) -> Any:
    """Plain Python scalars for the metadata mapping (None for missing)."""
    if value is None or (not isinstance(value, list | tuple) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def plan_work(instances: pa.Table | pd.DataFrame, spec: CohortSpec) -> tuple[list[WorkItem], pa.Table]:
    """Select image series and link each to its RTSTRUCT(s).

    Returns the work items (one per series × RTSTRUCT) and the decision table
    (one row per image series × RTSTRUCT considered, with the reason).
    """
    df = instances.to_pandas() if isinstance(instances, pa.Table) else instances
    decisions: list[dict[str, Any]] = []
    items: list[WorkItem] = []
    if df.empty:
        return items, pa.Table.from_pylist([], schema=DECISION_SCHEMA)

    structs = df[df["modality"] == "RTSTRUCT"]
    # Every series that is not an annotation gets a decision (an RTDOSE grid included).
    images = df[~df["modality"].isin(list(ANNOTATION_MODALITIES))]
    links: dict[str, list[pd.Series]] = {}
    image_series_by_for: dict[str, set[str]] = {}
    selectable = images[images["modality"] == spec.selection.modality]
    for series_uid, group in selectable.groupby("series_uid", sort=True):
        for_uid = group["frame_of_reference_uid"].dropna()
        if not for_uid.empty:
            image_series_by_for.setdefault(str(for_uid.iloc[0]), set()).add(str(series_uid))
    for _, rs in structs.sort_values("path").iterrows():
        refs = list(rs["referenced_series_uids"]) if rs["referenced_series_uids"] is not None else []
        if not refs and rs["frame_of_reference_uid"]:
            candidates = image_series_by_for.get(str(rs["frame_of_reference_uid"]), set())
            refs = sorted(candidates) if len(candidates) == 1 else []
        for ref in refs:
            links.setdefault(str(ref), []).append(rs)

    roles = spec.selection.roles
    borrowed: dict[str, str] = {}
    if roles:
        # A series with a role but no structure set of its own takes the contours of a
        # structure set on another series of the same study and frame of reference
        # (contours are in patient coordinates, so they rasterise onto any such grid).
        firsts = selectable.sort_values("path").groupby("series_uid", sort=True).first()
        for series_uid, first in firsts.iterrows():
            if str(series_uid) in links:
                continue
            for other_uid, other in firsts.iterrows():
                same_frame = other["frame_of_reference_uid"] == first["frame_of_reference_uid"]
                if other_uid != series_uid and other["study_uid"] == first["study_uid"] and same_frame:
                    for rs in links.get(str(other_uid), []):
                        links.setdefault(str(series_uid), []).append(rs)
                        borrowed[str(series_uid)] = str(other_uid)

    pattern = re.compile(spec.selection.require_roi)
    for series_uid, group in images.groupby("series_uid", sort=True):
        group = group.sort_values("path")
        first = group.iloc[0]
        base = {
            "patient_id": first["patient_id"],
            "study_uid": first["study_uid"],
            "series_uid": series_uid,
            "modality": first["modality"],
            "n_instances": len(group),
            "rtstruct_uid": None,
        }
        if first["modality"] != spec.selection.modality:
            decisions.append(
                {
                    **base,
                    "selected": False,
                    "reason": f"modality {first['modality']} is not {spec.selection.modality}",
                }
            )
            continue
        role = series_role(first["series_description"], roles)
        if roles and role is None:
            decisions.append(
                {
                    **base,
                    "selected": False,
                    "reason": f"series description {first['series_description']!r} matches no role "
                    f"({', '.join(roles)})",
                }
            )
            continue
        linked = links.get(str(series_uid), [])
        if not linked:
            decisions.append({**base, "selected": False, "reason": "no RTSTRUCT references this series"})
            continue
        for rs in linked:
            names = list(rs["roi_names"]) if rs["roi_names"] is not None else []
            chosen = []
            for name in names:
                canonical = harmonise_roi_name(name, spec.rois)
                if canonical is not None:
                    chosen.append(RoiSelection(name, canonical))
            row = {**base, "rtstruct_uid": rs["sop_instance_uid"]}
            if not any(pattern.fullmatch(r.canonical) for r in chosen):
                decisions.append(
                    {
                        **row,
                        "selected": False,
                        "reason": f"RTSTRUCT has no ROI harmonised to {spec.selection.require_roi!r} "
                        f"(ROIs: {', '.join(names) or 'none'})",
                    }
                )
                continue
            reason = "ROIs " + ", ".join(f"{r.source_name} -> {r.canonical}" for r in chosen)
            if role is not None:
                reason = f"role {role}; " + reason
            if str(series_uid) in borrowed:
                reason += f"; contours of the structure set on series {borrowed[str(series_uid)]}"
            decisions.append({**row, "selected": True, "reason": reason})
            items.append(
                WorkItem(
                    patient_id=str(first["patient_id"]),
                    study_uid=str(first["study_uid"]),
                    series_uid=str(series_uid),
                    modality=str(first["modality"]),
                    image_paths=tuple(group["path"]),
                    image_hash=series_hash(list(group["sop_instance_uid"]), list(group["sha256"])),
                    rtstruct_path=str(rs["path"]),
                    rtstruct_uid=str(rs["sop_instance_uid"]),
                    rtstruct_hash=str(rs["sha256"]),
                    rois=tuple(chosen),
                    metadata={key: _none_if_na(first[key]) for key in METADATA_COLUMNS},
                    role=role,
                )
            )
    return items, pa.Table.from_pylist(decisions, schema=DECISION_SCHEMA)
