#!/usr/bin/env bash
# Runs the main job on the embedded default; creates the pinned environment first if needed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
exec python -m relprop.cli compare "$@"
