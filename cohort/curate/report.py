"""A self-contained HTML report of a curation: what the archive holds, what passed QC, what was selected.

The page (:func:`render_curation_report`, written by :func:`write_curation_report`)
needs no external asset: figures are PNG images embedded as base64 data URIs.
It holds, in order:

1. a summary (files, instances, patients, series per modality, QC, selection);
2. the distributions of acquisition parameters per modality, CT first
   (manufacturer, model, convolution kernel, slice thickness, pixel spacing,
   kVp, exposure, tube current, contrast agent), as in Figure 3 of the
   precision-medicine-toolbox paper, but counting each series once (the seed
   counted slices): text parameters take the most frequent value of the
   series, numbers the median over its instances (tube current varies slice
   by slice under dose modulation). Each figure is followed by its counts as a
   table, so the numbers can be read and searched;
3. the QC table (:mod:`cohort.curate.qc`): one row per (sub-)series, one
   pass/fail cell per check with its reason on hover, the overall result and
   why, and the counts per check above it;
4. the selection decisions and the RTSTRUCT / SEG links
   (:mod:`cohort.curate.select`);
5. the quarantine: path (relative to the archive root) and reason, with counts
   by reason;
6. overlays for a visual check (:func:`case_overlays`, :func:`overlay_png`):
   a few axial slices of each selected case with the contour of its GTV.

Identifiers: patient IDs and DICOM UIDs are hidden unless ``show_patient_ids``
is set. A hidden identifier is shown as the first 8 hex digits of its SHA-256
(an HMAC-SHA256 under ``id_key`` when one is given: without a key, a short or
sequential ID can be recovered by hashing candidates), and every occurrence
of a known patient ID and of any UID in free text (paths, reasons, notes) is
replaced the same way. PatientName is never shown: it is not in the index.

matplotlib is used with the Agg canvas on :class:`~matplotlib.figure.Figure`
objects, never through ``pyplot``, and is imported on use.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import io
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import SimpleITK as sitk

from cohort.curate.qc import QcCheck
from cohort.curate.select import ANNOTATION_MODALITIES, CurationPlan, DecisionStep, WorkItem
from cohort.errors import CohortError, Stage
from cohort.index.source import read_dicom

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cohort.store.location import Location

#: Lung window as (level, width) in HU: WL -600 / WW 1500.
LUNG_WINDOW = (-600.0, 1500.0)
#: Soft-tissue window as (level, width) in HU.
SOFT_TISSUE_WINDOW = (40.0, 400.0)
#: ROIs searched (case-insensitive, in the harmonised then the source name) for the overlay of a case.
DEFAULT_OVERLAY_ROI = r"gtv"
DEFAULT_MAX_OVERLAY_CASES = 12
#: Hex digits of the digest shown for a hidden identifier.
LABEL_DIGITS = 8
#: Distinct values above which a text parameter's rarest values are pooled as "other".
MAX_CATEGORIES = 12
#: Distinct values up to which a numeric parameter gets one bar per value instead of a histogram.
MAX_DISCRETE_VALUES = 10
NOT_RECORDED = "(not recorded)"


class CurationReportError(CohortError):
    """An input of the curation report is unusable (an empty mask, a mask off the image grid, ...)."""

    stage = Stage.CURATE


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class CurationTables:
    """The tables of a curation, as a run stores them (``selection``, ``qc`` and ``links`` parquet files).

    A :class:`~cohort.curate.select.CurationPlan` can be passed instead wherever these are asked for.
    """

    decisions: pa.Table | pd.DataFrame  # cohort.curate.select.DECISION_SCHEMA
    qc: pa.Table | pd.DataFrame  # cohort.curate.qc.QC_SCHEMA
    links: pa.Table | pd.DataFrame  # cohort.curate.select.LINK_SCHEMA


def _frame(table: pa.Table | pd.DataFrame | None) -> pd.DataFrame:
    if table is None:
        return pd.DataFrame()
    if isinstance(table, pd.DataFrame):
        return table.reset_index(drop=True)
    return table.to_pandas()


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    if isinstance(value, str) and not value.strip():
        return False
    return value is not pd.NA and value is not pd.NaT


# --------------------------------------------------------------------------- identifiers


def patient_label(patient_id: str | None, *, key: bytes | None = None) -> str:
    """A short stable stand-in for an identifier: 8 hex digits of SHA-256, or of HMAC-SHA256 under ``key``."""
    if patient_id is None:
        return "(no ID)"
    data = str(patient_id).encode()
    digest = hmac.new(key, data, hashlib.sha256) if key is not None else hashlib.sha256(data)
    return digest.hexdigest()[:LABEL_DIGITS]


#: A DICOM UID in free text: digits with at least four dots, not inside a longer number
#: (a full stop after it is punctuation).
_UID_IN_TEXT = re.compile(r"(?<!\d)(?<!\d\.)\d+(?:\.\d+){3,}(?!\.?\d)")


class _Identifiers:
    """Shows or hides patient IDs and UIDs, in their own cells and inside free text."""

    def __init__(self, patient_ids: Iterable[str], *, show: bool, key: bytes | None) -> None:
        self.show = show
        self.key = key
        ids = sorted({str(p) for p in patient_ids if _present(p)}, key=len, reverse=True)
        # Matched ignoring case (a folder may be named "lung1-001"), labelled as the ID itself.
        self._canonical = {p.casefold(): p for p in ids}
        self._pattern = (
            re.compile(
                r"(?<![A-Za-z0-9])(?:" + "|".join(re.escape(p) for p in ids) + r")(?![A-Za-z0-9])",
                flags=re.IGNORECASE,
            )
            if ids and not show
            else None
        )

    def patient(self, value: Any) -> str:
        if not _present(value):
            return "(no ID)"
        return str(value) if self.show else patient_label(str(value), key=self.key)

    def uid(self, value: Any) -> str:
        """A UID as a cell shows it: its tail when shown (the whole on hover), else its label."""
        if not _present(value):
            return ""
        text = str(value)
        if not self.show:
            return "uid:" + patient_label(text, key=self.key)
        return text if len(text) <= 20 else "…" + text[-16:]

    def text(self, value: Any) -> str:
        """Free text with every known patient ID and every UID replaced by its label (when hidden)."""
        if not _present(value):
            return ""
        text = str(value)
        if self.show:
            return text
        text = _UID_IN_TEXT.sub(lambda m: "uid:" + patient_label(m.group(0), key=self.key), text)
        if self._pattern is not None:
            text = self._pattern.sub(
                lambda m: patient_label(self._canonical.get(m.group(0).casefold(), m.group(0)), key=self.key),
                text,
            )
        return text


def relative_path(path: Any, archive_root: str | os.PathLike[str] | None) -> str:
    """``path`` relative to ``archive_root`` when it lies under it, else as given."""
    if not _present(path):
        return ""
    text = str(path)
    if archive_root is None:
        return text
    root = os.fspath(archive_root).rstrip("/")
    if root and text.startswith(root + "/"):
        return text[len(root) + 1 :]
    return text


# --------------------------------------------------------------------------- acquisition parameters


class ParameterKind(StrEnum):
    CATEGORICAL = "categorical"
    NUMERIC = "numeric"


@dataclass(frozen=True)
class AcquisitionParameter:
    """An index column whose distribution over the series of a modality is plotted."""

    column: str
    label: str
    kind: ParameterKind
    unit: str = ""

    @property
    def title(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label


ACQUISITION_PARAMETERS: tuple[AcquisitionParameter, ...] = (
    AcquisitionParameter("manufacturer", "manufacturer", ParameterKind.CATEGORICAL),
    AcquisitionParameter("manufacturer_model", "model", ParameterKind.CATEGORICAL),
    AcquisitionParameter("convolution_kernel", "convolution kernel", ParameterKind.CATEGORICAL),
    AcquisitionParameter("slice_thickness", "slice thickness", ParameterKind.NUMERIC, "mm"),
    AcquisitionParameter("pixel_spacing_row", "pixel spacing", ParameterKind.NUMERIC, "mm"),
    AcquisitionParameter("kvp", "tube voltage", ParameterKind.NUMERIC, "kVp"),
    AcquisitionParameter("exposure", "exposure", ParameterKind.NUMERIC, "mAs"),
    AcquisitionParameter("tube_current", "tube current", ParameterKind.NUMERIC, "mA"),
    AcquisitionParameter("contrast_agent", "contrast agent", ParameterKind.CATEGORICAL),
)


def _modes(frame: pd.DataFrame, keys: list[str], column: str) -> pd.DataFrame:
    """The most frequent non-empty text of ``column`` per group of ``keys`` (ties: the first sorted)."""
    text = frame[column].astype("string").str.strip()
    values = frame[keys].assign(value=text.mask(text == "")).dropna(subset=["value"])
    counts = values.groupby([*keys, "value"], sort=False).size().rename("n").reset_index()
    return (
        counts.sort_values([*keys, "n", "value"], ascending=[True] * len(keys) + [False, True])
        .drop_duplicates(keys)
        .rename(columns={"value": column})[[*keys, column]]
    )


def series_parameters(
    instances: pa.Table | pd.DataFrame,
    parameters: Sequence[AcquisitionParameter] = ACQUISITION_PARAMETERS,
) -> pd.DataFrame:
    """One row per image series (``modality``, ``series_uid``, ``n_instances`` and one column per parameter).

    Image series are those with pixel data, structure sets and segmentations
    excepted. A text parameter takes the most frequent value of the series (ties:
    the first in sorted order), a number the median over its instances; None
    when no instance records it.
    """
    keys = ["modality", "series_uid"]
    df = _frame(_columns(instances, [*keys, "has_pixel_data", *(p.column for p in parameters)]))
    columns = [*keys, "n_instances", *(p.column for p in parameters)]
    if df.empty:
        return pd.DataFrame(columns=columns)
    images = df[df["has_pixel_data"].fillna(False).astype(bool) & ~df["modality"].isin(ANNOTATION_MODALITIES)]
    images = images.assign(modality=images["modality"].fillna(NOT_RECORDED)).dropna(subset=["series_uid"])
    out = images.groupby(keys, sort=True).size().rename("n_instances").reset_index()
    for p in parameters:
        if p.column not in images:
            out[p.column] = None
            continue
        if p.kind == ParameterKind.NUMERIC:
            values = images[keys].assign(value=pd.to_numeric(images[p.column], errors="coerce"))
            medians = values.groupby(keys, sort=False)["value"].median().rename(p.column).reset_index()
            merged = out[keys].merge(medians, on=keys, how="left")[p.column]
            out[p.column] = [float(v) if pd.notna(v) else None for v in merged]
            continue
        merged = out[keys].merge(_modes(images, keys, p.column), on=keys, how="left")[p.column]
        out[p.column] = [str(v) if _present(v) else None for v in merged]
    return out[columns]


def _columns(table: pa.Table | pd.DataFrame, names: Sequence[str]) -> pa.Table | pd.DataFrame:
    """The columns of ``names`` that ``table`` has (the index has list columns not worth converting)."""
    present = [n for n in names if n in table.column_names] if isinstance(table, pa.Table) else None
    if present is not None:
        return table.select(present)
    return table[[n for n in names if n in table.columns]]


def modality_order(modalities: Iterable[str]) -> list[str]:
    """CT first, then the others alphabetically."""
    return sorted(set(modalities), key=lambda m: (m != "CT", m))


def _format_number(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class ParameterCounts:
    """The distribution of one parameter over the series of one modality."""

    parameter: AcquisitionParameter
    #: (value, series): text most frequent first, then "(not recorded)"; numbers in ascending order
    counts: tuple[tuple[str, int], ...]
    missing: int
    numeric_values: tuple[float, ...] = ()  # the values of a numeric parameter (for its histogram)

    @property
    def discrete(self) -> bool:
        """True when the values are shown one bar per value (text, or a few distinct numbers)."""
        return self.parameter.kind == ParameterKind.CATEGORICAL or len(self.counts) <= MAX_DISCRETE_VALUES


def parameter_counts(series: pd.DataFrame, parameter: AcquisitionParameter) -> ParameterCounts:
    """Series per value (text pooled beyond :data:`MAX_CATEGORIES` values) and series lacking it."""
    values = series[parameter.column] if parameter.column in series else pd.Series(dtype=object)
    present = [v for v in values if _present(v)]
    missing = len(values) - len(present)
    if parameter.kind == ParameterKind.NUMERIC:
        numbers = sorted(float(v) for v in present)
        distinct = pd.Series(numbers, dtype=float).value_counts().sort_index()
        counts = tuple((_format_number(float(v)), int(n)) for v, n in distinct.items())
        return ParameterCounts(parameter, counts, missing, tuple(numbers))
    ranked = pd.Series([str(v) for v in present], dtype=object).value_counts()
    pairs = sorted(((str(v), int(n)) for v, n in ranked.items()), key=lambda vn: (-vn[1], vn[0]))
    if len(pairs) > MAX_CATEGORIES:
        rest = pairs[MAX_CATEGORIES - 1 :]
        pairs = [*pairs[: MAX_CATEGORIES - 1], (f"other ({len(rest)} values)", sum(n for _, n in rest))]
    if missing:  # for text, "not recorded" is a value worth a bar (no contrast agent, no kernel)
        pairs.append((NOT_RECORDED, missing))
    return ParameterCounts(parameter, tuple(pairs), missing)


def _new_figure(
    width: float, height: float, *, dpi: float = 100, layout: Literal["constrained"] | None = None
) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def figure_to_png(figure: Figure, *, dpi: float | None = None) -> bytes:
    """The figure as PNG bytes (no software or date metadata, so the same figure gives the same bytes)."""
    buffer = io.BytesIO()
    figure.savefig(
        buffer,
        format="png",
        dpi=dpi or figure.dpi,
        facecolor=figure.get_facecolor(),
        metadata={"Software": None},
    )
    return buffer.getvalue()


def plot_acquisition_parameters(
    series: pd.DataFrame,
    modality: str,
    parameters: Sequence[AcquisitionParameter] = ACQUISITION_PARAMETERS,
) -> Figure:
    """A panel per parameter over the series of ``modality``: bars (text, few values) or a histogram."""
    from matplotlib.ticker import MaxNLocator

    subset = series[series["modality"] == modality]
    ncols = 3
    nrows = max(1, math.ceil(len(parameters) / ncols))
    figure = _new_figure(4.2 * ncols, 3.0 * nrows, layout="constrained")
    figure.suptitle(f"{modality}: acquisition parameters of {len(subset)} series (each series counted once)")
    for i, parameter in enumerate(parameters):
        axes = figure.add_subplot(nrows, ncols, i + 1)
        dist = parameter_counts(subset, parameter)
        numeric = parameter.kind == ParameterKind.NUMERIC
        title = parameter.title + (
            f"\n{dist.missing} series not recorded" if numeric and dist.missing else ""
        )
        axes.set_title(title, fontsize=9)
        if not dist.counts:
            axes.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=axes.transAxes)
            axes.set_axis_off()
            continue
        if dist.discrete:
            labels = [v for v, _ in dist.counts]
            heights = [n for _, n in dist.counts]
            positions = np.arange(len(labels))
            if not numeric:
                axes.barh(positions, heights, color="#4c72b0")
                axes.set_yticks(positions, labels, fontsize=7)
                axes.invert_yaxis()
                axes.set_xlabel("series", fontsize=8)
                axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            else:
                axes.bar(positions, heights, color="#55a868")
                axes.set_xticks(positions, labels, fontsize=7, rotation=45 if len(labels) > 5 else 0)
                axes.set_ylabel("series", fontsize=8)
                axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            bins = min(30, max(5, int(math.sqrt(len(dist.numeric_values))) + 1))
            axes.hist(dist.numeric_values, bins=bins, color="#55a868")
            axes.set_ylabel("series", fontsize=8)
            axes.set_xlabel(parameter.unit, fontsize=8)
            axes.tick_params(labelsize=7)
            axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


# --------------------------------------------------------------------------- overlays


def overlay_slices(mask: np.ndarray, n_slices: int = 3) -> list[int]:
    """Axial slice indices to show: the ROI's largest-area slice and others spread through the ROI.

    ``mask`` is indexed (z, y, x). Returns at most ``n_slices`` indices in
    ascending order, all cutting the ROI. Raises :class:`CurationReportError` for
    an empty mask.
    """
    if n_slices < 1:
        raise CurationReportError(f"n_slices must be at least 1, not {n_slices}")
    areas = np.asarray(mask).reshape(mask.shape[0], -1).astype(bool).sum(axis=1)
    cutting = np.flatnonzero(areas)
    if cutting.size == 0:
        raise CurationReportError("the mask is empty: no slice to show")
    largest = int(cutting[np.argmax(areas[cutting])])  # the first of equal maxima
    if cutting.size <= n_slices:
        return [int(z) for z in cutting]
    # Evenly spread through the ROI (centres of n equal parts), the nearest of them replaced by the largest.
    last = cutting.size - 1
    spread = [int(cutting[math.floor((k + 0.5) / n_slices * last + 0.5)]) for k in range(n_slices)]
    nearest = min(range(n_slices), key=lambda k: (abs(spread[k] - largest), k))
    spread[nearest] = largest
    chosen = list(dict.fromkeys(spread))
    for candidate in sorted((int(z) for z in cutting), key=lambda z: (abs(z - largest), z)):
        if len(chosen) >= n_slices:
            break
        if candidate not in chosen:
            chosen.append(candidate)
    return sorted(chosen)


def _as_lps(image: sitk.Image) -> sitk.Image:
    try:
        return sitk.DICOMOrient(image, "LPS")
    except RuntimeError:  # a direction ITK cannot permute onto the axes: show as stored
        return image


def overlay_png(
    image: sitk.Image,
    mask: np.ndarray | sitk.Image,
    *,
    n_slices: int = 3,
    window: tuple[float, float] = LUNG_WINDOW,
    panel_px: int = 256,
    title: str = "",
    color: str = "#ff3030",
) -> bytes:
    """Axial slices of ``image`` with the contour of ``mask`` (at 0.5), side by side, as PNG bytes.

    ``mask`` is a (z, y, x) array on the image grid (as ``sitk.GetArrayFromImage``
    gives it) or an image on the same grid. ``window`` is (level, width) in the
    image's units (HU for CT). Slices are chosen by :func:`overlay_slices` and
    shown in radiological view (image reoriented to LPS: anterior up, the
    patient's left on the right). The PNG is ``panel_px`` pixels high and
    ``panel_px`` wide per slice shown (fewer slices than ``n_slices`` when the ROI
    spans fewer). Each panel names its slice and the ROI's area on it; ``title``
    is written at the top left.
    """
    if image.GetDimension() != 3:
        raise CurationReportError(f"expected a 3D image, got {image.GetDimension()}D")
    if panel_px < 16:
        raise CurationReportError(f"panel_px must be at least 16, not {panel_px}")
    level, width = window
    if width <= 0:
        raise CurationReportError(f"window width must be positive, got {width}")
    if isinstance(mask, sitk.Image):
        mask_array = sitk.GetArrayFromImage(mask)
    else:
        mask_array = np.asarray(mask)
    expected = tuple(reversed(image.GetSize()))
    if mask_array.shape != expected:
        raise CurationReportError(
            f"mask shape {mask_array.shape} differs from the image's (z, y, x) {expected}"
        )
    mask_image = sitk.GetImageFromArray((mask_array > 0).astype(np.uint8))
    mask_image.CopyInformation(image)
    shown, shown_mask = _as_lps(image), _as_lps(mask_image)
    pixels = sitk.GetArrayFromImage(shown).astype(np.float32)
    binary = sitk.GetArrayFromImage(shown_mask).astype(bool)
    slices = overlay_slices(binary, n_slices)
    sx, sy = shown.GetSpacing()[:2]
    nz, ny, nx = binary.shape
    extent = (-0.5 * sx, (nx - 0.5) * sx, (ny - 0.5) * sy, -0.5 * sy)
    xs = np.arange(-1, nx + 1) * sx
    ys = np.arange(-1, ny + 1) * sy
    dpi = 100.0
    figure = _new_figure(len(slices) * panel_px / dpi, panel_px / dpi, dpi=dpi)
    figure.set_facecolor("black")
    fontsize = max(5.0, panel_px / 40)
    for i, z in enumerate(slices):
        axes = figure.add_axes((i / len(slices), 0.0, 1.0 / len(slices), 1.0))
        axes.set_axis_off()
        axes.set_facecolor("black")
        axes.imshow(
            pixels[z],
            cmap="gray",
            vmin=level - width / 2,
            vmax=level + width / 2,
            extent=extent,
            aspect="equal",
        )
        # Padded with background so the contour closes at the image border and a full slice still has a level.
        axes.contour(
            xs, ys, np.pad(binary[z].astype(np.float32), 1), levels=[0.5], colors=[color], linewidths=1.0
        )
        axes.set_xlim(extent[0], extent[1])
        axes.set_ylim(extent[2], extent[3])
        area_cm2 = float(binary[z].sum()) * sx * sy / 100.0
        axes.text(
            0.02,
            0.02,
            f"slice {z + 1}/{nz} · {area_cm2:.3g} cm²",
            transform=axes.transAxes,
            color="white",
            fontsize=fontsize,
            va="bottom",
        )
    if title:
        figure.text(0.005, 0.995, title, color="white", fontsize=fontsize, va="top", ha="left")
    return figure_to_png(figure, dpi=dpi)


@dataclass(frozen=True)
class CaseOverlay:
    """The overlay of one selected case, or why there is none (``error``)."""

    patient_id: str
    series_uid: str
    series_description: str | None
    annotation_modality: str
    roi_source: str | None
    roi_canonical: str | None
    png: bytes | None
    notes: tuple[str, ...] = ()
    error: str | None = None


def _pick_roi(item: WorkItem, pattern: str) -> tuple[str, str] | None:
    for roi in item.rois:
        if re.search(pattern, roi.canonical, flags=re.IGNORECASE) or re.search(
            pattern, roi.source_name, flags=re.IGNORECASE
        ):
            return roi.source_name, roi.canonical
    return (item.rois[0].source_name, item.rois[0].canonical) if item.rois else None


def _roi_mask(item: WorkItem, source_name: str, image: sitk.Image) -> tuple[sitk.Image, tuple[str, ...]]:
    """The mask of one ROI (RTSTRUCT) or segment (SEG, by label) of a work item on ``image``'s grid."""

    if item.annotation_modality == "SEG":
        from cohort.curate.seg import read_seg, read_segment_infos

        ds = read_dicom(item.rtstruct_path)
        numbers = [info.number for info in read_segment_infos(ds) if info.label == source_name]
        if len(numbers) != 1:
            raise CurationReportError(f"{len(numbers)} segments labelled {source_name!r}; expected 1")
        segment = read_seg(ds, image, segment_numbers=numbers)[0]
        if segment.voxel_count == 0:
            raise CurationReportError(f"segment {source_name!r} is empty on the image grid")
        return segment.mask, segment.notes
    from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos

    ds = read_dicom(item.rtstruct_path)
    numbers = [info.number for info in read_roi_infos(ds) if info.name == source_name]
    if len(numbers) != 1:
        raise CurationReportError(f"{len(numbers)} ROIs named {source_name!r}; expected 1")
    roi = rasterise_rtstruct(ds, numbers[0], image)
    return roi.mask, roi.notes


def case_overlays(
    items: Sequence[WorkItem],
    *,
    max_cases: int = DEFAULT_MAX_OVERLAY_CASES,
    roi_pattern: str = DEFAULT_OVERLAY_ROI,
    n_slices: int = 3,
    window: tuple[float, float] = LUNG_WINDOW,
    panel_px: int = 256,
) -> list[CaseOverlay]:
    """Overlays of the first ``max_cases`` work items (sorted by patient, then series).

    Each reads its series (with the item's read policy) and rasterises the first
    of its ROIs matching ``roi_pattern`` (else its first ROI). A case that cannot
    be read or rasterised gets a :class:`CaseOverlay` with ``error`` set, shown
    as a note in the report; this function does not raise for one case.
    """
    from cohort.curate.series import assemble_series

    chosen = sorted(items, key=lambda i: (i.patient_id, i.series_uid, i.rtstruct_uid))[: max(0, max_cases)]
    overlays = []
    for item in chosen:
        picked = _pick_roi(item, roi_pattern)
        base = CaseOverlay(
            patient_id=item.patient_id,
            series_uid=item.series_uid,
            series_description=item.metadata.get("series_description"),
            annotation_modality=item.annotation_modality,
            roi_source=picked[0] if picked else None,
            roi_canonical=picked[1] if picked else None,
            png=None,
        )
        if picked is None:
            overlays.append(replace(base, error="the case has no ROI to show"))
            continue
        try:
            volume = assemble_series(item.image_paths, series_uid=item.series_uid, policy=item.read_policy)
            mask, mask_notes = _roi_mask(item, picked[0], volume.image)
            png = overlay_png(volume.image, mask, n_slices=n_slices, window=window, panel_px=panel_px)
        except Exception as exc:  # any failure of one case becomes its note, never stops the report
            overlays.append(replace(base, error=f"{type(exc).__name__}: {exc}"))
            continue
        notes = (*(f"image: {a}" for a in volume.actions), *mask_notes)
        overlays.append(replace(base, png=png, notes=notes))
    return overlays


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; }
td.pass { background: #e6f4ea; text-align: center; } td.fail { background: #fce8e6; text-align: center; }
.note { color: #555; } img { max-width: 100%; height: auto; }
figure { margin: 0.5em 0 1.5em; } figcaption { font-size: 0.85em; color: #444; }
details { margin: 0.3em 0 1em; } summary { cursor: pointer; color: #444; }
"""


@dataclass(frozen=True)
class _Cell:
    text: str
    title: str = ""
    cls: str = ""


def _cell(value: Any) -> _Cell:
    return value if isinstance(value, _Cell) else _Cell("" if value is None else str(value))


def _html_table(
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    table_class: str = "",
    groups: Sequence[tuple[str, int]] = (),
) -> str:
    """A table of escaped cells; ``groups`` adds a first header row of (label, columns spanned)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    if groups:
        spans = "".join(
            f"<th colspan='{n}'>{html.escape(label)}</th>" if n > 1 else f"<th>{html.escape(label)}</th>"
            for label, n in groups
        )
        head = f"{spans}</tr><tr>{head}"
    body = []
    for row in rows:
        cells = []
        for raw in row:
            cell = _cell(raw)
            attrs = ""
            if cell.cls:
                attrs += f' class="{html.escape(cell.cls)}"'
            if cell.title:
                attrs += f' title="{html.escape(cell.title)}"'
            cells.append(f"<td{attrs}>{html.escape(cell.text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = f' class="{html.escape(table_class)}"' if table_class else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _num(value: int | float) -> _Cell:
    return _Cell(f"{value:g}" if isinstance(value, float) else str(value), cls="num")


def _png_img(png: bytes, *, alt: str, cls: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _limited(rows: list[Any], limit: int, what: str) -> tuple[list[Any], str]:
    if len(rows) <= limit:
        return rows, ""
    return rows[:limit], f"<p class='note'>{limit} of {len(rows)} {html.escape(what)} shown.</p>"


def _series_descriptions(instances: pd.DataFrame) -> dict[str, str]:
    """The most frequent SeriesDescription of each series."""
    if instances.empty or "series_description" not in instances:
        return {}
    modes = _modes(instances.dropna(subset=["series_uid"]), ["series_uid"], "series_description")
    return dict(zip(modes["series_uid"].astype(str), modes["series_description"], strict=True))


def _summary_section(
    instances: pd.DataFrame,
    quarantine: pd.DataFrame,
    series: pd.DataFrame,
    qc: pd.DataFrame,
    decisions: pd.DataFrame,
    links: pd.DataFrame,
    items: Sequence[WorkItem] | None,
) -> str:
    rows: list[tuple[str, Any]] = [
        ("files indexed as DICOM instances", len(instances)),
        ("files quarantined", len(quarantine)),
        ("patients", int(instances["patient_id"].nunique()) if "patient_id" in instances else 0),
    ]
    for modality in modality_order(series["modality"]):
        rows.append((f"{modality} image series", int((series["modality"] == modality).sum())))
    if not qc.empty:
        rows.append(("(sub-)series through QC: passed", f"{int(qc['passed'].sum())} of {len(qc)}"))
    if not decisions.empty:
        selected = decisions[decisions["selected"].fillna(False).astype(bool)]
        rows.append(("decisions: selected", f"{len(selected)} of {len(decisions)}"))
    if items is not None:
        rows.append(("cases (work items)", len(items)))
    if not links.empty:
        linked = int(links["series_uid"].notna().sum())
        rows.append(
            ("structure-set / SEG links", f"{linked} linked, {int(links['series_uid'].isna().sum())} not")
        )
    return "<h2>Summary</h2>" + _html_table(
        ["", "count"],
        [(name, _num(v) if isinstance(v, int) else _Cell(str(v), cls="num")) for name, v in rows],
    )


def _distribution_section(series: pd.DataFrame, *, dpi: float) -> str:
    parts = ["<h2>Acquisition parameters</h2>"]
    if series.empty:
        return parts[0] + "<p class='note'>No image series in the index.</p>"
    parts.append(
        "<p class='note'>Each series counted once: text parameters take the most frequent value of the "
        "series, numbers the median over its instances.</p>"
    )
    for modality in modality_order(series["modality"]):
        subset = series[series["modality"] == modality]
        figure = plot_acquisition_parameters(series, modality)
        counts = [parameter_counts(subset, p) for p in ACQUISITION_PARAMETERS]
        alt = "; ".join(
            f"{c.parameter.title}: " + (", ".join(f"{v} ({n})" for v, n in c.counts) or NOT_RECORDED)
            for c in counts
        )
        rows = []
        for c in counts:
            values = (
                ", ".join(f"{v} ({n})" for v, n in c.counts)
                if c.discrete
                else f"{len(c.numeric_values)} series, min {min(c.numeric_values):g}, median "
                f"{float(np.median(c.numeric_values)):g}, max {max(c.numeric_values):g}"
            )
            rows.append((c.parameter.title, values or NOT_RECORDED, _num(c.missing)))
        parts += [
            f"<h3 id='parameters-{html.escape(modality)}'>{html.escape(modality)}: {len(subset)} series</h3>",
            f"<figure>{_png_img(figure_to_png(figure, dpi=dpi), alt=alt, cls='distribution')}</figure>",
            "<details><summary>counts (series per value)</summary>"
            + _html_table(["parameter", "values (series)", "not recorded"], rows, table_class="distribution")
            + "</details>",
        ]
    return "\n".join(parts)


def _qc_section(qc: pd.DataFrame, descriptions: Mapping[str, str], ids: _Identifiers, max_rows: int) -> str:
    head = "<h2>Quality checks</h2>"
    if qc.empty:
        return head + "<p class='note'>No image series went through QC.</p>"
    checks = [c for c in QcCheck if f"qc_{c}" in qc]
    counts = [
        (
            check.value,
            _num(int(qc[f"qc_{check}"].fillna(False).astype(bool).sum())),
            _num(int((~qc[f"qc_{check}"].fillna(False).astype(bool)).sum())),
        )
        for check in checks
    ]
    overall = qc["passed"].fillna(False).astype(bool)
    counts.append(("all checks", _num(int(overall.sum())), _num(int((~overall).sum()))))
    ordered = qc.sort_values(["patient_id", "series_key"], na_position="last", kind="stable")
    rows = []
    for _, r in ordered.iterrows():
        passed = bool(r["passed"]) if _present(r["passed"]) else False
        row: list[Any] = [
            ids.patient(r["patient_id"]),
            _Cell(ids.uid(r["series_key"]), title=ids.text(r["series_key"])),
            ids.text(descriptions.get(str(r["series_uid"]), "")),
            r["modality"] or "",
            ids.text(r["part"]),
            _num(int(r["n_slices"])) if _present(r["n_slices"]) else "",
        ]
        for check in checks:
            ok = bool(r[f"qc_{check}"]) if _present(r[f"qc_{check}"]) else False
            row.append(
                _Cell(
                    "✓" if ok else "✗", title=ids.text(r[f"qc_{check}_reason"]), cls="pass" if ok else "fail"
                )
            )
        row.append(_Cell("pass" if passed else "fail", cls="pass" if passed else "fail"))
        row.append("" if passed else ids.text(r["reason"]))
        rows.append(row)
    shown, note = _limited(rows, max_rows, "series")
    return (
        head
        + f"<p>{int(overall.sum())} of {len(qc)} (sub-)series pass every check.</p>"
        + _html_table(["check", "passed", "failed"], counts, table_class="qc-counts")
        + "<p class='note'>Hover a cell for the reason of its check.</p>"
        + _html_table(
            [
                "patient",
                "series",
                "description",
                "modality",
                "part",
                "slices",
                *(c.value.replace("_", " ") for c in checks),
                "overall",
                "why",
            ],
            shown,
            table_class="qc",
            groups=[("series", 6), ("checks", len(checks)), ("result", 2)],
        )
        + note
    )


def _counts_table(values: pd.Series, label: str, table_class: str) -> str:
    counts = values.fillna(NOT_RECORDED).astype(str).value_counts()
    pairs = sorted(((str(v), int(n)) for v, n in counts.items()), key=lambda vn: (-vn[1], vn[0]))
    return _html_table([label, "count"], [(v, _num(n)) for v, n in pairs], table_class=table_class)


def _decisions_section(
    decisions: pd.DataFrame, descriptions: Mapping[str, str], ids: _Identifiers, max_rows: int
) -> str:
    head = "<h2>Selection</h2>"
    if decisions.empty:
        return head + "<p class='note'>No image series to decide on.</p>"
    selected = decisions["selected"].fillna(False).astype(bool)
    step = decisions["step"] if "step" in decisions else pd.Series(np.where(selected, "selected", ""))
    order = {s.value: i for i, s in enumerate(DecisionStep)}
    ordered = decisions.assign(_order=step.map(order)).sort_values(
        ["patient_id", "series_key", "_order"], na_position="last", kind="stable"
    )
    rows = []
    for _, r in ordered.iterrows():
        chosen = bool(r["selected"]) if _present(r["selected"]) else False
        annotation = (
            f"{r.get('annotation_modality') or 'RTSTRUCT'} {ids.uid(r['rtstruct_uid'])}"
            if _present(r["rtstruct_uid"])
            else ""
        )
        rows.append(
            [
                ids.patient(r["patient_id"]),
                _Cell(ids.uid(r["series_key"]), title=ids.text(r["series_key"])),
                ids.text(descriptions.get(str(r["series_uid"]), "")),
                r["modality"] or "",
                _Cell(annotation, title=ids.text(r["rtstruct_uid"])),
                ids.text(r.get("link")),
                _Cell("yes" if chosen else "no", cls="pass" if chosen else "fail"),
                ids.text(r.get("step")),
                ids.text(r["reason"]),
            ]
        )
    shown, note = _limited(rows, max_rows, "decisions")
    return (
        head
        + f"<p>{int(selected.sum())} of {len(decisions)} decision rows selected.</p>"
        + _counts_table(step, "step (deciding)", "decision-counts")
        + _html_table(
            [
                "patient",
                "series",
                "description",
                "modality",
                "structure set",
                "link",
                "selected",
                "step",
                "why",
            ],
            shown,
            table_class="decisions",
        )
        + note
    )


def _links_section(
    links: pd.DataFrame, ids: _Identifiers, archive_root: str | os.PathLike[str] | None, max_rows: int
) -> str:
    head = "<h2>RTSTRUCT / SEG links</h2>"
    if links.empty:
        return head + "<p class='note'>No structure set or segmentation in the index.</p>"
    rows = []
    for _, r in links.sort_values(["annotation_path", "series_uid"], na_position="last").iterrows():
        linked = _present(r["series_uid"])
        rows.append(
            [
                r["annotation_modality"] or "",
                _Cell(ids.uid(r["annotation_uid"]), title=ids.text(r["annotation_uid"])),
                ids.text(relative_path(r["annotation_path"], archive_root)),
                _Cell(ids.uid(r["series_uid"]), title=ids.text(r["series_uid"]))
                if linked
                else _Cell("not linked", cls="fail"),
                ids.text(r["link"]),
                ids.text(r["note"]),
            ]
        )
    shown, note = _limited(rows, max_rows, "links")
    return (
        head
        + _html_table(
            ["modality", "object", "file", "image series", "link", "note"], shown, table_class="links"
        )
        + note
    )


def _quarantine_section(
    quarantine: pd.DataFrame, ids: _Identifiers, archive_root: str | os.PathLike[str] | None, max_rows: int
) -> str:
    head = "<h2>Quarantine</h2>"
    if quarantine.empty:
        return head + "<p>No file was quarantined.</p>"
    ordered = quarantine.sort_values("path", kind="stable")
    reasons = ordered["reason"].map(ids.text)
    rows = [
        [
            ids.text(relative_path(path, archive_root)),
            _num(int(size)) if _present(size) else "",
            reason,
        ]
        for path, size, reason in zip(ordered["path"], ordered["size"], reasons, strict=True)
    ]
    shown, note = _limited(rows, max_rows, "quarantined files")
    return (
        head
        + f"<p>{len(quarantine)} file(s) could not be indexed.</p>"
        + _counts_table(reasons, "reason", "quarantine-counts")
        + _html_table(["file", "bytes", "reason"], shown, table_class="quarantine")
        + note
    )


def _overlay_section(overlays: Sequence[CaseOverlay] | None, n_items: int | None, ids: _Identifiers) -> str:
    head = "<h2>Overlays</h2>"
    if overlays is None:
        return head + "<p class='note'>No overlays were made for this report.</p>"
    if not overlays:
        return head + "<p class='note'>No selected case to show.</p>"
    shown = f"{len(overlays)} of {n_items}" if n_items is not None else str(len(overlays))
    parts = [head, f"<p>{shown} selected case(s), GTV contour in red; slices in radiological view.</p>"]
    failed = []
    for overlay in overlays:
        roi = (
            f"{overlay.roi_source} → {overlay.roi_canonical}"
            if overlay.roi_source and overlay.roi_canonical and overlay.roi_source != overlay.roi_canonical
            else overlay.roi_source or "no ROI"
        )
        caption = " · ".join(
            x
            for x in (
                f"patient {ids.patient(overlay.patient_id)}",
                f"series {ids.uid(overlay.series_uid)}",
                ids.text(overlay.series_description),
                f"{overlay.annotation_modality} ROI {roi}",
            )
            if x
        )
        if overlay.png is None:
            failed.append((caption, ids.text(overlay.error or "no image")))
            continue
        notes = "".join(f"<br><span class='note'>{html.escape(ids.text(n))}</span>" for n in overlay.notes)
        parts.append(
            f"<figure>{_png_img(overlay.png, alt=caption, cls='overlay')}"
            f"<figcaption>{html.escape(caption)}{notes}</figcaption></figure>"
        )
    if failed:
        parts.append("<h3>Cases without an overlay</h3>")
        parts.append(_html_table(["case", "why"], failed, table_class="overlay-failures"))
    return "\n".join(parts)


#: The index columns the report reads.
_REPORT_COLUMNS = (
    "patient_id",
    "series_uid",
    "modality",
    "has_pixel_data",
    "series_description",
    *(p.column for p in ACQUISITION_PARAMETERS),
)


def render_curation_report(
    instances: pa.Table | pd.DataFrame,
    quarantine: pa.Table | pd.DataFrame,
    plan_or_tables: CurationPlan | CurationTables,
    *,
    overlays: Sequence[CaseOverlay] | None = None,
    title: str = "Cohort curation",
    archive_root: str | os.PathLike[str] | None = None,
    show_patient_ids: bool = False,
    id_key: bytes | None = None,
    max_table_rows: int = 5000,
    dpi: float = 80,
) -> str:
    """The curation as one self-contained HTML page (see the module docstring for its sections).

    ``instances`` and ``quarantine`` are the index tables
    (:data:`cohort.index.schema.INSTANCE_SCHEMA`, ``QUARANTINE_SCHEMA``);
    ``plan_or_tables`` the plan of :func:`cohort.curate.select.plan_cohort` or its
    stored tables; ``overlays`` what :func:`case_overlays` made (None: no overlay
    section beyond a note). Paths are shown relative to ``archive_root`` when they
    lie under it. Patient IDs and UIDs are hidden unless ``show_patient_ids``
    (see :func:`patient_label`; ``id_key`` keys the hash). Tables longer than
    ``max_table_rows`` are cut, saying so. This function reads no file.
    """
    inst = _frame(_columns(instances, _REPORT_COLUMNS))
    quar = _frame(quarantine)
    decisions = _frame(plan_or_tables.decisions)
    qc = _frame(plan_or_tables.qc)
    links = _frame(plan_or_tables.links)
    items = plan_or_tables.items if isinstance(plan_or_tables, CurationPlan) else None
    patient_ids = [
        *(inst["patient_id"].dropna() if "patient_id" in inst else []),
        *(decisions["patient_id"].dropna() if "patient_id" in decisions else []),
        *(qc["patient_id"].dropna() if "patient_id" in qc else []),
        *(o.patient_id for o in overlays or ()),
    ]
    ids = _Identifiers(patient_ids, show=show_patient_ids, key=id_key)
    series = series_parameters(inst)
    descriptions = _series_descriptions(inst)
    n_items = len(items) if items is not None else None
    privacy = (
        "Patient IDs and UIDs are shown."
        if show_patient_ids
        else "Patient IDs and UIDs are hidden: each is shown as the first "
        f"{LABEL_DIGITS} hex digits of its {'HMAC-' if id_key is not None else ''}SHA-256."
    )
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {html.escape(privacy)}</p>",
        _summary_section(inst, quar, series, qc, decisions, links, items),
        _distribution_section(series, dpi=dpi),
        _qc_section(qc, descriptions, ids, max_table_rows),
        _decisions_section(decisions, descriptions, ids, max_table_rows),
        _links_section(links, ids, archive_root, max_table_rows),
        _quarantine_section(quar, ids, archive_root, max_table_rows),
        _overlay_section(overlays, n_items, ids),
    ]
    body = "\n".join(sections)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>"
    )


def write_curation_report(
    instances: pa.Table | pd.DataFrame,
    quarantine: pa.Table | pd.DataFrame,
    plan_or_tables: CurationPlan | CurationTables,
    path: str | os.PathLike[str] | Location,
    *,
    overlays: Sequence[CaseOverlay] | None = None,
    title: str = "Cohort curation",
    archive_root: str | os.PathLike[str] | None = None,
    show_patient_ids: bool = False,
    id_key: bytes | None = None,
    max_table_rows: int = 5000,
    dpi: float = 80,
) -> str:
    """Render the report (arguments as for :func:`render_curation_report`) and write it atomically.

    ``path`` is a local path, a URL (``s3://...``) or a store
    :class:`~cohort.store.location.Location`; readers see the whole page or
    none of it. Returns where it was written (a local path or a URL).
    """
    from cohort.store.location import Location

    page = render_curation_report(
        instances,
        quarantine,
        plan_or_tables,
        overlays=overlays,
        title=title,
        archive_root=archive_root,
        show_patient_ids=show_patient_ids,
        id_key=id_key,
        max_table_rows=max_table_rows,
        dpi=dpi,
    )
    target = Location.parse(path)
    target.write_bytes_atomic(page.encode("utf-8"))
    return target.url


def curation_summary_markdown(
    instances: pa.Table | pd.DataFrame,
    quarantine: pa.Table | pd.DataFrame,
    plan_or_tables: CurationPlan | CurationTables,
    *,
    report_url: str | None = None,
) -> str:
    """A short Markdown summary of the curation, e.g. for a Prefect artifact.

    Counts only: QC failures per check, selection, quarantine by reason (with
    patient IDs and UIDs in a reason replaced by their labels).
    """
    inst = _frame(_columns(instances, _REPORT_COLUMNS))
    quar = _frame(quarantine)
    qc = _frame(plan_or_tables.qc)
    decisions = _frame(plan_or_tables.decisions)
    series = series_parameters(inst)
    ids = _Identifiers(inst["patient_id"].dropna() if "patient_id" in inst else [], show=False, key=None)
    rows: list[tuple[str, str]] = [
        ("DICOM instances", str(len(inst))),
        ("patients", str(int(inst["patient_id"].nunique()) if "patient_id" in inst else 0)),
        *(
            (f"{m} image series", str(int((series["modality"] == m).sum())))
            for m in modality_order(series["modality"])
        ),
        (
            "(sub-)series passing QC",
            f"{int(qc['passed'].fillna(False).astype(bool).sum())} of {len(qc)}" if not qc.empty else "0",
        ),
    ]
    if not qc.empty:
        for check in (c for c in QcCheck if f"qc_{c}" in qc):
            failed = int((~qc[f"qc_{check}"].fillna(False).astype(bool)).sum())
            if failed:
                rows.append((f"failed QC check {check.value}", str(failed)))
    if not decisions.empty:
        selected = int(decisions["selected"].fillna(False).astype(bool).sum())
        rows.append(("decisions: selected", f"{selected} of {len(decisions)}"))
    rows.append(("files quarantined", str(len(quar))))
    if not quar.empty:
        for reason, n in quar["reason"].fillna(NOT_RECORDED).astype(str).value_counts().head(10).items():
            short = ids.text(reason).replace("|", "/")
            rows.append((f"quarantined: {short}", str(int(n))))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    link = f"\n\nFull report: [{report_url}]({report_url})" if report_url else ""
    return f"# Curation\n\n| | |\n|---|---|\n{table}{link}\n"


__all__ = [
    "ACQUISITION_PARAMETERS",
    "DEFAULT_MAX_OVERLAY_CASES",
    "LUNG_WINDOW",
    "SOFT_TISSUE_WINDOW",
    "AcquisitionParameter",
    "CaseOverlay",
    "CurationReportError",
    "CurationTables",
    "ParameterCounts",
    "ParameterKind",
    "case_overlays",
    "curation_summary_markdown",
    "figure_to_png",
    "modality_order",
    "overlay_png",
    "overlay_slices",
    "parameter_counts",
    "patient_label",
    "plot_acquisition_parameters",
    "relative_path",
    "render_curation_report",
    "series_parameters",
    "write_curation_report",
]
