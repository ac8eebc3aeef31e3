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


@pytest.fixture(autouse=True)
def _sigint_as_in_a_terminal():
    """Python's own SIGINT handler for each test, as in a terminal. A process started in the background by a
    non-interactive shell (``cmd &``, as CI may run the suite) inherits SIGINT *ignored*, and Python keeps that
    disposition: the run's handler is then, rightly, not installed and a raised SIGINT does nothing."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


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


# ------------------------------------------------------------------ a real SIGINT, delivered at a chosen point
def _press_ctrl_c(where: str) -> None:
    """Deliver SIGINT now (``signal.raise_signal`` runs the Python handler before it returns): ``"plain"``:
    here; ``"weakref"``: inside a weakref callback, where Python prints "Exception ignored in" and drops the
    KeyboardInterrupt (how a real Ctrl-C was lost in a WeakKeyDictionary's ``remove``)."""
    import signal
    import weakref

    if where == "plain":
        signal.raise_signal(signal.SIGINT)
        return

    class Thing:
        pass

    t = Thing()
    ref = weakref.ref(t, lambda _: signal.raise_signal(signal.SIGINT))
    del t  # the callback runs here; its KeyboardInterrupt goes to sys.unraisablehook, not to us
    assert ref() is None


def _press_after_cell(monkeypatch, n: int, where: str) -> list:
    """SIGINT at the end of the n-th computed cell (the cell itself finishes). Returns the exceptions Python
    reported as ignored (unraisable)."""
    import sys

    ignored: list = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: ignored.append(u.exc_type))
    compute, calls = compare.Job.compute_cell, []

    def cell(self, *a, **k):
        res = compute(self, *a, **k)
        calls.append(1)
        if len(calls) == n:
            _press_ctrl_c(where)
        return res

    monkeypatch.setattr(compare.Job, "compute_cell", cell)
    return ignored


@pytest.mark.parametrize("where", ["plain", "weakref"])
def test_a_ctrl_c_python_drops_still_stops_the_run_and_the_rerun_resumes(tmp_path, capsys, monkeypatch, where):
    """A SIGINT raised inside a weakref callback was dropped and the run went on to the end (exit 0, every
    cell computed). Now the run's handler records the press and the run stops before the next cell, with the
    finished cells kept; the re-run resumes from them. The handler is gone after the run."""
    import signal

    ignored = _press_after_cell(monkeypatch, 1, where)
    out = tmp_path / "r"
    argv = ["compare", "--models", "zoo:resnet_digits,zoo:densenet_digits", *FAST, "--out", str(out)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    rc = main(argv)
    assert ignored == ([KeyboardInterrupt] if where == "weakref" else []), ignored  # the press was dropped
    assert rc == 130, capsys.readouterr()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # no handler left behind
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "interrupted" and res["cells_done"] == 1
    # the cell finished (saved; "plain" raised in it after, so it is listed from the cache); nothing after it
    assert [c["method"] for c in res["models"][0]["methods"]] == ["gradient"]
    assert res["models"][1].get("methods", []) == []
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv) == 0  # resumes: the finished cell is reused, the rest computed
    again = json.loads((out / "results.json").read_text())
    assert again["status"] == "complete" and again["cells_done"] == 4
    assert again["models"][0]["methods"][0]["reused"] is True


def test_the_handler_is_the_runs_only_in_the_main_thread_over_the_default(tmp_path, monkeypatch):
    """Installed for the run (seen from inside a cell) and put back after; a caller's own SIGINT handler is
    left alone; a run from another thread (where ``signal.signal`` raises) works and installs nothing."""
    import signal
    import threading

    seen: list = []
    compute = compare.Job.compute_cell

    def cell(self, *a, **k):
        seen.append(signal.getsignal(signal.SIGINT))
        return compute(self, *a, **k)

    monkeypatch.setattr(compare.Job, "compute_cell", cell)
    argv = ["compare", "--models", "zoo:resnet_digits", *FAST, "--methods", "gradient", "--no-cache"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert seen[-1] is not signal.default_int_handler and getattr(seen[-1], "__self__", None) is not None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGINT, mine)
    try:
        assert main([*argv, "--out", str(tmp_path / "b")]) == 0
        assert seen[-1] is mine and signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)

    rcs: list = []
    t = threading.Thread(target=lambda: rcs.append(main([*argv, "--out", str(tmp_path / "c")])))
    t.start()
    t.join()
    assert rcs == [0] and seen[-1] is signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_dropped_ctrl_c_stops_a_cell_at_its_next_batch(tmp_path, capsys, monkeypatch):
    """Dropped in the first explanation batch of the first cell: the cell stops at the next batch (none
    finished), rather than running its remaining batches and metrics."""
    import sys

    import relprop

    monkeypatch.setattr(sys, "unraisablehook", lambda u: None)
    explain, compute, calls = relprop.explain, compare.Job.compute_cell, []

    def cell(self, *a, **k):  # explain calls counted from the first cell on (not the preflight's)
        calls.append("cell")
        return compute(self, *a, **k)

    def once(*a, **k):
        if calls:
            calls.append(1)
            if len(calls) == 2:
                _press_ctrl_c("weakref")
        return explain(*a, **k)

    monkeypatch.setattr(compare.Job, "compute_cell", cell)
    monkeypatch.setattr(relprop, "explain", once)
    out = tmp_path / "r"
    argv = ["compare", "--models", "zoo:resnet_digits", *FAST, "--samples", "4", "--batch-size", "2", "--out", str(out)]
    assert main(argv) == 130
    assert calls == ["cell", 1]  # the cell's second batch was not explained
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "interrupted" and res["cells_done"] == 0


def test_a_dropped_ctrl_c_in_the_preflight_stops_before_any_cell(tmp_path, capsys, monkeypatch):
    """The CLI checks every model before computing; a Ctrl-C dropped there stops the command (it went on)."""
    import sys

    import relprop

    monkeypatch.setattr(sys, "unraisablehook", lambda u: None)
    explain, cells = relprop.explain, []

    def once(*a, **k):
        _press_ctrl_c("weakref")
        monkeypatch.setattr(relprop, "explain", explain)
        return explain(*a, **k)

    monkeypatch.setattr(relprop, "explain", once)
    monkeypatch.setattr(compare.Job, "compute_cell", lambda *a, **k: cells.append(1))
    out = tmp_path / "r"
    assert main(["compare", "--models", "zoo:resnet_digits", *FAST, "--out", str(out)]) == 130
    assert cells == [] and "relprop: interrupted" in capsys.readouterr().err
