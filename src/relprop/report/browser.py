"""Open a report in headless Chromium: check that every image loaded, take a screenshot.

Used by the tests and by ``relprop compare --screenshot``. Needs a ``chromium`` (or
``chromium-browser``/``google-chrome``) executable; nothing else.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--allow-file-access-from-files",
]

# What every probe shares: a line counter and the <pre> the result is written into. A probe's script
# (BODY) fills the array ``out`` on load.
_PAGE = """<script>
function lineCount(node) {
  var r = document.createRange();
  r.selectNodeContents(node);
  var tops = {};
  Array.prototype.forEach.call(r.getClientRects(), function (b) { tops[Math.round(b.top)] = 1; });
  return Object.keys(tops).length;
}
window.addEventListener('load', function () {
  var out = [];
BODY
  var pre = document.createElement('pre');
  pre.id = 'PRE_ID';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""

_PROBE = """  document.querySelectorAll('img').forEach(function (im) {
    out.push({src: im.getAttribute('src'), complete: im.complete, width: im.naturalWidth, height: im.naturalHeight});
  });
"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise RuntimeError("no chromium executable found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="relprop-chromium-") as profile:
        return subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=timeout
        )


def _probe(index_html: str | Path, script: str, name: str, timeout: float, width: int | None = None):
    """Load a copy of the page (next to it, so relative paths hold) with ``script`` added, which writes a
    JSON value into ``<pre id="NAME">`` on load; return that value."""
    index_html = Path(index_html).resolve()
    if not index_html.is_file():
        raise FileNotFoundError(f"no report page at {index_html}")
    probe = index_html.with_name(f".{name}.html")
    text = index_html.read_text(encoding="utf-8")
    page = _PAGE.replace("BODY", script).replace("PRE_ID", name)
    probe.write_text(text.replace("</body>", page + "</body>"), encoding="utf-8")
    size = [f"--window-size={width},1000"] if width else []
    try:
        res = _run([*size, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], timeout)
    finally:
        probe.unlink(missing_ok=True)
    m = re.search(rf'<pre id="{name}">(.*?)</pre>', res.stdout, re.S)
    if not m:
        raise RuntimeError(f"chromium did not render the page (exit {res.returncode}): {res.stderr.strip()[-300:]}")
    import html

    return json.loads(html.unescape(m.group(1)))


def image_check(index_html: str | Path, timeout: float = 60) -> list[dict]:
    """Load the page (from a copy with a probe script, next to it) and return every <img>'s natural size."""
    return _probe(index_html, _PROBE, "relprop-image-check", timeout)


_HEADERS = """  document.querySelectorAll('th').forEach(function (th) {
    th.childNodes.forEach(function (node) {
      if (node.nodeType !== 3 || !node.textContent.trim()) return;
      out.push({text: node.textContent.trim(), lines: lineCount(node)});
    });
  });
"""


def header_lines(index_html: str | Path, timeout: float = 60, width: int = 1400) -> list[dict]:
    """Every table header's own text (the words before its ``<br>``) with the number of lines Chromium
    lays it out on at ``width`` pixels: more than 1 means the header wraps."""
    return _probe(index_html, _HEADERS, "relprop-header-check", timeout, width)


_TABLES = """  document.querySelectorAll('table').forEach(function (t) {
    var box = t.closest('.table-wrap') || t.closest('section') || document.body;
    var first = t.querySelector('tr:nth-child(2) td.name, tr:nth-child(2) td.l');
    var lines = first ? lineCount(first.querySelector('a') || first) : 0;
    var hint = box.previousElementSibling;
    out.push({id: t.id || t.className, right: t.getBoundingClientRect().right,
              box_right: box.getBoundingClientRect().right, scrolls: box.scrollWidth > box.clientWidth,
              scrollable: getComputedStyle(box).overflowX === 'auto' || getComputedStyle(box).overflowX === 'scroll',
              hint: !!(hint && hint.classList.contains('scroll-hint') && hint.offsetParent !== null),
              name_lines: lines});
  });
"""


def table_fit(index_html: str | Path, timeout: float = 60, width: int = 1400) -> list[dict]:
    """Every table laid out at ``width`` pixels: its right edge and its container's (``.table-wrap``, else
    the section), whether the container scrolls sideways (``scrolls``: wider content; ``scrollable``:
    overflow-x auto), whether a visible scroll hint precedes it, and the lines of the first row's name cell
    (the model or method name: more than 1 means it breaks)."""
    return _probe(index_html, _TABLES, "relprop-table-check", timeout, width)


def rendered_dom(index_html: str | Path, timeout: float = 60) -> str:
    """The page's DOM after Chromium loaded and laid it out (what a reader's browser shows)."""
    index_html = Path(index_html).resolve()
    if not index_html.is_file():
        raise FileNotFoundError(f"no report page at {index_html}")
    res = _run(["--virtual-time-budget=10000", "--dump-dom", index_html.as_uri()], timeout)
    if "<body" not in res.stdout:
        raise RuntimeError(f"chromium did not render the page (exit {res.returncode}): {res.stderr.strip()[-300:]}")
    return res.stdout


def screenshot(
    index_html: str | Path, png: str | Path, width: int = 1400, height: int = 2400, timeout: float = 60
) -> Path:
    """A PNG of the top ``height`` pixels of the page."""
    index_html, png = Path(index_html).resolve(), Path(png).resolve()
    if not index_html.is_file():
        raise FileNotFoundError(f"no report page at {index_html}")
    res = _run(
        [f"--window-size={width},{height}", "--virtual-time-budget=10000", f"--screenshot={png}", index_html.as_uri()],
        timeout,
    )
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot (exit {res.returncode}): {res.stderr.strip()[-300:]}")
    return png
