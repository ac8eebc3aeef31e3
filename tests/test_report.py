"""``relprop compare`` on the shipped zoo: the report, its cache, Ctrl-C, and the page in headless Chromium."""

import json
import shutil

import pytest

import relprop
from relprop.cli import main
from relprop.report import browser
from relprop.report.compare import Job

OPTS = {
    "--models": "zoo:resnet_digits,zoo:vgg_digits",
    "--methods": "lrp,gradient",
    "--samples": "8",
    "--grid": "4",
    "--sensitivity-samples": "4",
    "--randomisation-samples": "2",
    "--randomisation-layers": "2",
    "--regions": "8",
    "--steps": "8",
}


def small(**over):
    opts = dict(OPTS, **{"--" + k.replace("_", "-"): v for k, v in over.items()})
    return [x for kv in opts.items() for x in kv] + ["--quiet"]


SMALL = small()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["compare", *SMALL, "--out", str(out)]) == 0
    return out


def test_compare_writes_report_with_every_number(report):
    res = json.loads((report / "results.json").read_text())
    assert res["status"] == "complete" and res["cells_done"] == res["cells_total"] == 4
    assert [m["spec"] for m in res["models"]] == ["zoo:resnet_digits", "zoo:vgg_digits"]
    for m in res["models"]:
        assert 0.9 < m["accuracy"] <= 1.0 and m["n_eval"] == 450
        assert m["composite"] == "epsilon_plus_flat"
        assert [c["method"] for c in m["methods"]] == ["lrp", "gradient"]
        for c in m["methods"]:
            assert c["status"] == "ok", c
            for k in (
                "abpc",
                "abpc_norm",
                "insertion_auc",
                "deletion_auc",
                "class_sensitivity",
                "randomisation_similarity",
            ):
                assert isinstance(c[k], float), k
            assert len(c["curves"]["morf"]) == len(c["curves"]["lerf"]) == 9
            assert len(c["randomisation_curve"]) == 2
        assert (report / m["grid_figure"]).stat().st_size > 10_000
        assert (report / m["curves_figure"]).exists()
    assert [r["rank"] for r in res["ranking"]] == [1, 2]
    assert res["ranking"][0]["faithfulness"] >= res["ranking"][1]["faithfulness"]
    assert res["settings"]["samples"] == 8 and "compare" in res["command"]
    page = (report / "index.html").read_text()
    for text in ("Ranking of models", "resnet_digits", "Perturbation curves", "Settings of this run", "results.json"):
        assert text in page


def test_second_run_reuses_the_cache(report, tmp_path, monkeypatch, capsys):
    out = tmp_path / "again"
    shutil.copytree(report, out)
    before = json.loads((out / "results.json").read_text())
    calls = []

    def no_explain(*a, **k):
        calls.append(1)
        raise AssertionError("explain must not run for a cached cell")

    monkeypatch.setattr(relprop, "explain", no_explain)
    assert main(["compare", *SMALL, "--out", str(out)]) == 0
    assert calls == []
    assert "4 reused" in capsys.readouterr().out
    after = json.loads((out / "results.json").read_text())
    assert all(c["reused"] for m in after["models"] for c in m["methods"])
    assert [c["abpc"] for m in after["models"] for c in m["methods"]] == [
        c["abpc"] for m in before["models"] for c in m["methods"]
    ]
    # a changed setting is a different cell: recomputed, not reused
    monkeypatch.undo()
    assert main(["compare", *small(samples="6", models="zoo:vgg_digits", methods="gradient"), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["models"][0]["methods"][0]["reused"] is False and res["models"][0]["methods"][0]["n_samples"] == 6


def test_ctrl_c_keeps_finished_cells(tmp_path, monkeypatch):
    out = tmp_path / "r"
    real = Job.compute_cell
    n = {"calls": 0}

    def interrupt_second(self, *a, **k):
        n["calls"] += 1
        if n["calls"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Job, "compute_cell", interrupt_second)
    args = ["compare", *small(models="zoo:vgg_digits"), "--out", str(out)]
    assert main(args) == 130
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "interrupted" and res["cells_done"] == 1
    assert [c["method"] for c in res["models"][0]["methods"]] == ["lrp"]  # the finished cell is in the report
    assert (out / "index.html").exists() and "interrupted" in (out / "index.html").read_text()
    monkeypatch.setattr(Job, "compute_cell", real)
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert [c["reused"] for c in res["models"][0]["methods"]] == [True, False]


def test_report_opens_in_headless_chromium(report):
    assert browser.find_chromium(), "chromium is required (CI installs it: apt-get install chromium)"
    images = browser.image_check(report / "index.html")
    res = json.loads((report / "results.json").read_text())
    assert len(images) == 1 + 2 * len(res["models"])  # ranking + grid and curves per model
    for im in images:
        assert im["complete"] and im["width"] > 100 and im["height"] > 100, im
    shot = browser.screenshot(report / "index.html", report / "screenshot.png", height=2000)
    assert shot.stat().st_size > 50_000
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1400, 2000)
        import numpy as np

        assert len(np.unique(np.asarray(im.convert("L").resize((64, 64))))) > 20  # not a blank page
