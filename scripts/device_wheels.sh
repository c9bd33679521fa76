#!/usr/bin/env bash
# Download, into .whl/ at the repository root (git-ignored through .git/info/exclude), the wheels
# that the lent GPU machine lacks for scripts/train_default.py: its image has torch, numpy,
# accelerate, transformers 5 and huggingface_hub 1, but no diffusers, kornia, trimesh, xatlas or
# webdataset, and the transformers / huggingface_hub / accelerate pins here are the versions this
# repository's tests run with. CPython 3.12, x86-64 (the machine's python3). About 27 MB.
#   bash scripts/device_wheels.sh
# Then, in one `run` with carry [".whl"] (README, "The embedded default"):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site || exit; python3 scripts/train_default.py ...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    diffusers==0.35.2 transformers==4.57.1 tokenizers==0.22.2 huggingface-hub==0.36.0 accelerate==1.11.0 \
    importlib_metadata==10.2.0 kornia==0.8.1 kornia_rs==0.2.0 trimesh==4.8.3 xatlas==0.0.11 \
    webdataset==1.0.2 braceexpand==0.1.7
du -sh .whl
