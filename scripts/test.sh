#!/usr/bin/env bash
# Runs the whole test suite; creates the pinned environment first if needed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
# LXT (the AttnLRP authors' reference) needs transformers 4.52: a separate environment, used only
# as an oracle by tests/test_lxt_parity.py.
lxt="$root/.venv-lxt"
if [[ ! -f "$lxt/.relprop-lxt-1" ]]; then
  python3 -m venv "$lxt"
  "$lxt/bin/pip" install -q --upgrade pip
  "$lxt/bin/pip" install -q torch==2.14.1
  "$lxt/bin/pip" install -q transformers==4.52.4 lxt==2.1 safetensors==0.8.0 numpy==2.4.6
  touch "$lxt/.relprop-lxt-1"
fi
cd "$root"
exec python -m pytest "$@"
