#!/usr/bin/env bash
# Fill bench/wheels/ (gitignored) with the wheels bench/gpu.sh installs on a GPU machine that has its own
# Python and torch but no package registry. Run it here, where PyPI is reachable, before the working tree
# is copied to the GPU machine.
#
#   scripts/fetch_gpu_wheels.sh                 # for CPython 3.12 and torch 2.11 (torchvision 0.26), x86_64 Linux
#   PYTHON_VERSION=3.11 TORCH_VERSION=2.14 scripts/fetch_gpu_wheels.sh
#   REPORT=1 scripts/fetch_gpu_wheels.sh        # also what `relprop compare` needs (matplotlib, pyarrow,
#                                               # scikit-learn for zoo:digits...): about 120 MB more
#
# Only small wheels by default (about 35 MB: pytest and its dependencies, numpy, pillow, safetensors and the
# torchvision build that matches TORCH_VERSION, without its torch dependency): the device copy of the working
# tree is limited to 64 MiB of ignored files.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PIP_PYTHON:-$root/.venv/bin/python}"
pyver="${PYTHON_VERSION:-3.12}"
torchver="${TORCH_VERSION:-2.11}"
dest="$root/bench/wheels"
minor="${torchver#2.}"
minor="${minor%%.*}"
if ! [[ "$torchver" == 2.* && "$minor" =~ ^[0-9]+$ ]]; then
  echo "fetch_gpu_wheels: TORCH_VERSION must look like 2.11, got '$torchver'" >&2
  exit 2
fi
tv="0.$((minor + 15)).*"  # torchvision 0.(N+15) is built for torch 2.N
abi="cp${pyver/./}"
mkdir -p "$dest"
common=(
  download --quiet --dest "$dest" --only-binary=:all: --python-version "$pyver" --implementation cp --abi "$abi"
  --abi none --abi abi3 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform any
)
echo "fetch_gpu_wheels: CPython $pyver, torch $torchver (torchvision $tv) -> $dest"
"$py" -m pip "${common[@]}" pytest pluggy iniconfig packaging numpy pillow safetensors
"$py" -m pip "${common[@]}" --no-deps "torchvision==$tv"
if [[ "${REPORT:-0}" == 1 ]]; then
  "$py" -m pip "${common[@]}" matplotlib pyarrow tqdm rich scikit-learn
fi
ls -1 "$dest"/*.whl | sed 's|.*/|  |'
du -sh "$dest" | sed 's/^/fetch_gpu_wheels: total /'
