#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: python -m guidance_kernels bench.
# Extra arguments go to the bench command, e.g. `bash scripts/bench.sh --ops guidance_combine`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$GK_ROOT"
exec "$PY" -m guidance_kernels bench "$@"
