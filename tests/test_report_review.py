"""Fixes from a new user's review of `relprop compare`'s report: the accuracy count with ``--labels ignore``,
each warning printed once, the resolved device/dtype, every method tied for best named, the settings of the
data's kind only, the flat-model flag in the terminal ranking, one progress path, the pairwise-tie legend."""

import json
import re

import pytest
import torch
from torch import nn

from relprop.cli import main
from relprop.report import Settings, cell_metrics, html, run_compare
from test_cli_user_paths import FAST, digit_folder, digits, tiny_bert  # noqa: F401 - digits: a fixture

pytest.importorskip("PIL.Image")


def test_labels_ignore_counts_only_labelled_examples_and_warns_once(tmp_path, capsys, digits):  # noqa: F811
    """Folders 3/ (a digit class) and cats/ (none), 3 images each: accuracy over the 3 labelled examples,
    said as "3 of 6" in the terminal, the HTML and results.json; each warning printed once."""
    data = digit_folder(tmp_path / "mixed", digits, {"3": 3, "cats": 5}, per_class=3)
    out = tmp_path / "r"
    flags = [f for f in FAST if f != "--quiet"]
    rc = main(["compare", "--models", "zoo:resnet_digits", "--data", str(data), "--methods", "saliency",
               "--labels", "ignore", "--device", "auto", "--out", str(out), *flags])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    res = json.loads((out / "results.json").read_text())
    m = res["models"][0]
    assert (m["n_eval"], m["n_total"]) == (3, 6) and m["accuracy"] is not None
    assert res["ranking"][0]["n_eval"] == 3
    said = "3 of 6 examples (3 have no model class)"
    assert said in cap.out and said in (out / "index.html").read_text()
    # every warning (label mismatch from the preflight, the run's own) once on the terminal
    assert res["warnings"]
    for w in res["warnings"]:
        assert (cap.out + cap.err).count(w) == 1, (w, cap.err)
    # --device auto: what it resolved to, in results.json and the page
    assert res["settings"]["device"] == "auto" and res["settings"]["device_used"] == "cpu"
    assert res["settings"]["dtype_used"] == "float32"
    assert "auto → cpu" in (out / "index.html").read_text()


def test_warnings_said_once_with_quiet(tmp_path, capsys, digits):  # noqa: F811
    data = digit_folder(tmp_path / "mixed", digits, {"3": 3, "cats": 5}, per_class=2)
    rc = main(["compare", "--models", "zoo:resnet_digits", "--data", str(data), "--methods", "saliency",
               "--labels", "ignore", "--out", str(tmp_path / "r"), *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["warnings"] and all(err.count(w) == 1 for w in res["warnings"]), err


class Linear(nn.Module):
    """Linear in the input: integrated gradients (zero baseline) equals input x gradient exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_best_method_names_every_method_tied_for_best(tmp_path):
    torch.manual_seed(1)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    s = Settings(samples=4, grid=2, sensitivity_samples=0, randomisation_samples=0, regions=4, steps=4, bootstrap=200)
    res = run_compare({"lin": Linear()}, (x, y), ["input_x_gradient", "integrated_gradients"], tmp_path / "r", s,
                      progress=False, log=lambda _: None)  # fmt: skip
    r = res["ranking"][0]
    cells = res["models"][0]["methods"]
    assert cells[0]["abpc"] == pytest.approx(cells[1]["abpc"], abs=1e-5)  # the same numbers: a tie
    assert sorted(r["best_methods"]) == ["input_x_gradient", "integrated_gradients"]
    page = (tmp_path / "r" / "index.html").read_text()
    assert html.best_methods(r) in page and html.best_methods(r).endswith(" (tied)")
    assert " = " in html.best_methods(r)
    assert html.best_methods({"best_method": "lrp", "best_methods": ["lrp"]}) == "lrp"
    # the legend says ties are pairwise (not transitive)
    assert "not transitive" in page


def test_progress_false_and_redirected_stderr_log_one_line_per_cell(tmp_path, capsys):
    """Not a terminal (pytest captures stderr): no tqdm bar even with progress=True; one log line per cell."""
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    s = Settings(samples=2, grid=2, sensitivity_samples=0, randomisation_samples=0, regions=4, steps=4, bootstrap=50)
    lines: list[str] = []
    run_compare({"lin": Linear()}, (x, y), ["saliency", "gradient"], tmp_path / "r", s, progress=True,
                log=lines.append)  # fmt: skip
    err = capsys.readouterr().err
    assert "cell/s" not in err and "it/s" not in err and "\r" not in err, err
    assert sum("lin × saliency" in ln for ln in lines) == 1 and sum("lin × gradient" in ln for ln in lines) == 1


def test_settings_shown_for_the_data_kind_only():
    s = {"samples": 4, "patch_grid": 8, "regions": 32, "baseline": "black", "steps": 16, "device": "auto",
         "device_used": "cpu", "dtype": "float32", "dtype_used": "float32"}  # fmt: skip
    text = html.shown_settings(s, "text")
    assert "patch_grid" not in text and "regions" not in text and "baseline" not in text and text["steps"] == 16
    assert text["device"] == "auto → cpu" and text["dtype"] == "float32" and "device_used" not in text
    image = html.shown_settings(s, "image")
    assert image["patch_grid"] == 8 and image["regions"] == 32
    assert html.accuracy_count({"n_eval": 12, "n_total": 12}) == "12 examples"


@pytest.mark.slow
def test_text_report_flags_a_flat_model_in_the_terminal_and_shows_text_settings(tmp_path, capsys):
    """A random-init tiny BERT (its output does not move): the terminal ranking marks its ABPC uninformative;
    the page shows no image-only settings."""
    pytest.importorskip("transformers")
    model = tiny_bert(tmp_path / "init")
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\na good film,positive\na bad plot,negative\ngood plot,positive\nbad film,negative\n")
    out = tmp_path / "r"
    rc = main(["compare", "--models", f"hf:{model}", "--data", str(csv), "--methods", "gradient", "--out", str(out),
               *FAST])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    line = next(ln for ln in cap.out.splitlines() if ln.strip().startswith("1."))
    assert "uninformative" in line, cap.out
    page = re.sub(r"<p>Command: .*?</p>", "", (out / "index.html").read_text())  # the command has --regions
    assert "set with <code>--steps</code>)" in page
    assert "patch_grid" not in page and "--patch-grid" not in page and "regions" not in page


def _cell(name: str, n: int, lo: float, hi: float) -> dict:
    summary = {"randomisation_similarity": {"mean": (lo + hi) / 2, "ci": [lo, hi], "n": n}}
    verdict = cell_metrics.randomisation_verdict(summary, 0.5)
    return {"method": name, "status": "ok", "summary": summary, "randomisation_check": verdict}


def test_inconclusive_randomisation_says_why_and_is_a_note_at_the_default_setting():
    from relprop.report import _inconclusive

    straddle = [{"name": "m", "methods": [_cell("lrp", 6, 0.3, 0.7), _cell("saliency", 6, 0.1, 0.3)]}]
    assert [c["randomisation_check"] for c in straddle[0]["methods"]] == ["inconclusive", "pass"]
    text, note = _inconclusive(straddle, Settings())  # the default 6 samples: a note
    assert note and "m × lrp" in text and "straddles the threshold 0.5" in text and "saliency" not in text
    assert "fewer than" not in text
    text, note = _inconclusive(straddle, Settings(randomisation_samples=7))  # the user's choice: a warning
    assert not note
    few = [{"name": "m", "methods": [_cell("lrp", 3, 0.1, 0.2)]}]  # would pass, but 3 examples decide nothing
    assert few[0]["methods"][0]["randomisation_check"] == "inconclusive"
    text, note = _inconclusive(few, Settings(randomisation_samples=3))
    assert not note and "fewer than 5 examples" in text and "straddles" not in text
    assert "more --randomisation-samples (now 3)" in text
    text, _ = _inconclusive(few, Settings(samples=3))  # --samples caps the default 6: raise that
    assert "more --samples (now 3" in text
    assert _inconclusive([{"name": "m", "methods": [_cell("lrp", 6, 0.1, 0.3)]}], Settings()) is None


def test_tables_fit_at_1400_px_or_scroll_with_a_hint_and_names_do_not_break(tmp_path):
    """Every table of the page at 1400 px: inside its container, or in a container that scrolls sideways
    with a visible hint; model and method names on one line (a name like "my-/bert-base-uncased")."""
    from relprop.report import browser

    if not browser.find_chromium():
        pytest.skip("chromium is not installed")
    torch.manual_seed(1)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    s = Settings(samples=6, grid=2, sensitivity_samples=2, randomisation_samples=2, randomisation_layers=1,
                 regions=4, steps=4, bootstrap=50)  # fmt: skip
    models = {"my-/bert-base-uncased-finetuned": Linear(), "another-long-model-name": Linear()}
    run_compare(models, (x, y), ["saliency", "input_x_gradient"], tmp_path / "r", s, progress=False,
                log=lambda _: None)  # fmt: skip
    tables = browser.table_fit(tmp_path / "r" / "index.html", width=1400)
    data = [t for t in tables if t["id"] in ("ranking-table", "per-method-ranks", "metrics")]
    assert {t["id"] for t in data} == {"ranking-table", "per-method-ranks", "metrics"}, tables
    for t in data:
        assert t["scrollable"], t  # in a container that scrolls, not cut off by the page
        assert t["right"] <= t["box_right"] + 1 or t["hint"], t  # wider than its box: the hint shows
        assert t["hint"] == t["scrolls"], t  # and only then
        assert t["name_lines"] == 1, t
    narrow = browser.table_fit(tmp_path / "r" / "index.html", width=700)  # too narrow: scrolls, with the hint
    assert any(t["scrolls"] and t["hint"] for t in narrow if t["id"] == "ranking-table"), narrow


def test_heatmap_grid_columns_line_up_with_the_input_row(tmp_path, monkeypatch):
    """The colour bars take their width from the heatmap rows; the input row takes the same, so every
    column's images have the same left and right edge (they drifted left and were narrower)."""
    from relprop.report import figures

    edges: list[list[tuple[float, float]]] = []
    save = figures._save

    def spy(fig, path, title, dpi, tight=True):
        fig.canvas.draw()
        rows = sorted({round(ax.get_position().y0, 3) for ax in fig.axes if ax.images}, reverse=True)
        for y in rows:
            row = [ax for ax in fig.axes if ax.images and round(ax.get_position().y0, 3) == y]
            edges.append([(a.images[0].get_window_extent().x0, a.images[0].get_window_extent().x1) for a in row])
        return save(fig, path, title, dpi, tight)

    monkeypatch.setattr(figures, "_save", spy)
    torch.manual_seed(0)
    display = torch.rand(4, 3, 16, 16)
    heat = {"saliency": torch.randn(4, 16, 16), "lrp": torch.randn(4, 16, 16)}
    figures.heatmap_grid(display, heat, [f"ex {j}" for j in range(4)], tmp_path / "g.png", title="grid")
    assert len(edges) == 3 and all(len(r) == 4 for r in edges)
    for row in edges[1:]:
        for (a0, a1), (b0, b1) in zip(edges[0], row):
            assert abs(a0 - b0) < 1.0 and abs(a1 - b1) < 1.0, (edges[0], row)
