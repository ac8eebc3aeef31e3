"""Items of a new-user review of the CLI, each written as the correct behaviour: a trusted whole pickled
model whose class lives next to it, the advice for a bare state dict, pip hints that keep the user's
torch, output paths checked before any work, true label-mismatch messages, help texts."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import one_line_error
from relprop.cli import main

MODEL_PY = textwrap.dedent(
    """
    import torch
    from torch import nn

    class TinyCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))

    def build():
        torch.manual_seed(0)
        return TinyCNN()
    """
)


def user_folder(root: Path) -> Path:
    """A folder as the reviewer had it: mymodel.py, a whole pickle, a state dict and an image."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    (root / "reviewmodel.py").write_text(MODEL_PY)
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import reviewmodel; m = reviewmodel.build(); "
        "torch.save(m, sys.argv[1] + '/tiny_whole.pt'); torch.save(m.state_dict(), sys.argv[1] + '/tiny_sd.pth')"
    )
    subprocess.run([sys.executable, "-c", script, str(root)], check=True)
    Image.fromarray((np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)).save(root / "x.png")
    return root


def run_cli(args, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m relprop`` with ``cwd``: like the console script, sys.path[0] is not the current folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    code = "import sys; sys.path.remove('') if '' in sys.path else None; from relprop.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_trusted_whole_pickle_finds_its_class_in_its_folder_and_restores_sys_path(tmp_path):
    folder = user_folder(tmp_path / "mymodels")
    for cwd, model in ((folder, "tiny_whole.pt"), (tmp_path, str(folder / "tiny_whole.pt"))):
        r = run_cli(
            [
                "explain",
                "--model",
                model,
                "--trust-pickle",
                "--input",
                str(folder / "x.png"),
                "--out",
                str(tmp_path / "h.png"),
                "--quiet",
            ],
            cwd,
        )
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "h.png").exists()
        (tmp_path / "h.png").unlink()
    # in-process: sys.path is left exactly as it was
    from relprop.specs import TrustPickleWarning, load_model

    sys.modules.pop("reviewmodel", None)
    before = list(sys.path)
    with pytest.warns(TrustPickleWarning):
        lm = load_model(str(folder / "tiny_whole.pt"), trust_pickle=True)
    assert type(lm.module).__name__ == "TinyCNN"
    assert sys.path == before


def test_trusted_pickle_whose_module_is_nowhere_says_pythonpath(tmp_path, capsys):
    folder = user_folder(tmp_path / "mymodels")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (folder / "tiny_whole.pt").rename(moved / "tiny_whole.pt")
    sys.modules.pop("reviewmodel", None)
    msg = one_line_error(
        capsys,
        [
            "explain",
            "--model",
            str(moved / "tiny_whole.pt"),
            "--trust-pickle",
            "--input",
            str(folder / "x.png"),
            "--out",
            str(tmp_path / "h.png"),
        ],
    )
    assert "reviewmodel" in msg and "PYTHONPATH=" in msg, msg
    assert "run from the folder" not in msg


def test_state_dict_error_suggests_the_users_own_architecture(tmp_path, capsys):
    folder = user_folder(tmp_path / "mymodels")
    sd = str(folder / "tiny_sd.pth")
    msg = one_line_error(
        capsys, ["explain", "--model", sd, "--input", str(folder / "x.png"), "--out", str(tmp_path / "h.png")]
    )
    assert f"python:MODULE:FUNCTION --weights {sd}" in msg, msg
    assert "torchvision:NAME" in msg


def test_install_hints_keep_the_users_torch_and_install_extras_from_the_clone(tmp_path, capsys, monkeypatch):
    import fnmatch

    import torchvision

    from relprop.specs import install_hint

    pin = install_hint("torchvision").split("'")[1]  # torchvision==0.N.*
    assert fnmatch.fnmatch(torchvision.__version__.split("+")[0], pin.split("==")[1]), (pin, torchvision.__version__)
    assert install_hint("transformers") == "pip install '.[text]' from your relprop clone"
    assert "relprop[" not in install_hint("sklearn")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    assert install_hint("timm").startswith(f"pip install timm '{pin}'")
    msg = one_line_error(capsys, ["explain", "--model", "torchvision:resnet18", "--input", "x.png",
                                  "--out", str(tmp_path / "h.png")])  # fmt: skip
    assert pin in msg and "a plain 'pip install torchvision' may replace torch" in msg, msg


def test_explain_refuses_bad_output_paths_before_loading_or_computing(tmp_path, capsys, monkeypatch):
    import relprop

    folder = user_folder(tmp_path / "mymodels")
    never = ["--model", "python:no_such_module_here:build", "--input", str(folder / "x.png")]  # fails if loaded
    msg = one_line_error(capsys, ["explain", *never, "--out", str(tmp_path / "heat.txt")])
    assert "--out" in msg and ".png" in msg and "no_such_module" not in msg, msg
    msg = one_line_error(capsys, ["explain", *never, "--out", "/dev/null/heat.png"])
    assert "--out /dev/null/heat.png: cannot write there" in msg, msg
    (tmp_path / "dir.png").mkdir()
    msg = one_line_error(capsys, ["explain", *never, "--out", str(tmp_path / "dir.png")])
    assert "is a folder" in msg, msg
    msg = one_line_error(capsys, ["explain", *never, "--out", str(tmp_path / "h.png"), "--save", "attr.txt"])
    assert msg.startswith("relprop: error: --save attr.txt"), msg
    # the image/text choice is made once the model is loaded, still before computing
    monkeypatch.chdir(folder)

    def no_compute(*a, **k):
        raise AssertionError("computed before refusing the output path")

    monkeypatch.setattr(relprop, "explain", no_compute)
    msg = one_line_error(capsys, ["explain", "--model", "python:reviewmodel:build", "--input", "x.png",
                                  "--out", str(tmp_path / "tokens.html")])  # fmt: skip
    assert "image heatmaps" in msg, msg


def test_label_mismatch_message_is_true_when_some_labels_match_by_index(tmp_path, capsys):
    from PIL import Image

    img = (np.arange(32 * 32) % 200).reshape(32, 32).astype(np.uint8)
    for c in ("cats", "3"):
        (tmp_path / "d" / c).mkdir(parents=True)
        Image.fromarray(img).save(tmp_path / "d" / c / "a.png")
    msg = one_line_error(capsys, ["compare", "--models", "zoo:resnet_digits", "--data", str(tmp_path / "d"),
                                  "--methods", "saliency", "--out", str(tmp_path / "r"), "--quiet"])  # fmt: skip
    assert "data labels 'cats' match no class of the model" in msg, msg
    assert "names its 10 classes only by their index (0 to 9) ('3' matched)" in msg, msg
    assert "no class names" not in msg and "unnamed" not in msg


def test_a_model_given_twice_is_named(tmp_path, capsys):
    msg = one_line_error(capsys, ["compare", "--models", "zoo:resnet_digits,zoo:mlp_digits,zoo:resnet_digits",
                                  "--out", str(tmp_path / "r")])  # fmt: skip
    assert msg == "relprop: error: a model is given twice in --models: zoo:resnet_digits", msg


def test_help_offers_only_what_each_command_uses(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    specs = out[out.index("model specs:") :]
    for form in ("torchvision:NAME [--weights FILE]", "python:MODULE:FUNCTION", "FILE.safetensors", "FILE.pt"):
        assert specs.count(form) == 1, (form, specs)  # each form once
    for cmd, has in (("explain", False), ("layers", False), ("compare", True)):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        for opt in ("--split", "--text-column", "--label-column", "--image-column", "--seed"):
            assert (opt in text) == has, (cmd, opt)
    with pytest.raises(SystemExit):
        main(["explain", "--model", "zoo:resnet_digits", "--input", "x.png", "--seed", "1"])
    assert "unrecognized arguments: --seed" in capsys.readouterr().err


@pytest.mark.parametrize("methods", [["lrp"], ["lrp", "gradient"], ["lrp", "gradient", "saliency"]])
def test_explain_figure_labels_overlap_nothing(tmp_path, monkeypatch, methods):
    import torch

    from relprop.report import figures

    saved = []
    real_save = figures._save

    def keep(fig, *a, **k):
        saved.append(fig)
        return real_save(fig, *a, **k)

    monkeypatch.setattr(figures, "_save", keep)
    rng = np.random.default_rng(0)
    heat = {m: rng.standard_normal((32, 32)) for m in methods}
    figures.explain_figure(torch.rand(32, 32, 3), heat, tmp_path / "h.png", title="resnet_digits: class 6 (6)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = saved[0]
    r = FigureCanvasAgg(fig).get_renderer()  # the figure as saved
    fig.draw(r)
    image_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(image_axes) == 1 + len(methods) and len(bars) == len(methods)
    for bar in bars:  # the colour bar and its "relevance" label stay out of every image panel
        box = bar.get_tightbbox(r)
        assert all(not box.overlaps(ax.get_window_extent(r)) for ax in image_axes), methods
    top = fig._suptitle.get_window_extent(r)
    for ax in image_axes:  # panel titles stay clear of the figure title
        assert not ax.title.get_window_extent(r).overlaps(top), ax.title.get_text()
