#!/usr/bin/env bash
# Runs the whole test suite; creates the pinned environment first if needed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
# The report test opens the HTML report in headless Chromium (Debian's package). Install it when it is
# missing and this user may (root with apt-get, as in CI); otherwise that one test is skipped and says why.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
   && ! command -v google-chrome >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing chromium (apt-get) for the report's browser test" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "scripts/test.sh: could not install chromium; the browser test will be skipped" >&2
  else
    echo "scripts/test.sh: no chromium (install it: sudo apt-get install chromium); the browser test will be skipped" >&2
  fi
fi
# LXT (the AttnLRP authors' reference) needs transformers 4.52: a separate environment, used only
# as an oracle by tests/test_lxt_parity.py. It holds transformers 4.52 and LXT only and takes torch and
# torchvision from the main environment through a .pth file (searched after its own packages): a second
# CUDA build of torch (5.5 GB) filled a CI machine's disk. The .pth is written last, so pip never sees
# (or changes) the main environment's packages.
lxt="$root/.venv-lxt"
if [[ ! -f "$lxt/.relprop-lxt-2" ]]; then
  rm -rf "$lxt"
  python3 -m venv "$lxt"
  "$lxt/bin/pip" install -q --upgrade pip
  "$lxt/bin/pip" install -q transformers==4.52.4 safetensors==0.8.0 numpy==2.4.6
  # lxt's declared dependencies (open_clip_torch, bitsandbytes, a torch of its own) are not needed.
  "$lxt/bin/pip" install -q --no-deps lxt==2.1
  main_site="$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  lxt_site="$("$lxt/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$main_site" > "$lxt_site/relprop-main-env.pth"
  touch "$lxt/.relprop-lxt-2"
fi
cd "$root"
exec python -m pytest "$@"
