#!/usr/bin/env bash
# Lint and type check (run by .ci/run before the tests): ruff format, ruff lint, mypy over src/relprop.
# Creates the pinned environment first if needed (ruff and mypy are pinned in requirements-test.txt).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
ruff format --check src tests bench scripts
ruff check src tests bench scripts
mypy  # files and settings: [tool.mypy] in pyproject.toml
