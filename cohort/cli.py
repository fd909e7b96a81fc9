"""The ``cohort`` command: demo, run, index, synth.

Heavy imports (Prefect, Dask, pyradiomics) happen inside the commands, so
``cohort --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cohort.errors import CohortError, SpecError

DEMO_SPEC = """\
# Cohort spec written by `cohort demo`. Edit and run with: cohort run {spec}
name: demo
archive: archive          # relative paths are relative to this file
store: store
selection:
  modality: CT
  require_roi: GTV        # an RTSTRUCT ROI harmonised to this name must exist
rois:                     # canonical name -> case-insensitive full-match patterns
  GTV: ['gtv[-_ ]?1', 'gtv', 'gtv[-_ ]?p(rimary)?']
radiomics:
  preset: ct-original     # or params_file: my-params.yaml, or params: {{...}}
segmentation:             # the demo U-Net (models/demo-lung-gtv) segments every selected CT;
  model: demo-lung-gtv    # its mask is a second ROI, GTV_auto, beside the RTSTRUCT's GTV (null: off)
  roi: GTV_auto
  outputs: [seg, rtstruct]  # its masks as DICOM-SEG and RTSTRUCT under store/masks/ (for a viewer)
executor:
  kind: dask              # LocalCluster; set address: tcp://host:8786 for a cluster
  n_workers: {workers}
"""


DEMO_ANALYSIS = """\
# Analysis spec written by `cohort demo`. Run with: cohort analyse {spec}
name: demo
store: store
clinical: archive/clinical.csv
clinical_key: PatientID
roi: GTV
time: survival_days
event: event
time_unit: days
report_unit: months
features: '^original_'
batch: manufacturer      # ComBat across scanners; null to skip
combat:
  method: parametric     # parametric | nonparametric | none (no empirical Bayes)
  mean_only: false
km_feature: original_shape_VoxelVolume
top_k: 10
"""


def load_analysis_spec(path: str | Path) -> Any:
    """Read an analysis spec YAML; relative paths are relative to the file."""
    import yaml
    from pydantic import ValidationError

    from cohort.analysis.pipeline import AnalysisSpec

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read the analysis spec: {exc}", subject=str(path)) from exc
    for key in ("store", "clinical"):
        value = data.get(key)
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            data[key] = str((path.parent / value).resolve())
    try:
        return AnalysisSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise SpecError(f"invalid analysis spec: {problems}", subject=str(path)) from exc


def _print_analysis(head: dict[str, Any], console: Any) -> None:
    plain = {"markup": False, "highlight": False, "soft_wrap": True}
    console.print(
        f"{head['patients']} patients, {head['features']} features; log-rank p = {head['logrank_p']:.3g} "
        f"({head['km_feature']} above vs at-or-below {head['km_cutoff']:.6g}); C-index {head['c_index']:.3f}",
        **plain,
    )
    console.print(
        f"strongest univariate Cox: {head['top_cox_feature']} (HR per SD {head['top_cox_hr_per_sd']:.3g},"
        f" p = {head['top_cox_p']:.3g})",
        **plain,
    )
    console.print(f"report: {head['report']}", **plain)


def cmd_analyse(args: argparse.Namespace) -> int:
    from rich.console import Console

    from flows.analyse_cohort import run_analysis_flow

    _quiet_runtime(args.verbose)
    spec = load_analysis_spec(args.spec)
    console = Console()
    _print_analysis(run_analysis_flow(spec), console)
    return 0


def _quiet_runtime(verbose: bool) -> None:
    """Defaults for the run's environment, set before Prefect/Dask are imported."""
    os.environ.setdefault("PREFECT_HOME", str(Path.home() / ".cache" / "cohort" / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")


def _run_with_progress(spec: Any, console: Any) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.process_cohort import run_cohort
    from flows.progress import progress_hook

    labels = {"index": "indexing files", "process": "processing cases"}
    with Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bars: dict[str, Any] = {}

        def hook(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(labels.get(stage, stage), total=total)
            progress.update(bars[stage], completed=done, total=total)

        console.print("[dim]starting Prefect API and Dask workers…[/dim]")
        token = progress_hook.set(hook)
        try:
            return run_cohort(spec)
        finally:
            progress_hook.reset(token)


def _print_summary(summary: Any, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"cohort run {summary.run_id}", show_header=False)
    rows = [
        ("files seen / quarantined", f"{summary.files_seen} / {summary.files_quarantined}"),
        ("image series found", str(summary.image_series)),
        ("cases selected", str(summary.cases_selected)),
        ("cases processed", str(summary.cases_processed)),
        ("cases failed", str(summary.cases_failed)),
        ("cases already in store", str(summary.cases_skipped)),
        ("feature rows written", str(summary.rows_written)),
        ("feature rows replaced (inputs changed)", str(summary.rows_replaced)),
        ("failure rows", str(summary.failures)),
        ("feature set", summary.feature_set),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    plain = {"markup": False, "highlight": False, "soft_wrap": True}
    console.print(f"store: {summary.store}", **plain)
    console.print("Read the features with:", **plain)
    console.print(f'  import pandas as pd; df = pd.read_parquet("{summary.feature_table}")', **plain)
    if summary.failures:
        console.print("Failures, with the stage and reason:", **plain)
        console.print(f'  pd.read_parquet("{summary.store}/failures/{summary.run_id}")', **plain)


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cohort.spec import load_spec

    _quiet_runtime(args.verbose)
    overrides: dict[str, Any] = {}
    if args.store:
        overrides["store"] = args.store  # a folder or s3://bucket/prefix
    if args.archive:
        overrides["archive"] = args.archive if "://" in args.archive else str(Path(args.archive).resolve())
    if args.scheduler:
        overrides.setdefault("executor", {})["address"] = args.scheduler
    if args.workers:
        overrides.setdefault("executor", {})["n_workers"] = args.workers
    if args.model:
        model = None if args.model.lower() == "none" else args.model
        if model and "/" in model:
            model = str(Path(model).resolve())
        overrides["segmentation"] = {"model": model}
    spec = load_spec(args.spec, overrides=overrides)
    console = Console()
    summary = _run_with_progress(spec, console)
    _print_summary(summary, console)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cohort.spec import load_spec
    from cohort.synth import write_demo_archive

    _quiet_runtime(args.verbose)
    console = Console()
    workdir = Path(args.dir).resolve()
    archive = workdir / "archive"
    if not archive.exists() or args.regenerate:
        console.print(f"writing a synthetic archive of {args.patients} patients to {archive}")
        write_demo_archive(archive, args.patients, seed=args.seed)
    spec_path = workdir / "cohort.yaml"
    if not spec_path.exists() or args.regenerate:
        spec_path.write_text(DEMO_SPEC.format(spec=spec_path, workers=args.workers))
    spec = load_spec(spec_path)
    console.print(f"cohort spec: {spec_path}")
    summary = _run_with_progress(spec, console)
    _print_summary(summary, console)
    console.print(f"Clinical table of the demo patients: {archive / 'clinical.csv'}")
    analysis_path = workdir / "analysis.yaml"
    if not analysis_path.exists() or args.regenerate:
        analysis_path.write_text(DEMO_ANALYSIS.format(spec=analysis_path))
    if not args.no_analysis:
        from flows.analyse_cohort import run_analysis_flow

        console.print("analysing the cohort: ComBat across scanners, survival, exploration")
        _print_analysis(run_analysis_flow(load_analysis_spec(analysis_path)), console)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Bring an incremental header index of a folder up to date (a re-run reads only what changed)."""
    from rich.console import Console

    from cohort.index import read_instances, update_index

    console = Console()
    out = Path(args.out)
    with console.status("indexing"):
        update = update_index(args.path, out, workers=args.workers)
    console.print(
        f"{update.listed} files: {update.added} added, {update.changed} changed, {update.deleted} deleted, "
        f"{update.unchanged} unchanged ({update.files_read} read); "
        f"{update.instances} DICOM instances, {update.quarantined} quarantined",
        soft_wrap=True,
    )
    df = read_instances(out).to_pandas()
    if not df.empty:
        counts = df.groupby("modality").agg(instances=("path", "size"), series=("series_uid", "nunique"))
        console.print(counts.to_string())
    console.print(
        f'index: pd.read_parquet("{out / "instances"}")', markup=False, highlight=False, soft_wrap=True
    )
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    """The segment-cohort flow for a spec: model masks, measurements, metrics against a reference ROI."""
    from cohort.spec import load_spec
    from flows.segment_cohort import run_segmentation

    _quiet_runtime(args.verbose)
    overrides: dict[str, Any] = {"store": args.store} if args.store else {}
    spec = load_spec(args.spec, overrides=overrides)
    compare_to = None if args.compare_to.lower() == "none" else args.compare_to
    result = run_segmentation(spec, model=args.model, compare_to=compare_to, gpu=args.gpu)
    print(
        f"{result['cases']} case(s): {result['segmented']} segmented, {result['skipped']} already done, "
        f"{result['failures']} failed"
    )
    print(f'rows: pd.read_parquet("{result["table"]}")')
    return 1 if result["failures"] else 0


#: Environment variable holding the de-identification key (never in a spec or on the command line).
DEID_SECRET_ENV = "COHORT_DEID_SECRET"


def cmd_export(args: argparse.Namespace) -> int:
    """De-identified DICOM and/or NIfTI of the cases a spec selects."""
    from cohort.curate.deid import DeidSettings
    from cohort.curate.export import export_cohort
    from cohort.curate.select import plan_cohort
    from cohort.index import index_files, list_archive
    from cohort.spec import load_spec

    secret = os.environ.get(DEID_SECRET_ENV)
    if not secret:
        raise SpecError(
            f"set {DEID_SECRET_ENV} to a private random key (e.g. `python -c 'import secrets; "
            "print(secrets.token_hex(32))'`) and keep it: the same key gives the same pseudonyms",
            subject=DEID_SECRET_ENV,
        )
    spec = load_spec(args.spec, overrides={"archive": args.archive} if args.archive else None)
    settings = DeidSettings(
        secret=secret.encode(), dates=args.dates, descriptors=args.descriptors, private_tags=args.private_tags
    )
    if "://" in spec.archive:
        raise SpecError(
            "cohort export reads a local (or mounted) archive; process the object-store archive with "
            "`cohort run`, or mount it (e.g. s3fs, rclone mount) and give the folder with --archive",
            subject=spec.archive,
        )
    instances, _ = index_files(list_archive(spec.archive))
    plan = plan_cohort(instances, spec)
    formats = {"dicom": (True, False), "nifti": (False, True), "both": (True, True)}[args.format]
    result = export_cohort(
        plan.items, args.out, settings, map_dir=args.map_dir, dicom=formats[0], volumes=formats[1]
    )
    exported = len(result.dicom.files) if result.dicom else 0
    print(
        f"{len(plan.items)} case(s): {exported} DICOM object(s), {result.volumes_written} volume(s) written"
    )
    print(f"pseudonym map: {Path(args.map_dir) / 'pseudonyms.csv'} (keep it apart from the export)")
    for failure in result.failures:
        print(f"not exported: {failure.reason}", file=sys.stderr)
    return 1 if result.failures else 0


def _slice_range(text: str) -> int | tuple[int, int]:
    """``--slices``: ``80`` or ``40-120``."""
    low, _, high = text.partition("-")
    try:
        return (int(low), int(high)) if high else int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW-HIGH, got {text!r}") from None


def cmd_synth(args: argparse.Namespace) -> int:
    import time

    from cohort.synth.archive import write_demo_archive, write_scale_archive

    if args.demo:
        scale_only = {"--workers": args.workers, "--slices": args.slices, "--long-series": args.long_series}
        given = [name for name, value in scale_only.items() if value]
        if given:
            raise SpecError(f"{', '.join(given)} apply to the scale archive; drop --demo", subject="synth")
        demo = write_demo_archive(
            args.out, args.patients, seed=args.seed, matrix=args.matrix or 256, fresh_uids=args.fresh_uids
        )
        print(f"wrote {len(demo.patients)} patients to {demo.root}; clinical table {demo.clinical_csv}")
        return 0
    start = time.perf_counter()
    try:
        archive = write_scale_archive(
            args.out,
            args.patients,
            slices=args.slices,
            matrix=args.matrix or 128,
            workers=args.workers,
            seed=args.seed,
            fresh_uids=args.fresh_uids,
            long_series=args.long_series,
        )
    except ValueError as exc:
        raise SpecError(str(exc), subject="synth") from exc
    seconds = time.perf_counter() - start
    long_note = f" + {archive.long_series.n_slices}-slice series" if archive.long_series else ""
    print(
        f"wrote {len(archive.patients)} patients{long_note} ({archive.files} files, "
        f"{archive.bytes / 2**20:.0f} MiB) to {archive.root} in {seconds:.1f} s; "
        f"clinical table {archive.clinical_csv}"
    )
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from importlib import resources

    folder = resources.files("cohort.radiomics") / "presets"
    for entry in sorted(folder.iterdir(), key=lambda p: p.name.removesuffix(".yaml")):
        if not entry.name.endswith(".yaml"):
            continue
        comment = " ".join(
            line.lstrip("# ").strip() for line in entry.read_text().splitlines() if line.startswith("#")
        )
        print(f"{entry.name.removesuffix('.yaml'):20s} {comment}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """A Prefect server with its UI (unless PREFECT_API_URL is set) serving the cohort deployments."""
    from flows.deployments import build_deployments, serve_deployments
    from flows.runtime import local_prefect_server

    if bool(args.archive) != bool(args.store):
        raise SpecError("--archive and --store go together (they define the nightly run)", subject="serve")
    archive = str(Path(args.archive).resolve()) if args.archive else None
    store = args.store if not args.store or "://" in args.store else str(Path(args.store).resolve())
    spec = str(Path(args.spec).resolve()) if args.spec else None
    deployments = build_deployments(
        nightly_archive=archive, nightly_store=store, nightly_spec=spec, cron=args.cron
    )
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
    if os.environ.get("PREFECT_API_URL"):
        print(f"serving {names} on {os.environ['PREFECT_API_URL']}", flush=True)
        serve_deployments(deployments, limit=args.limit)
        return 0
    with local_prefect_server(
        Path(args.prefect_home) if args.prefect_home else None, host=args.host, port=args.port, ui=True
    ) as url:
        os.environ["PREFECT_API_URL"] = url
        print(f"Prefect UI: {url.removesuffix('/api')}  (API {url})", flush=True)
        print(f"serving {names}; Ctrl-C stops", flush=True)
        serve_deployments(deployments, limit=args.limit)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cohort", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate a synthetic archive and run the cohort flow on it")
    demo.add_argument("--dir", default="demo", help="working folder (archive/, store/, cohort.yaml)")
    demo.add_argument("--patients", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workers", type=int, default=2, help="Dask worker processes")
    demo.add_argument("--regenerate", action="store_true", help="rewrite the archive and spec")
    demo.add_argument("--no-analysis", action="store_true", help="skip the analysis flow")
    demo.add_argument("-v", "--verbose", action="store_true", help="show Prefect and Dask logs")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run the cohort flow for a spec")
    run.add_argument("spec", help="cohort spec YAML")
    run.add_argument("--store", help="override the spec's store")
    run.add_argument("--archive", help="override the spec's archive")
    run.add_argument("--scheduler", help="address of an existing Dask scheduler")
    run.add_argument("--workers", type=int, help="LocalCluster worker processes")
    run.add_argument(
        "--model", help="segment every selected CT with this model (name or folder; 'none': off)"
    )
    run.add_argument("-v", "--verbose", action="store_true", help="show Prefect and Dask logs")
    run.set_defaults(func=cmd_run)

    analyse = sub.add_parser("analyse", help="run the analysis flow (ComBat, survival, report) for a spec")
    analyse.add_argument("spec", help="analysis spec YAML")
    analyse.add_argument("-v", "--verbose", action="store_true", help="show Prefect logs")
    analyse.set_defaults(func=cmd_analyse)

    serve = sub.add_parser(
        "serve", help="start a Prefect server + UI and serve the cohort deployments (and a nightly run)"
    )
    serve.add_argument("--archive", help="archive of the nightly run (with --store)")
    serve.add_argument("--store", help="store of the nightly run: a folder or s3://bucket/prefix")
    serve.add_argument("--spec", help="cohort spec YAML of the nightly run")
    serve.add_argument("--cron", default="0 2 * * *", help="schedule of the nightly run (default 02:00)")
    serve.add_argument("--host", default="127.0.0.1", help="address the Prefect server listens on")
    serve.add_argument("--port", type=int, default=4200, help="port of the Prefect server")
    serve.add_argument("--prefect-home", help="PREFECT_HOME of the server (its SQLite database)")
    serve.add_argument("--limit", type=int, help="flow runs at once (default: no limit)")
    serve.set_defaults(func=cmd_serve)

    index = sub.add_parser("index", help="index the DICOM headers of a folder to Parquet")
    index.add_argument("path")
    index.add_argument("--out", default="index", help="index folder (updated in place on later runs)")
    index.add_argument("--workers", type=int, default=1, help="reader processes")
    index.set_defaults(func=cmd_index)

    segment = sub.add_parser(
        "segment", help="segment the selected CTs with a registry model (segment-cohort)"
    )
    segment.add_argument("spec", help="cohort spec YAML")
    segment.add_argument("--model", default="demo-lung-gtv", help="model name in models/ or a model folder")
    segment.add_argument("--compare-to", default="GTV", help="reference ROI (canonical name) or 'none'")
    segment.add_argument(
        "--gpu", action="store_true", help="send shards to Dask workers with resources GPU=1"
    )
    segment.add_argument("--store", help="override the spec's store")
    segment.add_argument("-v", "--verbose", action="store_true", help="show Prefect and Dask logs")
    segment.set_defaults(func=cmd_segment)

    export = sub.add_parser(
        "export", help=f"de-identified DICOM and/or NIfTI of the selected cases (key in ${DEID_SECRET_ENV})"
    )
    export.add_argument("spec", help="cohort spec YAML (its selection and ROIs)")
    export.add_argument("--out", required=True, help="output folder (named by pseudonyms only)")
    export.add_argument("--map-dir", required=True, help="folder for the pseudonym map, outside --out")
    export.add_argument("--archive", help="override the spec's archive")
    export.add_argument("--format", choices=["dicom", "nifti", "both"], default="dicom")
    export.add_argument("--dates", choices=["shift", "keep", "remove"], default="shift")
    export.add_argument("--descriptors", choices=["clean", "keep", "remove"], default="clean")
    export.add_argument("--private-tags", choices=["remove", "keep"], default="remove")
    export.set_defaults(func=cmd_export)

    presets = sub.add_parser("presets", help="list the shipped radiomics presets")
    presets.set_defaults(func=cmd_presets)

    synth = sub.add_parser(
        "synth",
        help="write a synthetic CT + RTSTRUCT archive (12 scanners/kernels, in parallel; --demo: the demo's)",
    )
    synth.add_argument("out")
    synth.add_argument("--patients", type=int, default=10)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--fresh-uids", action="store_true", help="new UIDs on every call")
    synth.add_argument("--matrix", type=int, help="rows = columns per slice (default 128; demo 256)")
    synth.add_argument(
        "--slices", type=_slice_range, help="slices per CT: N or LOW-HIGH (default: 150-200 mm of z)"
    )
    synth.add_argument("--workers", type=int, help="writer processes (default: the CPUs available)")
    synth.add_argument(
        "--long-series",
        type=int,
        nargs="?",
        const=1000,
        default=0,
        metavar="SLICES",
        help="add patient SCALE-LONG with one 512 x 512 CT of SLICES slices (default 1000)",
    )
    synth.add_argument("--demo", action="store_true", help="write the 4-scanner demo archive instead")
    synth.set_defaults(func=cmd_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CohortError as exc:
        print(f"cohort: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
