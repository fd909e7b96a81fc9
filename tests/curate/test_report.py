"""The curation report: QC, selection, links, quarantine, parameter distributions, overlays, hidden IDs."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass, replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import SimpleITK as sitk
from PIL import Image

from cohort.curate.qc import QcCheck
from cohort.curate.report import (
    ACQUISITION_PARAMETERS,
    CaseOverlay,
    CurationReportError,
    CurationTables,
    case_overlays,
    curation_summary_markdown,
    overlay_png,
    overlay_slices,
    patient_label,
    plot_acquisition_parameters,
    render_curation_report,
    series_parameters,
    write_curation_report,
)
from cohort.curate.select import CurationPlan, plan_cohort
from cohort.index.crawl import index_files, list_archive
from cohort.spec import build_spec
from cohort.synth.archive import DemoArchive, write_demo_archive

N_PATIENTS = 4
OVERLAY_CASES = 3  # fewer than the selected cases: the cap is part of what is tested
PANEL_PX = 96


Rows = list[list[tuple[str, dict[str, str]]]]


class _Tables(HTMLParser):
    """The tables of a page by class, in page order: body rows of cells as (text, attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[Rows]] = {}
        self._class: str | None = None
        self._in_body = False
        self._cell: tuple[list[str], dict[str, str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "table":
            self._class = values.get("class", "")
            self.tables.setdefault(self._class, []).append([])
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._class is not None:
            self.tables[self._class][-1].append([])
        elif tag == "td" and self._in_body:
            self._cell = ([], values)

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[0].append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._class is not None:
            self.tables[self._class][-1][-1].append(("".join(self._cell[0]), self._cell[1]))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._class = None


def tables(page: str, cls: str) -> list[Rows]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables.get(cls, [])


def table(page: str, cls: str) -> Rows:
    """The one table of class ``cls``."""
    (found,) = tables(page, cls)
    return found


def texts(rows: Rows) -> list[list[str]]:
    return [[text for text, _ in row] for row in rows]


def embedded_pngs(page: str, cls: str) -> list[bytes]:
    found = re.findall(rf'<img class="{cls}" alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [base64.b64decode(data) for data in found]


@dataclass(frozen=True)
class Curated:
    demo: DemoArchive
    instances: pa.Table
    quarantine: pa.Table
    plan: CurationPlan
    overlays: list[CaseOverlay]
    page: str


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Curated:
    root = tmp_path_factory.mktemp("curation-report") / "archive"
    demo = write_demo_archive(root, N_PATIENTS, matrix=64)
    (root / "DEMO-002" / "request-form.txt").write_text("a scanned request form, not DICOM\n")
    instances, quarantine = index_files(list_archive(root))
    spec = build_spec({"archive": str(root), "store": str(root.parent / "store")}, environ={})
    plan = plan_cohort(instances, spec)
    overlays = case_overlays(plan.items, max_cases=OVERLAY_CASES, panel_px=PANEL_PX)
    page = render_curation_report(instances, quarantine, plan, overlays=overlays, archive_root=root)
    return Curated(demo, instances, quarantine, plan, overlays, page)


def test_qc_table_has_one_row_per_ct_series_and_counts_per_check(curated: Curated) -> None:
    rows = table(curated.page, "qc")
    assert len(rows) == N_PATIENTS
    overall = [row[-2][0] for row in rows]
    assert overall == ["pass"] * N_PATIENTS
    # one pass/fail cell per check, its reason on hover: the kernel check names each series' kernel
    kernel_column = 6 + list(QcCheck).index(QcCheck.KERNEL)
    hovers = sorted(row[kernel_column][1]["title"] for row in rows)
    assert hovers == sorted(f"{p.scanner.kernel} (no limit)" for p in curated.demo.patients)
    counts = {row[0]: row[1:] for row in texts(table(curated.page, "qc-counts"))}
    assert set(counts) == {*(c.value for c in QcCheck), "all checks"}
    assert counts["all checks"] == [str(N_PATIENTS), "0"]
    assert counts["kernel"] == [str(N_PATIENTS), "0"]


def test_selection_and_links_are_listed_per_series(curated: Curated) -> None:
    decisions = texts(table(curated.page, "decisions"))
    assert len(decisions) == N_PATIENTS
    assert {row[6] for row in decisions} == {"yes"}
    assert sorted(row[8] for row in decisions) == sorted(
        f"ROIs {p.gtv_name} -> GTV" for p in curated.demo.patients
    )
    links = texts(table(curated.page, "links"))
    assert len(links) == N_PATIENTS
    assert {row[4] for row in links} == {"referenced_series"}
    # paths relative to the archive root, the patient folder hidden
    assert sorted(row[2] for row in links) == sorted(
        f"{patient_label(p.patient_id)}/RS/RS.dcm" for p in curated.demo.patients
    )


def test_quarantine_lists_each_file_relative_to_the_root_with_its_reason(curated: Curated) -> None:
    rows = {row[0]: row for row in texts(table(curated.page, "quarantine"))}
    # the demo's clinical CSV and the file added to a patient folder
    assert set(rows) == {"clinical.csv", f"{patient_label('DEMO-002')}/request-form.txt"}
    assert all(row[2].startswith("not DICOM") for row in rows.values())
    counts = texts(table(curated.page, "quarantine-counts"))
    assert len(counts) == 1 and counts[0][1] == "2" and counts[0][0].startswith("not DICOM")


def test_overlays_are_embedded_for_the_capped_number_of_cases(curated: Curated) -> None:
    assert len(curated.plan.items) == N_PATIENTS
    assert [o.error for o in curated.overlays] == [None] * OVERLAY_CASES
    pngs = embedded_pngs(curated.page, "overlay")
    assert len(pngs) == OVERLAY_CASES
    with Image.open(io.BytesIO(pngs[0])) as image:
        assert image.size == (3 * PANEL_PX, PANEL_PX)
    assert f"{OVERLAY_CASES} of {N_PATIENTS} selected case(s)" in curated.page


def test_kernel_distribution_counts_each_series_once(curated: Curated) -> None:
    series = series_parameters(curated.instances)
    assert len(series) == N_PATIENTS  # 4 CT series, not one row per slice; the RTSTRUCTs are left out
    assert series["n_instances"].sum() == sum(p.n_slices for p in curated.demo.patients)
    kernels = sorted(p.scanner.kernel for p in curated.demo.patients)
    figure = plot_acquisition_parameters(series, "CT")
    column = [p.column for p in ACQUISITION_PARAMETERS].index("convolution_kernel")
    labels = [t.get_text() for t in figure.axes[column].get_yticklabels()]
    assert sorted(labels) == kernels
    distribution = {row[0]: row[1] for row in texts(table(curated.page, "distribution"))}
    assert distribution["convolution kernel"] == ", ".join(f"{k} (1)" for k in kernels)
    assert len(embedded_pngs(curated.page, "distribution")) == 1  # one modality with images: CT


def test_patient_ids_and_uids_are_hidden_by_default_and_shown_when_asked(curated: Curated) -> None:
    ids = [p.patient_id for p in curated.demo.patients]
    uids = {i.series_uid for i in curated.plan.items} | {i.rtstruct_uid for i in curated.plan.items}
    hidden = curated.page
    assert not any(pid in hidden for pid in ids)
    assert not any(uid in hidden for uid in uids)
    assert all(patient_label(pid) in hidden for pid in ids)
    assert "Demo^" not in hidden  # PatientName never appears
    shown = render_curation_report(curated.instances, curated.quarantine, curated.plan, show_patient_ids=True)
    assert all(pid in shown for pid in ids)
    assert "Demo^" not in shown
    assert "No overlays were made" in shown


def test_failed_overlay_is_a_note_in_the_written_report(curated: Curated, tmp_path: Path) -> None:
    broken = replace(curated.plan.items[0], image_paths=(str(tmp_path / "missing.dcm"),))
    (overlay,) = case_overlays([broken], panel_px=PANEL_PX)
    assert overlay.png is None and overlay.error is not None and "missing.dcm" in overlay.error
    stored = CurationTables(curated.plan.decisions, curated.plan.qc, curated.plan.links)
    target = tmp_path / "run" / "curation.html"
    written = write_curation_report(
        curated.instances, curated.quarantine, stored, target, overlays=[overlay], id_key=b"secret"
    )
    assert written == str(target)
    assert [p.name for p in target.parent.iterdir()] == ["curation.html"]  # no temporary file left
    page = target.read_text()
    failures = texts(table(page, "overlay-failures"))
    assert len(failures) == 1 and "missing.dcm" in failures[0][1]
    assert embedded_pngs(page, "overlay") == []
    # keyed labels: an HMAC of the ID, not its plain hash
    pid = curated.demo.patients[0].patient_id
    assert patient_label(pid, key=b"secret") in page and patient_label(pid) not in page
    assert pid not in page and pid not in failures[0][0]


def test_markdown_summary_gives_counts_and_the_link_without_identifiers(curated: Curated) -> None:
    md = curation_summary_markdown(
        curated.instances, curated.quarantine, curated.plan, report_url="runs/r1/curation.html"
    )
    assert f"| CT image series | {N_PATIENTS} |" in md
    assert f"| (sub-)series passing QC | {N_PATIENTS} of {N_PATIENTS} |" in md
    assert f"| decisions: selected | {N_PATIENTS} of {N_PATIENTS} |" in md
    assert "| files quarantined | 2 |" in md
    assert "[runs/r1/curation.html](runs/r1/curation.html)" in md
    assert "DEMO-" not in md


def _phantom(shape: tuple[int, int, int] = (20, 40, 50)) -> sitk.Image:
    values = np.full(shape, -800, dtype=np.int16)  # lung
    values[:, 10:30, 10:40] = 40  # soft tissue
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((-20.0, -16.0, 100.0))
    return image


def _red_pixels(png: bytes, panels: int) -> list[int]:
    with Image.open(io.BytesIO(png)) as opened:
        rgb = np.asarray(opened.convert("RGB")).astype(int)
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    return [int(part.sum()) for part in np.array_split(red, panels, axis=1)]


def test_overlay_png_of_a_square_mask_has_the_requested_size_and_a_contour_per_panel() -> None:
    image = _phantom()
    mask = np.zeros((20, 40, 50), dtype=np.uint8)
    mask[5:15, 15:25, 20:30] = 1
    mask[9, 14:26, 19:31] = 1  # the largest slice
    assert overlay_slices(mask, 3) == [7, 9, 13]
    assert overlay_slices(mask, 1) == [9]
    assert overlay_slices(mask[:7], 3) == [5, 6]
    png = overlay_png(image, mask, n_slices=3, panel_px=120, window=(40, 400))
    with Image.open(io.BytesIO(png)) as opened:
        assert opened.size == (360, 120)
    assert all(count > 0 for count in _red_pixels(png, 3))
    # a ROI on two slices gives two panels; a mask filling a whole slice still draws (no warning)
    two = np.zeros_like(mask)
    two[3:5] = 1
    with Image.open(io.BytesIO(overlay_png(image, two, n_slices=3, panel_px=64))) as opened:
        assert opened.size == (128, 64)


def test_overlay_png_refuses_an_empty_or_misplaced_mask() -> None:
    image = _phantom()
    with pytest.raises(CurationReportError, match="empty"):
        overlay_png(image, np.zeros((20, 40, 50), dtype=np.uint8))
    with pytest.raises(CurationReportError, match="shape"):
        overlay_png(image, np.ones((20, 50, 40), dtype=np.uint8))


@pytest.mark.slow
def test_real_archive_report_shows_both_gtvs_ct_first_and_hides_the_lung1_ids(lung1_archive: Path) -> None:
    instances, quarantine = index_files(list_archive(lung1_archive))
    plan = plan_cohort(instances, build_spec({"archive": str(lung1_archive), "store": "unused"}, environ={}))
    overlays = case_overlays(plan.items, panel_px=128)
    assert [(o.roi_source, o.error) for o in overlays] == [("GTV-1", None)] * 2
    page = render_curation_report(instances, quarantine, plan, overlays=overlays, archive_root=lung1_archive)
    assert len(embedded_pngs(page, "overlay")) == 2
    # CT first, then the dose grids; LUNG1-002's planning-system CT header has no kernel
    assert page.index("id='parameters-CT'") < page.index("id='parameters-RTDOSE'")
    ct, dose = ({row[0]: row[1] for row in texts(t)} for t in tables(page, "distribution"))
    assert ct["convolution kernel"] == "B19f (1), (not recorded) (1)"
    assert dose["convolution kernel"] == "(not recorded) (2)"
    assert "LUNG1-00" not in page
