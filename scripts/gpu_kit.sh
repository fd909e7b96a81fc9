#!/usr/bin/env bash
# Stage what benchmarks/gpu_segment.py needs on a lent GPU machine (`make gpu-kit`).
#
# The GPU machines have torch, onnx, onnxruntime (CPU), numpy, scipy, pandas, pyarrow and PyYAML,
# but not pydantic, SimpleITK or pydicom, and reach no package index. This writes their cp312 wheels
# (the versions of this .venv) to .whl/ and one real CT (LUNG1-001) to .gpu-data/, both ignored by
# git. Together they exceed the device's 64 MiB carry limit, hence two calls (printed at the end):
# the first installs the wheels into .gpu-site/ (ignored, so it stays on the warm machine) and runs
# parts 1-3; the second, made within the machine's 30 s warm window, carries the CT and runs part 4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA="${COHORT_DATA:-../shared/data}/nsclc-radiomics/LUNG1-001_20180209_CT.tar.xz"
rm -rf .whl .gpu-data
mkdir -p .whl .gpu-data/nsclc-radiomics
mapfile -t PINS < <("$PY" -c '
from importlib.metadata import version
for name in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "SimpleITK", "pydicom"):
    print(f"{name}=={version(name)}")')
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${PINS[@]}"
cp "$DATA" .gpu-data/nsclc-radiomics/
du -sh .whl .gpu-data
cat <<'CALLS'
device call 1 (carry [".whl"], timeout_s 420):
  python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu-site .whl/*.whl && PYTHONUNBUFFERED=1 PYTHONPATH=.gpu-site:. python3 benchmarks/gpu_segment.py --parts 1,2,3
device call 2, at once (carry [".gpu-data"], timeout_s 300):
  PYTHONUNBUFFERED=1 PYTHONPATH=.gpu-site:. python3 benchmarks/gpu_segment.py --parts 1,4 --data .gpu-data/nsclc-radiomics
CALLS
