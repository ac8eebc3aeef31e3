#!/usr/bin/env bash
# relprop on a GPU machine: the gpu-marked tests and the benchmarks, then one table.
#
#   bench/gpu.sh              # tests (tests/test_gpu.py -m gpu), bench_lrp and bench_plan on cuda; <= 8 minutes
#   bench/gpu.sh --dry-run    # check python, torch, CUDA and the wheels; install nothing, run nothing
#   PYTHON=/opt/py/bin/python bench/gpu.sh
#
# Made for a machine with its own Python and torch and no package registry: it uses the python/torch it
# finds (PYTHON, else python3), imports relprop from src/ (PYTHONPATH; nothing is installed into that
# python), and installs the few small wheels it lacks (pytest...) from bench/wheels into bench/.deps,
# offline (pip --no-index --find-links; unzipped when the python has no pip). Fill bench/wheels beforehand,
# where PyPI is reachable, with scripts/fetch_gpu_wheels.sh (gitignored: copy it along with the tree).
#
# Exit status: 0 all ran and passed; 1 a test failed or a benchmark broke (the table says which);
# 2 it cannot run here (no python/torch, no CUDA device, missing wheels), with a message saying why.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
dry=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -h | --help)
      awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
      exit 0
      ;;
    *)
      echo "gpu.sh: unknown option '$arg' (--dry-run, --help)" >&2
      exit 2
      ;;
  esac
done
say() { echo "gpu.sh: $*" >&2; }

# ---------------------------------------------------------------- python, torch, CUDA
if ! command -v "$py" > /dev/null 2>&1; then
  say "no python '$py' on PATH; set PYTHON=/path/to/python"
  exit 2
fi
if ! info="$("$py" - 2> /dev/null << 'EOF'
import sys, torch
cuda = torch.cuda.is_available()
print(f"{sys.version_info.major}.{sys.version_info.minor}")
print(torch.__version__)
print(torch.version.cuda or "none")
print(torch.cuda.get_device_name(0) if cuda else "")
print("end")  # so that an empty GPU name is still a full line for read
EOF
)"; then
  say "$py cannot import torch: this script uses the torch it finds and installs none"
  exit 2
fi
{ read -r pyver; read -r torchver; read -r cudaver; read -r gpuname; } <<< "$info"
say "python $pyver ($py), torch $torchver (CUDA build $cudaver), GPU: ${gpuname:-none}"

# ---------------------------------------------------------------- the small wheels it lacks
deps="$root/bench/.deps"
export PYTHONPATH="$root/src:$deps${PYTHONPATH:+:$PYTHONPATH}"
lacking() { # the packages among "module:package" pairs that do not import here
  local pair
  for pair in "$@"; do "$py" -c "import ${pair%%:*}" > /dev/null 2>&1 || echo "${pair##*:}"; done
}
install() { # install [--no-deps] PACKAGE...: from bench/wheels into bench/.deps, offline
  if ! compgen -G "$root/bench/wheels/*.whl" > /dev/null; then
    say "no wheels in bench/wheels: run scripts/fetch_gpu_wheels.sh (PYTHON_VERSION=$pyver TORCH_VERSION=${torchver%.*}) where PyPI is reachable"
    exit 2
  fi
  if ((dry)); then
    say "dry run: would install ${*/--no-deps/} from bench/wheels into bench/.deps"
  elif "$py" -m pip --version > /dev/null 2>&1; then
    "$py" -m pip install --quiet --no-index --find-links "$root/bench/wheels" --target "$deps" --upgrade "$@" \
      || { say "pip could not install ${*/--no-deps/} from bench/wheels (fetched for python $pyver and torch ${torchver%.*}?)"; exit 2; }
  else
    local w pkg
    say "this python has no pip: unzipping the wheels of ${*/--no-deps/} into bench/.deps"
    mkdir -p "$deps"
    for pkg in "$@"; do
      [[ "$pkg" == --no-deps ]] && continue
      for w in "$root"/bench/wheels/*.whl; do
        [[ "$(basename "$w" | tr '[:upper:]-' '[:lower:]_')" == "${pkg//-/_}"_[0-9]* ]] && "$py" -m zipfile -e "$w" "$deps"
      done
    done
    if [[ " $* " == *" pytest "* ]]; then  # pytest's own dependencies
      for w in "$root"/bench/wheels/{pluggy,iniconfig,packaging,pygments}-[0-9]*.whl; do
        [[ -e "$w" ]] && "$py" -m zipfile -e "$w" "$deps"
      done
    fi
  fi
}
mapfile -t missing < <(lacking pytest:pytest numpy:numpy PIL:pillow safetensors:safetensors)
if ((${#missing[@]})); then
  say "not importable here: ${missing[*]}"
  install "${missing[@]}"
fi
if ((!dry)) && [[ -n "$(lacking torchvision:torchvision)" ]]; then  # built for one torch: never pull another torch
  say "not importable here: torchvision"
  install --no-deps torchvision
fi
if ((!dry)) && ! "$py" -c "import pytest, numpy, relprop, torchvision" > /dev/null 2>&1; then
  say "still cannot import pytest, numpy, relprop and torchvision (PYTHONPATH=$PYTHONPATH):"
  "$py" -c "import pytest, numpy, relprop, torchvision" 2>&1 | tail -1 >&2 || true
  exit 2
fi

if [[ -z "$gpuname" ]]; then
  say "torch $torchver sees no CUDA device: the gpu tests would all skip and there is nothing to measure"
  ((dry)) && { say "dry run: checks done (no CUDA)"; exit 0; }
  exit 2
fi
if ((dry)); then
  say "dry run: would run 'pytest -m gpu tests/test_gpu.py', bench_lrp.py and bench_plan.py --device cuda on $gpuname"
  exit 0
fi

# ---------------------------------------------------------------- tests and benchmarks
logs="$root/bench/.gpu-logs"
mkdir -p "$logs"
status=0
say "running the gpu tests (log: bench/.gpu-logs/tests.log)"
if ! timeout 240 "$py" -m pytest tests/test_gpu.py -m gpu -p no:cacheprovider -q -s -rs > "$logs/tests.log" 2>&1; then
  status=1
fi
say "running bench/bench_lrp.py --device cuda (log: bench/.gpu-logs/bench_lrp.log)"
if ! timeout 150 "$py" bench/bench_lrp.py --device cuda --no-zennit --repeat 5 --models resnet50,vgg16 \
  > "$logs/bench_lrp.log" 2>&1; then
  status=1
fi
say "running bench/bench_plan.py --device cuda --models resnet50 (log: bench/.gpu-logs/bench_plan.log)"
if ! timeout 90 "$py" bench/bench_plan.py --device cuda --models resnet50 --batches 8 > "$logs/bench_plan.log" 2>&1; then
  status=1
fi

# ---------------------------------------------------------------- one table
"$py" - "$logs" "$gpuname" "$torchver" "$cudaver" << 'EOF'
import re, sys
from pathlib import Path

logs, gpu, torch_v, cuda_v = Path(sys.argv[1]), *sys.argv[2:]
tests = (logs / "tests.log").read_text(errors="replace")
bench = (logs / "bench_lrp.log").read_text(errors="replace") if (logs / "bench_lrp.log").exists() else ""
rows = [("GPU", gpu), ("torch", f"{torch_v} (CUDA {cuda_v})")]
summary = [l for l in tests.splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
rows.append(("gpu tests", summary[-1].strip("= ") if summary else "no summary (see bench/.gpu-logs/tests.log)"))
for m in re.finditer(r"host syncs per explain \((\w+)\): (\d+)", tests):
    rows.append((f"host syncs per explain, {m.group(1)}", m.group(2)))
model = None
for line in bench.splitlines():
    if re.fullmatch(r"[a-z0-9_]+", line.strip()):
        model = line.strip()
    m = re.match(r"\s+(relprop [\w ]+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", line)
    if m and model:
        rows.append((f"{model} {m.group(1)}", f"time {m.group(3)}x gradient, memory {m.group(5)}x"))
if not any(" relprop " in r[0] for r in rows):
    rows.append(("bench_lrp", "no figures (see bench/.gpu-logs/bench_lrp.log)"))
plan = (logs / "bench_plan.log").read_text(errors="replace") if (logs / "bench_plan.log").exists() else ""
found = False
for line in plan.splitlines():
    m = re.match(r"\s+(relprop\.explain \(records\)|plan\.explain \(replays\))\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", line)
    if m:
        found = True
        rows.append((f"resnet50 LRP {m.group(1)}", f"time {m.group(4)}x gradient (median per batch)"))
if not found:
    rows.append(("bench_plan", "no figures (see bench/.gpu-logs/bench_plan.log)"))
w = max(len(k) for k, _ in rows)
print()
print(f"{'relprop on GPU':{w}}  value")
print(f"{'-' * w}  {'-' * 40}")
for k, v in rows:
    print(f"{k:{w}}  {v}")
EOF
exit "$status"
