"""Ctrl-C during ``relprop compare`` (simulated: the n-th cell raises KeyboardInterrupt): the terminal ranking
and the report list every model, each with what finished, and mark the ones whose cells did not all finish;
the Ray engine's counterpart is ``tests/test_ray_engine.py::test_interrupt_lists_every_model``."""

from __future__ import annotations

import json

import pytest

from relprop.cli import main
from relprop.report import compare

MODELS = "zoo:resnet_digits,zoo:densenet_digits,zoo:vgg_digits"
FAST = ["--methods", "gradient,saliency", "--samples", "2", "--grid", "1", "--sensitivity-samples", "0",
        "--randomisation-samples", "0", "--bootstrap", "10", "--regions", "4", "--steps", "4", "--limit", "4"]  # fmt: skip


def _interrupt_at(monkeypatch, n: int) -> None:
    compute, calls = compare.Job.compute_cell, []

    def cell(self, *a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return compute(self, *a, **k)

    monkeypatch.setattr(compare.Job, "compute_cell", cell)


def _ranking(out: str) -> dict[str, str]:
    lines = out.split("(95% intervals):\n", 1)[1].splitlines()
    return {ln.split()[1]: ln for ln in lines if ln.startswith("  ")}


@pytest.mark.parametrize("n", [2, 3])
def test_ctrl_c_lists_every_model_with_what_finished(tmp_path, capsys, monkeypatch, n):
    """n=2: in the first model's second method (1 of 2 finished; the others not reached); n=3: at the second
    model's first method (the first model complete, unmarked)."""
    _interrupt_at(monkeypatch, n)
    out = tmp_path / "r"
    assert main(["compare", "--models", MODELS, *FAST, "--out", str(out)]) == 130
    ranking = _ranking(capsys.readouterr().out)
    assert set(ranking) == {"resnet_digits", "densenet_digits", "vgg_digits"}, ranking
    first = "(incomplete: 1 of 2 methods finished; not ranked, its means are over those only)" if n == 2 else None
    if first:
        assert ranking["resnet_digits"].endswith(first), ranking
    else:
        assert "incomplete" not in ranking["resnet_digits"], ranking
    for name in ("densenet_digits", "vgg_digits"):
        assert ranking[name].endswith("(incomplete: no method finished)"), ranking
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "interrupted" and [m["spec"] for m in res["models"]] == MODELS.split(",")
    done = {m["spec"]: (m.get("interrupted") or {}).get("cells_done") for m in res["models"]}
    assert done == {"zoo:resnet_digits": 1 if n == 2 else None, "zoo:densenet_digits": 0, "zoo:vgg_digits": 0}
    assert res["cells_done"] == n - 1
    page = (out / "index.html").read_text()
    assert page.count("incomplete: no method finished") == 2


def test_a_resumed_run_interrupted_again_lists_the_cached_cells_of_the_model_in_progress(tmp_path, capsys, monkeypatch):
    """What finished before (cached) counts as finished when the next run is interrupted in that model."""
    out = tmp_path / "r"
    argv = ["compare", "--models", "zoo:resnet_digits", *FAST, "--out", str(out)]
    assert main([*argv[:4], "saliency", *argv[5:]]) == 0  # saliency finished and cached
    capsys.readouterr()
    _interrupt_at(monkeypatch, 1)  # gradient, computed first, is interrupted
    assert main(argv) == 130
    ranking = _ranking(capsys.readouterr().out)
    assert ranking["resnet_digits"].endswith(
        "(incomplete: 1 of 2 methods finished; not ranked, its means are over those only)"
    ), ranking
    res = json.loads((out / "results.json").read_text())
    assert [c["method"] for c in res["models"][0]["methods"]] == ["saliency"]
    assert res["models"][0]["methods"][0]["reused"] is True


def test_a_model_the_run_stopped_in_is_unranked_and_the_others_rank_as_without_it(tmp_path, capsys, monkeypatch):
    """Interrupted in the third model's second method: its means are over one method, the others' over two,
    so it gets no rank, tie or best mark (terminal, results.json, report) and the two complete models rank
    exactly as in a run of those two alone (it used to rank and be bold on its one-method means)."""
    _interrupt_at(monkeypatch, 6)
    out = tmp_path / "r"
    assert main(["compare", "--models", MODELS, *FAST, "--out", str(out)]) == 130
    line = _ranking(capsys.readouterr().out)["vgg_digits"]
    assert line.lstrip().startswith("-.") and "tie with" not in line and "not ranked" in line, line
    res = json.loads((out / "results.json").read_text())
    vgg = next(r for r in res["ranking"] if r["model"] == "zoo:vgg_digits")
    assert vgg["interrupted"] == {"cells_done": 1, "cells_total": 2} and vgg["faithfulness"] is not None
    assert vgg["rank"] is None and vgg["mean_rank"] is None and vgg["tied_with"] == [] and vgg["best"] == []
    assert vgg["best_method"] is None and vgg["best_methods"] == [] and set(vgg["ranks"].values()) == {None}
    assert [c["best"] for c in res["models"][2]["methods"]] == [[]]
    assert all(vgg["anchor"] not in r["tied_with"] for r in res["ranking"])
    for rows in res["rankings_per_method"].values():
        assert all(vgg["anchor"] not in r["ties_with"] for r in rows)
        assert next(r for r in rows if r["model"] == vgg["anchor"])["rank"] is None
    page = (out / "index.html").read_text()
    row = page.split('id="ranking-table"', 1)[1].split("</table>", 1)[0].split("vgg_digits", 1)[1].split("</tr>")[0]
    assert "<b>" not in row and "not ranked" in row, row
    monkeypatch.undo()
    # the two complete models alone (their cells reused from the first run's cache)
    assert main(["compare", "--models", "zoo:resnet_digits,zoo:densenet_digits", *FAST, "--out", str(out)]) == 0
    two = json.loads((out / "results.json").read_text())
    keys = ("model", "rank", "mean_rank", "ranks", "ties", "tied_with", "best", "best_methods", "faithfulness")
    assert [{k: r[k] for k in keys} for r in res["ranking"][:2]] == [{k: r[k] for k in keys} for r in two["ranking"]]
    for label, rows in two["rankings_per_method"].items():
        ranked = [r for r in res["rankings_per_method"][label] if r["rank"] is not None]
        assert [(r["model"], r["rank"], r["mean"], r["ties_with"]) for r in ranked] == [
            (r["model"], r["rank"], r["mean"], r["ties_with"]) for r in rows
        ]
