"""Train the demo GTV model (a small 2D U-Net) on synthetic CT phantoms and export it to ONNX.

    pip install -e '.[torch]'            # torch (CPU build) and onnx; not needed to *run* the model
    python scripts/train_demo_model.py   # writes models/demo-lung-gtv/{model.onnx,manifest.yaml}

What it does, reproducibly (fixed seeds, single-process data generation,
deterministic torch kernels on the CPU):

1. writes synthetic thoracic CT archives with :func:`cohort.synth.archive.write_demo_archive`
   (CT series + RTSTRUCT with the GTV) into a temporary folder, at two matrix
   sizes (128 and 256: 3.9 and 2 mm pixels), and reads them back the way real
   data is read (:func:`read_series`, :func:`rasterise_rtstruct`);
2. turns every CT into the model's input with the same code the pipeline uses at
   inference (:func:`cohort.segment.pipeline.prepare_case` with the manifest
   below: lung isolation, 2 mm in-plane, 256 x 256, lung window), and the GTV
   into a target on the same grid;
3. trains a U-Net (3 downsamplings, 4 levels, ``--base`` channels, batch norm) on
   random 128 x 128 crops (half centred on the tumour), BCE + soft Dice, Adam;
4. exports it with ``torch.onnx.export`` (a dynamic batch axis, sigmoid inside
   the graph), writes the manifest with the file's sha256, and reports Dice on
   held-out phantoms (another seed) through :func:`segment_case` with ONNX Runtime.

The U-Net class is also used by ``benchmarks/gpu_segment.py`` (the seed's
31 M-parameter configuration: base 64, 4 downsamplings).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("train_demo_model")

MODEL_NAME = "demo-lung-gtv"
ONNX_FILE = "model.onnx"


def demo_manifest(sha256: str, notes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of the demo model (one place: training, export and the committed file)."""
    size = 256
    return {
        "name": MODEL_NAME,
        "version": "1.1.0",
        "description": (
            "Demo 2D U-Net for the primary lung tumour (GTV) on axial CT slices, after lung isolation. "
            "Shows the model contract of the segmentation stage; trained on synthetic phantoms only."
        ),
        "file": ONNX_FILE,
        "sha256": sha256,
        "input": {
            "name": "ct",
            "shape": ["batch", 1, size, size],
            "dtype": "float32",
            "channels": [{"name": "lung_window", "window": {"level": -600, "width": 1500, "clip": True}}],
        },
        "output": {
            "name": "gtv_probability",
            "shape": ["batch", 1, size, size],
            "dtype": "float32",
            "activation": "sigmoid",
            "from_logits": False,
            "threshold": 0.5,
        },
        "geometry": {
            "spacing_mm": [2.0, 2.0],
            "size": [size, size],
            "fill_hu": -1000,
            "interpolator": "linear",
            "preprocess_on": "model_grid",
        },
        "preprocessing": [{"step": "isolate_lungs", "params": {"margin_radius_mm": 5.0}}],
        "labels": {1: "GTV"},
        "primary_label": 1,
        "licence": "Apache-2.0 (weights and code, as the rest of this repository)",
        "training_data": (
            "Synthetic thoracic CT phantoms written by cohort.synth.archive.write_demo_archive "
            "(analytic ellipsoid body, lungs, vertebra, couch and one textured ellipsoid tumour per phantom, "
            "scanner-dependent noise), no patient data. " + (notes or {}).get("training", "")
        ).strip(),
        "intended_use": (
            "Software tests, demos and benchmarks of the pipeline only. Not for clinical use, and not for "
            "research on real CT: it has never seen a patient and will not find real tumours."
        ),
        "references": [
            "Ronneberger, Fischer, Brox. U-Net. MICCAI 2015 (architecture, scaled down).",
            "Primakov et al. Nat Commun 2022;13:3423 (the pipeline design this demo stands in for).",
        ],
    }


def build_unet(in_channels: int = 1, out_channels: int = 1, base: int = 8, downsamplings: int = 3) -> Any:
    """A classic U-Net (Ronneberger 2015): double 3x3 conv + BN + ReLU per level, max-pool down,
    2x2 transposed conv up, skip concatenation, 1x1 conv and sigmoid at the end.
    ``base=64, downsamplings=4`` is the classic 31 M-parameter network."""
    import torch
    from torch import nn

    def double(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths = [base * 2**i for i in range(downsamplings + 1)]
            self.down = nn.ModuleList([double(in_channels, widths[0])])
            self.down.extend(double(widths[i], widths[i + 1]) for i in range(downsamplings))
            self.pool = nn.MaxPool2d(2)
            self.up = nn.ModuleList(
                nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                for i in reversed(range(downsamplings))
            )
            self.merge = nn.ModuleList(
                double(2 * widths[i], widths[i]) for i in reversed(range(downsamplings))
            )
            self.head = nn.Conv2d(widths[0], out_channels, 1)

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for i, block in enumerate(self.down):
                x = block(x if i == 0 else self.pool(x))
                skips.append(x)
            x = skips.pop()
            for up, merge in zip(self.up, self.merge, strict=True):
                x = merge(torch.cat([skips.pop(), up(x)], dim=1))
            return self.head(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.logits(x))

    return UNet()


def export_onnx(net: Any, path: Path, size: int, in_channels: int = 1, opset: int = 17) -> None:
    """``torch.onnx.export`` with a dynamic batch axis (TorchScript exporter: no onnxscript needed)."""
    import torch

    net = net.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated in favour of dynamo
        torch.onnx.export(
            net,
            torch.zeros(1, in_channels, size, size),
            buffer,
            input_names=["ct"],
            output_names=["gtv_probability"],
            dynamic_axes={"ct": {0: "batch"}, "gtv_probability": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    path.write_bytes(buffer.getvalue())


def _gtv_mask(patient_dir: Path, gtv_name: str, reference: Any) -> Any:
    import pydicom

    from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos

    ds = pydicom.dcmread(patient_dir / "RS" / "RS.dcm")
    number = next(r.number for r in read_roi_infos(ds) if r.name == gtv_name)
    return rasterise_rtstruct(ds, number, reference).mask


def make_dataset(root: Path, n: int, seed: int, matrix: int, spec: Any) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs (S, 1, H, W) and targets (S, H, W) of the slices of ``n`` phantoms: every slice with
    tumour and as many without (lung slices, picked with ``seed``)."""
    import SimpleITK as sitk

    from cohort.curate.series import read_series
    from cohort.segment.pipeline import prepare_case
    from cohort.synth.archive import write_demo_archive

    archive = write_demo_archive(root / f"m{matrix}-s{seed}", n, seed=seed, matrix=matrix)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for patient in archive.patients:
        pdir = archive.root / patient.patient_id
        image = read_series(sorted(str(p) for p in (pdir / "CT").iterdir()))
        gtv = _gtv_mask(pdir, patient.gtv_name, image)
        prepared = prepare_case(image, spec, patient.patient_id)
        target_image = sitk.Resample(
            sitk.Cast(gtv, sitk.sitkFloat32),
            list(prepared.grid.size),
            sitk.Transform(),
            sitk.sitkLinear,
            prepared.grid.origin,
            prepared.grid.spacing,
            (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
            0.0,
            sitk.sitkFloat32,
        )
        target = sitk.GetArrayFromImage(target_image) >= 0.5
        has = np.flatnonzero(target.any(axis=(1, 2)))
        plane = prepared.inputs[:, 0]
        lung = np.flatnonzero(((plane > 0.27) & (plane < 0.4)).sum(axis=(1, 2)) > 200)  # about -950..-750 HU
        empty = np.setdiff1d(lung, has)
        pick = np.concatenate([has, rng.choice(empty, size=min(len(empty), len(has)), replace=False)])
        xs.append(prepared.inputs[pick])
        ys.append(target[pick])
        logger.info(
            "%s matrix %d: %d tumour slices, %d others",
            patient.patient_id,
            matrix,
            len(has),
            len(pick) - len(has),
        )
    return np.concatenate(xs), np.concatenate(ys)


def train(
    x: np.ndarray, y: np.ndarray, *, base: int, steps: int, batch: int, crop: int, seed: int, lr: float
) -> Any:
    import torch

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling costs ~20 % of a step on CPU
    rng = np.random.default_rng(seed)
    net = build_unet(base=base)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.15)
    bce = torch.nn.BCEWithLogitsLoss()
    n, _, h, w = x.shape
    tumour = [np.argwhere(s) for s in y]
    net.train()
    started = time.perf_counter()
    for step in range(steps):
        idx = rng.integers(n, size=batch)
        xb = np.empty((batch, 1, crop, crop), dtype=np.float32)
        yb = np.empty((batch, 1, crop, crop), dtype=np.float32)
        for k, i in enumerate(idx):
            if len(tumour[i]) and rng.random() < 0.5:
                cy, cx = tumour[i][rng.integers(len(tumour[i]))]
                y0 = int(np.clip(cy - rng.integers(crop // 4, 3 * crop // 4), 0, h - crop))
                x0 = int(np.clip(cx - rng.integers(crop // 4, 3 * crop // 4), 0, w - crop))
            else:
                y0, x0 = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
            xi = x[i, :, y0 : y0 + crop, x0 : x0 + crop]
            yi = y[i, y0 : y0 + crop, x0 : x0 + crop]
            if rng.random() < 0.5:  # left-right flip: the tumour is in either lung
                xi, yi = xi[..., ::-1], yi[..., ::-1]
            xb[k], yb[k, 0] = xi, yi
        inputs, targets = torch.from_numpy(xb), torch.from_numpy(yb)
        logits = net.logits(inputs)
        prob = torch.sigmoid(logits)
        dice = 1 - (2 * (prob * targets).sum() + 1) / (prob.sum() + targets.sum() + 1)
        loss = bce(logits, targets) + dice
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            logger.info(
                "step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.perf_counter() - started
            )
    return net.eval()


def evaluate(model_dir: Path, root: Path, n: int, seed: int, matrix: int) -> list[float]:
    """Dice of the exported model on held-out phantoms, through segment_case with ONNX Runtime (CPU)."""
    import SimpleITK as sitk

    from cohort.curate.series import read_series
    from cohort.segment.metrics import dice
    from cohort.segment.model import load_model
    from cohort.segment.pipeline import segment_case
    from cohort.segment.runtime import BackendOptions, Device, get_session
    from cohort.synth.archive import write_demo_archive

    spec = load_model(model_dir)
    backend = get_session(spec, BackendOptions(device=Device.CPU))
    archive = write_demo_archive(root / f"eval-m{matrix}-s{seed}", n, seed=seed, matrix=matrix)
    scores = []
    for patient in archive.patients:
        pdir = archive.root / patient.patient_id
        image = read_series(sorted(str(p) for p in (pdir / "CT").iterdir()))
        reference = sitk.GetArrayViewFromImage(_gtv_mask(pdir, patient.gtv_name, image)) > 0
        result = segment_case(image, spec, backend, subject=patient.patient_id)
        scores.append(dice(reference, sitk.GetArrayViewFromImage(result.mask) == 1))
        logger.info("held-out %s matrix %d: Dice %.3f", patient.patient_id, matrix, scores[-1])
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "models" / MODEL_NAME)
    parser.add_argument("--patients", type=int, default=8, help="training phantoms per matrix size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--base", type=int, default=8, help="channels of the first level")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-patients", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from cohort.segment.model import Manifest, ModelSpec

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    placeholder = Manifest.model_validate(demo_manifest("0" * 64))
    spec = ModelSpec(manifest=placeholder, directory=args.out, onnx_path=args.out / ONNX_FILE)
    with tempfile.TemporaryDirectory(prefix="cohort-demo-train-") as tmp:
        root = Path(tmp)
        parts = [make_dataset(root, args.patients, args.seed + m, m, spec) for m in (128, 256)]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        data_s = time.perf_counter() - started
        logger.info("dataset: %d slices, %.1f %% tumour pixels, %.0f s", len(x), 100 * y.mean(), data_s)
        net = train(
            x,
            y,
            base=args.base,
            steps=args.steps,
            batch=args.batch,
            crop=args.crop,
            seed=args.seed,
            lr=args.lr,
        )
        train_s = time.perf_counter() - started - data_s
        args.out.mkdir(parents=True, exist_ok=True)
        onnx_path = args.out / ONNX_FILE
        export_onnx(net, onnx_path, placeholder.geometry.size[0])
        sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
        params = sum(p.numel() for p in net.parameters())
        notes = {
            "training": (
                f"Trained by scripts/train_demo_model.py (seed {args.seed}, {args.patients} phantoms "
                f"at each of matrix 128 and 256, {len(x)} slices, {args.steps} Adam steps of {args.batch} "
                f"crops of {args.crop}x{args.crop}); U-Net, base {args.base} channels, 3 downsamplings, "
                f"{params:,} parameters."
            )
        }
        manifest = demo_manifest(sha, notes)
        Manifest.model_validate(manifest)
        (args.out / "manifest.yaml").write_text(
            "# Written by scripts/train_demo_model.py; see models/README.md.\n"
            + yaml.safe_dump(manifest, sort_keys=False, width=100, allow_unicode=True),
            encoding="utf-8",
        )
        logger.info("wrote %s (%d bytes, sha256 %s)", onnx_path, onnx_path.stat().st_size, sha)
        scores = evaluate(args.out, root, args.eval_patients, args.seed + 1000, 256)
        scores += evaluate(args.out, root, args.eval_patients, args.seed + 2000, 128)
    logger.info(
        "held-out Dice: median %.3f, min %.3f (n=%d); data %.0f s, training %.0f s, total %.0f s",
        float(np.median(scores)),
        float(np.min(scores)),
        len(scores),
        data_s,
        train_s,
        time.perf_counter() - started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
