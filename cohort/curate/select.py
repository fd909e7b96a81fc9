"""Series selection and RTSTRUCT / SEG linking, on the index table alone (no pixel reads).

Every image series in the index gets one decision row per structure set
considered, saying whether it was selected and why, so a curator can always
answer "why is this case missing?". The steps, in order (the first that fails
is the ``step`` of the row):

1. modality (``selection.modality``, or ``qc.modality``);
2. split: a series of mixed geometries, or of acquisitions / temporal positions
   that each cover the stack, becomes sub-series ``<uid>#geo1``, ``#acq2``, ``#t3``
   (:func:`cohort.curate.geometry.split_series`); each is decided on its own;
3. quality checks (:mod:`cohort.curate.qc`, the ``qc:`` spec), geometry included;
4. role (``selection.roles``);
5. link: an RTSTRUCT or SEG referencing the series (ReferencedSeriesInstanceUID),
   or, when it references no series of the archive, the one image series of
   its FrameOfReferenceUID (the link used is recorded);
6. ROI: the structure set has an ROI harmonised to ``selection.require_roi``;
7. per patient (``selection.per_patient``): e.g. the thinnest of the rest.

With automatic segmentation (``segmentation.model``), every selected
(sub-)series also gets one *automatic* work item: no structure set
(``rtstruct_uid`` empty) and the single ROI ``model:<model name>`` under the
canonical name ``segmentation.roi``. With ``segmentation.unannotated`` a series
that fails only the link or ROI step is selected for that item alone.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import pandas as pd
import pyarrow as pa

from cohort.curate.geometry import ReadPolicy, SubSeries, split_series
from cohort.curate.qc import (
    SeriesQc,
    accepted_modalities,
    check_series_quality,
    geometry_tolerances,
    qc_table,
    read_policy,
)
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

#: ``annotation_modality`` of an automatic work item: the mask comes from a model, not a file.
MODEL_ANNOTATION = "MODEL"
#: Prefix of the ``roi_source`` of an automatic ROI: ``model:<model name>``.
MODEL_ROI_PREFIX = "model:"

#: Modalities that annotate image series rather than being selectable images.
ANNOTATION_MODALITIES = frozenset({"RTSTRUCT", "SEG"})


class LinkMethod(StrEnum):
    """How a structure set or segmentation was tied to an image series."""

    REFERENCED_SERIES = "referenced_series"  # its ReferencedSeriesInstanceUID names the series
    FRAME_OF_REFERENCE = "frame_of_reference"  # the only image series of its FrameOfReferenceUID
    SHARED_FRAME = "same_study_frame"  # borrowed from another series of the same study and frame (roles)


class DecisionStep(StrEnum):
    """The step that decided a decision row (``selected`` for a selected one)."""

    MODALITY = "modality"
    QC = "qc"
    ROLE = "role"
    LINK = "link"
    ROI = "roi"
    PER_PATIENT = "per_patient"
    SELECTED = "selected"


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
        ("series_key", pa.string()),  # series_uid, or series_uid#part for a sub-series
        ("part", pa.string()),
        ("step", pa.string()),  # DecisionStep
        ("annotation_modality", pa.string()),  # RTSTRUCT | SEG
        ("link", pa.string()),  # LinkMethod
        ("qc_passed", pa.bool_()),
    ]
)

#: One row per structure set / segmentation: which series it was linked to, and how.
LINK_SCHEMA = pa.schema(
    [
        ("annotation_uid", pa.string()),
        ("annotation_modality", pa.string()),
        ("annotation_path", pa.string()),
        ("series_uid", pa.string()),  # null when it could not be linked
        ("link", pa.string()),
        ("note", pa.string()),
    ]
)


@dataclass(frozen=True)
class RoiSelection:
    """An RTSTRUCT ROI picked for extraction, under its harmonised name."""

    source_name: str
    canonical: str


@dataclass(frozen=True)
class WorkItem:
    """One image (sub-)series with one structure set and the ROIs to extract from it.

    ``series_uid`` is the SeriesInstanceUID, or ``<SeriesInstanceUID>#<part>``
    for a sub-series of a split series (``part`` then says which); it keys every
    output row. ``rtstruct_*`` name the structure set, an RTSTRUCT or (see
    ``annotation_modality``) a DICOM-SEG. ``read_policy`` is what
    ``read_series`` may repair (from the ``qc.geometry`` spec).
    """

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
    part: str = ""
    annotation_modality: str = "RTSTRUCT"
    link: str | None = None
    read_policy: ReadPolicy = field(default_factory=ReadPolicy)
    n_frames: int | None = None  # frames of an enhanced multi-frame object, when the index knows them

    @property
    def n_slices(self) -> int:
        return self.n_frames if self.n_frames else len(self.image_paths)

    @property
    def dicom_series_uid(self) -> str:
        return self.series_uid.split("#", 1)[0]

    @property
    def automatic(self) -> bool:
        """True for an automatic-segmentation item (its one ROI is the model's mask)."""
        return self.annotation_modality == MODEL_ANNOTATION


@dataclass(frozen=True)
class CurationPlan:
    """What curation decided: the work, one decision row per series x structure set, QC and links."""

    items: tuple[WorkItem, ...]
    decisions: pa.Table  # DECISION_SCHEMA
    qc: pa.Table  # cohort.curate.qc.QC_SCHEMA
    links: pa.Table  # LINK_SCHEMA


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


def _uids(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return []
    return [str(v) for v in value]


@dataclass(frozen=True)
class _Link:
    annotation: pd.Series
    method: LinkMethod
    via: str = ""  # the series whose structure set was borrowed


def link_annotations(
    df: pd.DataFrame, selectable_series: pd.DataFrame
) -> tuple[dict[str, list[_Link]], list[dict[str, Any]], dict[str, str]]:
    """Tie each RTSTRUCT / SEG to image series: by referenced series, else by frame of reference.

    Returns the links per series UID, one link-table row per annotation and
    series (or per annotation left unlinked, with the reason), and notes per
    series UID on annotations that could have been its own but were ambiguous.
    """
    series_uids = set(selectable_series["series_uid"].astype(str))
    by_frame: dict[str, set[str]] = {}
    for uid, group in selectable_series.groupby("series_uid", sort=True):
        frames = group["frame_of_reference_uid"].dropna()
        if not frames.empty:
            by_frame.setdefault(str(frames.iloc[0]), set()).add(str(uid))
    links: dict[str, list[_Link]] = {}
    rows: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    annotations = df[df["modality"].isin(list(ANNOTATION_MODALITIES))].sort_values("path")
    for _, ann in annotations.iterrows():
        base = {
            "annotation_uid": ann["sop_instance_uid"],
            "annotation_modality": ann["modality"],
            "annotation_path": ann["path"],
        }
        refs = _uids(ann["referenced_series_uids"])
        present = [r for r in refs if r in series_uids]
        if present:
            for ref in present:
                links.setdefault(ref, []).append(_Link(ann, LinkMethod.REFERENCED_SERIES))
                rows.append(
                    {**base, "series_uid": ref, "link": LinkMethod.REFERENCED_SERIES.value, "note": None}
                )
            continue
        missing = (
            f"references series {', '.join(refs)}, not in the archive; " if refs else "references no series; "
        )
        frame = ann["frame_of_reference_uid"]
        candidates = sorted(by_frame.get(str(frame), set())) if isinstance(frame, str) and frame else []
        if len(candidates) == 1:
            links.setdefault(candidates[0], []).append(_Link(ann, LinkMethod.FRAME_OF_REFERENCE))
            rows.append(
                {
                    **base,
                    "series_uid": candidates[0],
                    "link": LinkMethod.FRAME_OF_REFERENCE.value,
                    "note": missing + "linked by its frame of reference",
                }
            )
            continue
        if candidates:
            why = f"{missing}its frame of reference holds {len(candidates)} image series: ambiguous"
            for uid in candidates:
                notes[uid] = f"{ann['modality']} {ann['sop_instance_uid']} {why}"
        else:
            why = missing + "no image series shares its frame of reference"
        rows.append({**base, "series_uid": None, "link": None, "note": why})
    return links, rows, notes


@dataclass
class _Candidate:
    """A (sub-)series x structure set that passed every step before the per-patient rule."""

    row: dict[str, Any]
    item: WorkItem
    qc: SeriesQc


def _rank(rule: str, qc: SeriesQc) -> tuple[float, ...]:
    g = qc.geometry
    thickness = g.slice_thickness or g.slice_spacing or float("inf")
    pixel = g.pixel_spacing[0] * g.pixel_spacing[1] if g.pixel_spacing else float("inf")
    if rule == "thinnest":
        return (thickness, -g.n_slices, pixel)
    return (-g.n_slices, thickness, pixel)


def _describe_rank(rule: str, qc: SeriesQc) -> str:
    g = qc.geometry
    thickness = g.slice_thickness or g.slice_spacing
    shown = f"{thickness:g} mm" if thickness is not None else "unknown thickness"
    return f"{shown}, {g.n_slices} slices" if rule == "thinnest" else f"{g.n_slices} slices, {shown}"


def _apply_per_patient(
    rule: str, candidates: list[_Candidate]
) -> tuple[list[_Candidate], list[dict[str, Any]]]:
    """Keep, per patient (and role), the candidates of the best series; decision rows for the rest."""
    if rule == "all":
        return candidates, []
    groups: dict[tuple[str, str | None], list[_Candidate]] = {}
    for c in candidates:
        groups.setdefault((c.item.patient_id, c.item.role), []).append(c)
    kept: list[_Candidate] = []
    dropped: list[dict[str, Any]] = []
    for members in groups.values():
        best = min(members, key=lambda c: (*_rank(rule, c.qc), c.item.series_uid))
        keys = {c.item.series_uid for c in members}
        for c in members:
            if c.item.series_uid == best.item.series_uid:
                if len(keys) > 1:
                    c.row["reason"] += (
                        f"; per_patient {rule}: chosen of {len(keys)} ({_describe_rank(rule, c.qc)})"
                    )
                kept.append(c)
            else:
                dropped.append(
                    {
                        **c.row,
                        "selected": False,
                        "step": DecisionStep.PER_PATIENT.value,
                        "reason": f"per_patient {rule}: {best.item.series_uid} chosen "
                        f"({_describe_rank(rule, best.qc)}; this one {_describe_rank(rule, c.qc)})",
                    }
                )
    return kept, dropped


def automatic_roi(spec: CohortSpec) -> RoiSelection | None:
    """The ROI automatic segmentation adds to every selected series, or None when it is off."""
    if spec.segmentation.model is None:
        return None
    from cohort.segment.model import load_model  # local: the planner needs only the model's name

    model = load_model(spec.segmentation.model, check_io=False)
    return RoiSelection(f"{MODEL_ROI_PREFIX}{model.name}", spec.segmentation.roi)


def automatic_item(item: WorkItem, roi: RoiSelection) -> WorkItem:
    """The automatic-segmentation twin of a work item: same image, no structure set, the model's ROI."""
    return replace(
        item,
        rtstruct_path="",
        rtstruct_uid="",
        rtstruct_hash="",
        rois=(roi,),
        annotation_modality=MODEL_ANNOTATION,
        link=None,
    )


def _with_automatic_items(kept: list[_Candidate], roi: RoiSelection | None) -> list[WorkItem]:
    """The kept items in order, each series followed once by its automatic item (when segmentation is on)."""
    items: list[WorkItem] = []
    seen: set[str] = set()
    for c in kept:
        if not c.item.automatic:
            items.append(c.item)
        if roi is not None and c.item.series_uid not in seen:
            seen.add(c.item.series_uid)
            items.append(automatic_item(c.item, roi))
    return items


def plan_cohort(instances: pa.Table | pd.DataFrame, spec: CohortSpec) -> CurationPlan:
    """Split, check, link and select image series; see the module docstring for the steps."""
    df = instances.to_pandas() if isinstance(instances, pa.Table) else instances
    empty = CurationPlan(
        (),
        pa.Table.from_pylist([], schema=DECISION_SCHEMA),
        qc_table([]),
        pa.Table.from_pylist([], schema=LINK_SCHEMA),
    )
    if df.empty:
        return empty

    accepted = accepted_modalities(spec)
    images = df[~df["modality"].isin(list(ANNOTATION_MODALITIES))]
    selectable = images[images["modality"].isin(list(accepted))]
    links, link_rows, link_notes = link_annotations(df, selectable)

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
                    for link in links.get(str(other_uid), []):
                        links.setdefault(str(series_uid), []).append(
                            _Link(link.annotation, LinkMethod.SHARED_FRAME, str(other_uid))
                        )
                        borrowed[str(series_uid)] = str(other_uid)

    policy = read_policy(spec.qc)
    tolerances = geometry_tolerances(spec.qc)
    pattern = re.compile(spec.selection.require_roi)
    auto_roi = automatic_roi(spec)
    decisions: list[dict[str, Any]] = []
    qc_records: list[SeriesQc] = []
    candidates: list[_Candidate] = []
    for series_uid, group in images.groupby("series_uid", sort=True):
        group = group.sort_values("path")
        first = group.iloc[0]
        modality_ok = first["modality"] in accepted
        split = split_series(
            group,
            series_uid=str(series_uid),
            tolerances=tolerances,
            split=modality_ok and spec.qc.geometry.split,
        )
        for part in split.parts:
            rows = group[group["path"].isin(set(part.paths))]
            qc = check_series_quality(rows, part.geometry, spec, series_key=part.key, part=part.part)
            qc_records.append(qc)
            decisions_part, candidates_part = _decide(
                part,
                rows,
                qc,
                spec,
                links.get(str(series_uid), []),
                borrowed,
                link_notes,
                pattern,
                policy,
                auto_roi,
            )
            decisions += decisions_part
            candidates += candidates_part

    kept, dropped = _apply_per_patient(spec.selection.per_patient, candidates)
    decisions += dropped
    decisions += [c.row for c in kept]
    decisions.sort(key=lambda r: (str(r["series_key"]), str(r["rtstruct_uid"] or "")))
    order = {id(c): i for i, c in enumerate(candidates)}
    items = tuple(_with_automatic_items(sorted(kept, key=lambda c: order[id(c)]), auto_roi))
    return CurationPlan(
        items,
        pa.Table.from_pylist(decisions, schema=DECISION_SCHEMA),
        qc_table(qc_records),
        pa.Table.from_pylist(link_rows, schema=LINK_SCHEMA),
    )


def _decide(
    part: SubSeries,
    rows: pd.DataFrame,
    qc: SeriesQc,
    spec: CohortSpec,
    linked: list[_Link],
    borrowed: Mapping[str, str],
    link_notes: Mapping[str, str],
    pattern: re.Pattern[str],
    policy: ReadPolicy,
    auto_roi: RoiSelection | None = None,
) -> tuple[list[dict[str, Any]], list[_Candidate]]:
    """Decision rows (not selected) and candidates (selected so far) for one (sub-)series."""
    first = rows.iloc[0]
    series_uid = part.series_uid
    prefix = f"sub-series {part.part} ({part.reason}); " if part.part else ""
    base = {
        "patient_id": first["patient_id"],
        "study_uid": first["study_uid"],
        "series_uid": series_uid,
        "modality": first["modality"],
        "n_instances": len(rows),
        "rtstruct_uid": None,
        "series_key": part.key,
        "part": part.part or None,
        "annotation_modality": None,
        "link": None,
        "qc_passed": qc.passed,
    }

    def refuse(step: DecisionStep, reason: str, **extra: Any) -> dict[str, Any]:
        return {**base, **extra, "selected": False, "step": step.value, "reason": prefix + reason}

    accepted = accepted_modalities(spec)
    if first["modality"] not in accepted:
        return [
            refuse(DecisionStep.MODALITY, f"modality {first['modality']} is not {' or '.join(accepted)}")
        ], []
    if not qc.passed:
        return [refuse(DecisionStep.QC, f"QC failed: {qc.reason}")], []
    roles = spec.selection.roles
    role = series_role(first["series_description"], roles)
    if roles and role is None:
        return [
            refuse(
                DecisionStep.ROLE,
                f"series description {first['series_description']!r} matches no role ({', '.join(roles)})",
            )
        ], []
    n_frames = None
    if "number_of_frames" in rows and rows["number_of_frames"].notna().any():
        frames = int(rows["number_of_frames"].fillna(1).sum())
        n_frames = frames if frames > len(rows) else None
    image_item = WorkItem(
        patient_id=str(first["patient_id"]),
        study_uid=str(first["study_uid"]),
        series_uid=part.key,
        modality=str(first["modality"]),
        image_paths=tuple(rows["path"]),
        image_hash=series_hash(list(rows["sop_instance_uid"]), list(rows["sha256"])),
        rtstruct_path="",
        rtstruct_uid="",
        rtstruct_hash="",
        rois=(),
        metadata={key: _none_if_na(first[key]) for key in METADATA_COLUMNS},
        role=role,
        part=part.part,
        read_policy=policy,
        n_frames=n_frames,
    )
    unannotated_ok = auto_roi is not None and spec.segmentation.unannotated

    def automatic_only(why: str) -> _Candidate:
        source = auto_roi.source_name if auto_roi else ""
        row = {
            **base,
            "selected": True,
            "step": DecisionStep.SELECTED.value,
            "reason": prefix + f"{why}: automatic segmentation only ({source})",
        }
        return _Candidate(row, automatic_item(image_item, auto_roi) if auto_roi else image_item, qc)

    if not linked:
        note = f" ({link_notes[series_uid]})" if series_uid in link_notes else ""
        if unannotated_ok:
            return [], [automatic_only(f"no RTSTRUCT references this series{note}")]
        return [refuse(DecisionStep.LINK, f"no RTSTRUCT references this series{note}")], []

    rejected: list[dict[str, Any]] = []
    candidates: list[_Candidate] = []
    for link in linked:
        ann = link.annotation
        kind = str(ann["modality"])
        names = _uids(ann["roi_names"])
        chosen = []
        for name in names:
            canonical = harmonise_roi_name(name, spec.rois)
            if canonical is not None:
                chosen.append(RoiSelection(name, canonical))
        extra = {
            "rtstruct_uid": ann["sop_instance_uid"],
            "annotation_modality": kind,
            "link": link.method.value,
        }
        if not any(pattern.fullmatch(r.canonical) for r in chosen):
            rejected.append(
                refuse(
                    DecisionStep.ROI,
                    f"{kind} has no ROI harmonised to {spec.selection.require_roi!r} "
                    f"(ROIs: {', '.join(names) or 'none'})",
                    **extra,
                )
            )
            continue
        reason = "ROIs " + ", ".join(f"{r.source_name} -> {r.canonical}" for r in chosen)
        if role is not None:
            reason = f"role {role}; " + reason
        if link.method == LinkMethod.SHARED_FRAME:
            reason += f"; contours of the structure set on series {link.via or borrowed.get(series_uid)}"
        elif link.method == LinkMethod.FRAME_OF_REFERENCE:
            reason += f"; {kind} linked by its frame of reference (it references no series of the archive)"
        if kind != "RTSTRUCT":
            reason += f"; from a {kind}"
        if not qc.geometry.healthy:
            reason += f"; geometry: {qc.geometry.describe()}"
        row = {
            **base,
            **extra,
            "selected": True,
            "step": DecisionStep.SELECTED.value,
            "reason": prefix + reason,
        }
        if auto_roi is not None and not candidates:
            row["reason"] += f"; and automatic segmentation ({auto_roi.source_name})"
        item = replace(
            image_item,
            rtstruct_path=str(ann["path"]),
            rtstruct_uid=str(ann["sop_instance_uid"]),
            rtstruct_hash=str(ann["sha256"]),
            rois=tuple(chosen),
            annotation_modality=kind,
            link=link.method.value,
        )
        candidates.append(_Candidate(row, item, qc))
    if not candidates and unannotated_ok:
        why = f"no structure set with an ROI matching {spec.selection.require_roi!r}"
        candidates.append(automatic_only(why))
    return rejected, candidates


def plan_work(instances: pa.Table | pd.DataFrame, spec: CohortSpec) -> tuple[list[WorkItem], pa.Table]:
    """Select image series and link each to its RTSTRUCT(s).

    Returns the work items (one per (sub-)series x structure set) and the
    decision table (one row per image (sub-)series x structure set considered,
    with the reason). :func:`plan_cohort` also gives the QC and link tables.
    """
    plan = plan_cohort(instances, spec)
    return list(plan.items), plan.decisions
