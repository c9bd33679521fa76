#!/usr/bin/env bash
# Set up (first run only) and run the demo: image -> 32 views -> grid PNG + textured GLB.
#   bash scripts/demo.sh [--image IMG] [--checkpoint CKPT] [--out DIR] ...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
env_dir=$(bash "$root/scripts/setup_env.sh")
exec "$env_dir/venv/bin/python" "$root/scripts/demo.py" "$@"
