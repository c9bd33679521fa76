#!/usr/bin/env bash
# Set up (first run only) and run every test: the README's test command, and what CI runs.
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh -k cameras # extra arguments go to pytest
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
env_dir=$(bash "$root/scripts/setup_env.sh")
# The real-frontend tests drive Debian's Chromium (never a downloaded browser).
if [ ! -x /usr/bin/chromium ]; then
  echo "[test] installing Debian's chromium for the frontend tests" >&2
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >&2
  else
    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >&2
  fi
fi
cd "$root"
export MVDPP_COMFYUI="$env_dir/comfyui"
export MVDPP_BPY_PATH="$env_dir/bpy"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$env_dir/venv/bin/python" -m pytest "$@"
