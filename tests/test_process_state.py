"""Library calls leave process-wide state as the caller set it (DEVELOPERS guide: relprop is called from threads,
servers and notebooks). The randomisation check's generators: tests/test_randomisation_rng.py; one
training-mode warning per call: tests/test_warn_once_nested.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

# In a fresh interpreter: the caller picks a backend (svg stands for a notebook's inline or a GUI backend),
# then draws with relprop.visualize.
_SCRIPT = """
import matplotlib
matplotlib.use("svg")
import numpy as np
from relprop import visualize as V
V.image([np.arange(16.0).reshape(4, 4)], method="heatmap")
V.tokens_figure([("", ["a", "b"], {"lrp": [1.0, -1.0]})])
print(matplotlib.get_backend())
"""


def test_visualize_keeps_the_callers_matplotlib_backend():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().lower() == "svg"


# The report's figures too (run_compare in a notebook): drawn without pyplot, written as PNG.
_REPORT_SCRIPT = """
import sys
import matplotlib
matplotlib.use("svg")
import numpy as np
import torch
from relprop.report import figures
out = sys.argv[1]
figures.heatmap_grid(torch.rand(2, 3, 8, 8), {"lrp": torch.rand(2, 8, 8)}, ["a", "b"], out, title="t")
assert open(out, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n"
import matplotlib.pyplot as plt
print(matplotlib.get_backend(), len(plt.get_fignums()))
"""


def test_report_figures_keep_the_callers_matplotlib_backend(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _REPORT_SCRIPT, str(tmp_path / "grid.png")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "0"]  # backend unchanged, no figure left in pyplot's registry
