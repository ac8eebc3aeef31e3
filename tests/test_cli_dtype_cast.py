"""A model held in another float dtype than ``--dtype`` (a float64 model under the default float32) runs cast
to ``--dtype``: said once on the terminal, in results.json (the model's entry and the settings) and in the
report's settings table; a model already in ``--dtype`` gets no note."""

from __future__ import annotations

import json

import pytest
import torch

from relprop.cli import main

FAST = ["--methods", "gradient", "--samples", "2", "--grid", "1", "--sensitivity-samples", "0",
        "--randomisation-samples", "0", "--bootstrap", "10", "--regions", "4", "--steps", "4", "--limit", "4",
        "--no-cache"]  # fmt: skip

SRC = """
import torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 10)
    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))
def wide():
    return Net().double()
def plain():
    return Net()
"""


@pytest.fixture
def netfile(tmp_path, monkeypatch):
    (tmp_path / "castnet.py").write_text(SRC)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _compare(out, capsys, *models):
    argv = ["compare", "--models", ",".join(models), "--data", "zoo:digits", "--image-size", "32", *FAST]
    assert main([*argv, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    return json.loads((out / "results.json").read_text()), (out / "index.html").read_text(), err


def test_a_float64_model_cast_to_float32_is_said_in_the_report_and_once_on_the_terminal(netfile, capsys):
    res, page, err = _compare(netfile / "r", capsys, "python:castnet:wide", "python:castnet:plain")
    wide, plain = res["models"]
    assert wide["dtype_cast"] == {"from": ["float64"], "to": "float32"}
    assert "dtype_cast" not in plain
    assert res["settings"]["dtype_cast"] == {wide["name"]: ["float64"]}
    assert f"float32 (models cast to it: {wide['name']} from float64)" in page
    notes = [ln for ln in err.splitlines() if "parameters; it runs in float32" in ln]
    assert len(notes) == 1 and wide["name"] in notes[0] and "float64" in notes[0], err
    assert res["status"] == "complete", res["problems"]


def test_no_note_when_the_model_runs_in_its_own_dtype(netfile, capsys):
    res, page, err = _compare(netfile / "r", capsys, "python:castnet:plain")
    assert "dtype_cast" not in res["models"][0] and "dtype_cast" not in res["settings"]
    assert "cast to it" not in page and "it runs in" not in err


def test_explain_says_it_once_and_run_compare_leaves_the_users_model_alone(netfile, capsys, tmp_path):
    png = tmp_path / "d.png"
    assert main(["sample", "zoo:digits", "--out", str(png)]) == 0
    capsys.readouterr()
    argv = ["explain", "--model", "python:castnet:wide", "--input", str(png), "--methods", "gradient"]
    assert main([*argv, "--image-size", "32", "--out", str(tmp_path / "e.png")]) == 0
    err = capsys.readouterr().err
    assert sum("holds float64 parameters; it runs in float32" in ln for ln in err.splitlines()) == 1, err

    from relprop.report import Settings, run_compare
    from relprop.specs import load_data, load_model

    mine = load_model("python:castnet:wide").module
    data = load_data("zoo:digits", limit=4)
    s = Settings(samples=2, grid=1, sensitivity_samples=0, randomisation_samples=0, bootstrap=10, regions=4, steps=4)
    res = run_compare({"mine": mine}, data, ["gradient"], tmp_path / "api", s, progress=False, log=lambda _: None)
    assert res["models"][0]["dtype_cast"] == {"from": ["float64"], "to": "float32"}
    assert all(p.dtype == torch.float64 for p in mine.parameters())  # a cast copy ran, the user's model is as given
