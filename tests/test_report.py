"""``relprop compare`` on the shipped zoo: the report, its cache, Ctrl-C, and the page in headless Chromium."""

import json
import os
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


METRIC_KEYS = (
    "abpc",
    "insertion",
    "deletion",
    "insertion_minus_deletion",
    "class_sensitivity",
    "randomisation_similarity",
)


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
            for k in METRIC_KEYS:
                summ = c["summary"][k]
                assert summ["ci"][0] <= summ["mean"] <= summ["ci"][1], (k, summ)
                assert c[k] == summ["mean"]
            assert c["summary"]["abpc"]["n"] == 8 and c["summary"]["class_sensitivity"]["n"] == 4
            assert c["summary"]["randomisation_similarity"]["n"] == 2
            assert c["randomisation_check"] == "inconclusive"  # 2 examples decide nothing
            assert len(c["curves"]["morf"]) == len(c["curves"]["lerf"]) == 9
            assert len(c["randomisation_curve"]) == 2
            assert c["explain_seconds_per_sample"] > 0 and c["metric_seconds"] > 0
            assert "replaced by 'black'" in c["perturbation"]["abpc"]
        assert (report / m["grid_figure"]).stat().st_size > 10_000
        assert (report / m["curves_figure"]).exists()
    assert res["settings"]["samples"] == 8 and "compare" in res["command"]
    assert res["data"]["n_metrics"] == 8
    page = (report / "index.html").read_text()
    for text in ("Ranking of models", "resnet_digits", "Perturbation curves", "Settings of this run", "results.json"):
        assert text in page
    for text in ("higher is better", "lower is better", "Perturbation settings", "metrics on 8", "Mean rank"):
        assert text in page, text


def test_per_example_parquet_holds_every_number(report):
    """The means in results.json are the means of examples.parquet: one row per model x method x example."""
    pq = pytest.importorskip("pyarrow.parquet")
    from relprop.report.scores import EXAMPLE_COLUMNS

    t = pq.read_table(report / "examples.parquet")
    assert t.schema.names == [c for c, _ in EXAMPLE_COLUMNS]
    rows = t.to_pylist()
    assert len(rows) == 2 * 2 * 8
    res = json.loads((report / "results.json").read_text())
    data_n = res["data"]["n"]
    for m in res["models"]:
        for c in m["methods"]:
            mine = [r for r in rows if r["model"] == m["spec"] and r["method"] == c["method"]]
            assert len(mine) == 8 and len({r["example"] for r in mine}) == 8
            assert all(0 <= r["example"] < data_n for r in mine)
            assert all(r["prediction"] == r["target"] for r in mine)  # --target pred
            for k in METRIC_KEYS:
                vals = [r[k] for r in mine if r[k] is not None]
                assert vals and abs(sum(vals) / len(vals) - c[k]) < 1e-12, k
            assert sum(r["class_sensitivity"] is not None for r in mine) == 4
    # the same examples for both models: the rankings pair them
    cells = {(r["model"], r["method"]) for r in rows}
    examples = {tuple(sorted(r["example"] for r in rows if (r["model"], r["method"]) == c)) for c in cells}
    assert len(cells) == 4 and len(examples) == 1


def test_rankings_name_their_metric_and_tie_by_paired_bootstrap(report):
    from relprop.report.scores import BY_KEY, paired_difference

    pq = pytest.importorskip("pyarrow.parquet")
    rows = pq.read_table(report / "examples.parquet").to_pylist()
    res = json.loads((report / "results.json").read_text())
    anchors = {m["anchor"]: m["spec"] for m in res["models"]}
    for method, ranked in res["rankings_per_method"].items():
        assert all(r["metric"] == "abpc" for r in ranked)
        vals = {
            anchors[r["model"]]: {x["example"]: x["abpc"] for x in rows if x["model"] == anchors[r["model"]] and x["method"] == method}
            for r in ranked
        }  # fmt: skip
        a, b = ranked
        d = paired_difference(vals[anchors[a["model"]]], vals[anchors[b["model"]]], seed=res["settings"]["seed"])
        if d["tie"]:
            assert a["rank"] == b["rank"] == 1 and a["ties_with"] == [b["model"]]
        else:
            assert (a["rank"], b["rank"]) == (1, 2) and BY_KEY["abpc"].better(d["mean"], 0)
    for r in res["ranking"]:
        assert r["metric"] == "abpc"
        per = [v for v in r["ranks"].values() if v is not None]
        assert r["mean_rank"] == sum(per) / len(per)
    assert any("randomisation check is inconclusive" in w for w in res["warnings"])


def test_second_run_reuses_the_cache(report, tmp_path, monkeypatch, capsys):
    out = tmp_path / "again"
    shutil.copytree(report, out)
    before = json.loads((out / "results.json").read_text())
    calls = []

    def no_compute(*a, **k):
        calls.append(1)
        raise AssertionError("a cached cell must not be computed again")

    monkeypatch.setattr(Job, "compute_cell", no_compute)
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
    if not browser.find_chromium():
        if os.environ.get("RELPROP_REQUIRE_CHROMIUM"):  # set by .ci/run: CI must run this test
            pytest.fail("chromium is not installed but RELPROP_REQUIRE_CHROMIUM is set")
        pytest.skip("chromium is not installed (scripts/test.sh and CI install it: apt-get install chromium)")
    images = browser.image_check(report / "index.html")
    res = json.loads((report / "results.json").read_text())
    assert len(images) == 1 + 2 * len(res["models"])  # ranking + grid and curves per model
    for im in images:
        assert im["complete"] and im["width"] > 100 and im["height"] > 100, im
    dom = browser.rendered_dom(report / "index.html")
    # confidence intervals beside every mean: 4 cells x 6 metrics + 2 models x 6 in the ranking table
    assert dom.count('class="ci"') >= 4 * 6 + 2 * 6
    assert 'id="warnings"' in dom and "randomisation check is inconclusive" in dom
    assert 'id="per-method-ranks"' in dom and "Mean rank" in dom
    assert dom.count("Perturbation settings") == 2 and "drawn over its input" in dom
    # no table header wraps (the time column's "Metric s" used to break after "Metric"); units on a 2nd line
    heads = browser.header_lines(report / "index.html", width=1400)
    assert {"Metric time", "Explain time", "ABPC", "Randomisation"} <= {h["text"] for h in heads}
    assert [h for h in heads if h["lines"] > 1] == []
    shot = browser.screenshot(report / "index.html", report / "screenshot.png", height=2000)
    assert shot.stat().st_size > 50_000
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1400, 2000)
        import numpy as np

        assert len(np.unique(np.asarray(im.convert("L").resize((64, 64))))) > 20  # not a blank page


def test_heatmaps_are_overlays_with_a_colour_bar(report):
    """In the grid, where the map is near zero the grey input shows (an overlay, not a bare heatmap)."""
    import numpy as np
    from PIL import Image

    res = json.loads((report / "results.json").read_text())
    with Image.open(report / res["models"][0]["grid_figure"]) as im:
        a = np.asarray(im.convert("RGB")).astype(int)
    grey = (np.abs(a[..., 0] - a[..., 1]) < 3) & (np.abs(a[..., 1] - a[..., 2]) < 3)
    mid_grey = grey & (a[..., 0] > 60) & (a[..., 0] < 200)
    h = a.shape[0]
    assert mid_grey[h // 3 :].mean() > 0.02  # the heat rows (below the input row) show the dimmed input
    reddish = (a[..., 0] - a[..., 2] > 80)[h // 3 :]
    assert reddish.mean() > 0.002  # and the heat


def test_perturbation_settings_from_the_cli_and_saved_attributions(tmp_path):
    out = tmp_path / "r"
    args = small(models="zoo:vgg_digits", methods="gradient,input_x_gradient", samples="6", randomisation_samples="0")
    args += ["--baseline", "zero", "--insertion-baseline", "mean", "--save-attributions", "npy", "--patch-grid", "4"]
    args += ["--rank-by", "deletion"]
    assert main(["compare", *args, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    s = res["settings"]
    assert (s["baseline"], s["insertion_baseline"], s["patch_grid"]) == ("zero", "mean", 4)
    c = res["models"][0]["methods"][0]
    assert c["method"] == "gradient"
    assert "replaced by 'zero'" in c["perturbation"]["abpc"] and "from 'mean'" in c["perturbation"]["insertion"]
    assert c["perturbation"]["unit"].startswith("8x8-pixel patches (4x4 grid)")
    import numpy as np

    a = np.load(out / c["attributions_file"])
    assert a.shape == (6, 1, 32, 32)
    # the saved rows are the explanations of the evaluated examples, in the parquet's order
    from relprop import zoo

    pq = pytest.importorskip("pyarrow.parquet")
    rows = pq.read_table(out / "examples.parquet").to_pylist()
    data = zoo.load_dataset("digits", split="test")
    model = zoo.load_model("vgg_digits")
    first = rows[0]
    e = relprop.explain(
        model, data.images[first["example"] : first["example"] + 1], target=first["target"], method="gradient"
    )
    np.testing.assert_allclose(a[0], e.attributions[0].detach().numpy(), rtol=1e-4, atol=1e-6)
    page = (out / "index.html").read_text()
    assert "Perturbation settings" in page and "lower is better (ranked by)" in page
    # ranked by deletion (lower is better): the metric is named and the best method has the lowest deletion AUC
    r = res["ranking"][0]
    assert r["metric"] == "deletion" and res["rankings_per_method"]["gradient"][0]["metric"] == "deletion"
    cells = res["models"][0]["methods"]
    assert r["best_method"] == min(cells, key=lambda c: c["deletion"])["method"]
    assert r["faithfulness"] == pytest.approx(r["overall"]["deletion"]["mean"])


def test_a_misspelt_baseline_fails_before_computing(tmp_path, capsys):
    assert main(["compare", *small(models="zoo:vgg_digits"), "--baseline", "blak", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--baseline 'blak' is not a baseline. Did you mean 'black'?" in err
    assert not (tmp_path / "r" / "cache").exists()


def test_explain_overlay_cmap_and_save(tmp_path, capsys):
    from PIL import Image

    from relprop import zoo

    data = zoo.load_dataset("digits", split="test")
    img = tmp_path / "digit.png"
    Image.fromarray((data.raw_images[0, 0].numpy() * 255).astype("uint8")).save(img)
    out, saved = tmp_path / "h.png", tmp_path / "a.safetensors"
    args = ["explain", "--model", "zoo:resnet_digits", "--input", str(img), "--method", "lrp,gradient"]
    assert main([*args, "--overlay", "--cmap", "viridis", "--out", str(out), "--save", str(saved)]) == 0
    assert out.stat().st_size > 5_000
    from safetensors.torch import load_file

    maps = load_file(str(saved))
    assert sorted(maps) == ["gradient", "lrp"] and maps["lrp"].shape == (1, 32, 32)
    assert main([*args, "--cmap", "no_such_map", "--out", str(out)]) == 2
    assert "--cmap no_such_map" in capsys.readouterr().err
    assert main([*args, "--save", str(tmp_path / "a.txt")]) == 2


def test_explain_text_pair_both_sentences_readable_scores(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "t.html"
    rc = main(
        ["explain", "--model", "zoo:minilm-similarity", "--input", "A man plays a guitar.", "--reference",
         "Someone makes music.", "--method", "lrp,gradient", "--out", str(out)]
    )  # fmt: skip
    if rc != 0 and "not installed" in capsys.readouterr().err:
        pytest.skip("the MiniLM weights package is not installed")
    assert rc == 0
    text = capsys.readouterr().out
    assert "sentence A, against B" in text and "sentence B, against A" in text
    assert "guitar" in text and "music" in text
    assert "0.0000" not in text and "gradient ×1e-" in text  # tiny gradients printed at a readable scale
    page = out.read_text()
    assert page.count("<h2>") == 2 and ">guitar<" in page and ">music<" in page and 'title="+' in page


# ----------------------------------------------------------------------------------- scores (no model runs)
def test_bootstrap_intervals_are_seeded_and_cover_the_mean():
    import numpy as np

    from relprop.report.scores import bootstrap_ci, summarise

    v = np.random.default_rng(1).normal(2.0, 1.0, size=50)
    assert bootstrap_ci(v, seed=3) == bootstrap_ci(v, seed=3)
    lo, hi = bootstrap_ci(v)
    se = v.std(ddof=1) / np.sqrt(50)
    assert lo < v.mean() < hi and abs((hi - lo) - 2 * 1.96 * se) < 0.35 * (2 * 1.96 * se)
    s = summarise([1.0, None, float("nan"), 3.0])
    assert s["n"] == 2 and s["mean"] == 2.0


def test_paired_bootstrap_ties_and_separates():
    import numpy as np

    from relprop.report.scores import BY_KEY, rank_models

    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 40)  # per-example difficulty, shared by the models (pairing removes it)
    a = {i: float(base[i] + 0.30) for i in range(40)}
    b = {i: float(base[i] + 0.30 + rng.normal(0, 0.01)) for i in range(40)}  # the same model, noise
    c = {i: float(base[i] + 0.25) for i in range(40)}  # a little worse on every example
    rows = {r["model"]: r for r in rank_models({"a": a, "b": b, "c": c}, BY_KEY["abpc"])}
    assert rows["a"]["rank"] == rows["b"]["rank"] == 1 and "b" in rows["a"]["ties_with"]
    assert rows["c"]["rank"] == 3 and rows["c"]["ties_with"] == []
    # lower is better: the order flips
    rows = {r["model"]: r for r in rank_models({"a": a, "c": c}, BY_KEY["deletion"])}
    assert (rows["c"]["rank"], rows["a"]["rank"]) == (1, 2)


def test_randomisation_check_cannot_be_passed_by_a_sign_flip():
    """An explanation that only flips its sign when the top layer is randomised keeps the same |a|: it
    must fail (signed Spearman would be -1, which the old check counted as a pass)."""
    import torch

    from relprop.report import cell_metrics
    from relprop.report.compare import Settings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    original = model[3].weight.detach().clone()
    x = torch.rand(10, 1, 4, 4)
    base = torch.randn(10, 1, 4, 4)

    def flips(mod, xx, tt):
        same = torch.equal(mod[3].weight.detach(), original)
        return base[: len(xx)] * (1.0 if same else -1.0)

    s = Settings(randomisation_samples=10, randomisation_layers=1, sensitivity=False, bootstrap=200)
    res = cell_metrics.sanity_checks(model, x, flips, torch.zeros(10, dtype=torch.long), 10, s)
    sims = res["per_example"]["randomisation_similarity"]
    assert all(abs(v - 1.0) < 1e-9 for v in sims)
    summary = cell_metrics.summary_of(res["per_example"], s)
    assert cell_metrics.randomisation_verdict(summary, 0.5) == "fail"


def test_examples_file_can_be_appended_by_a_later_or_distributed_run(report, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from relprop.report import store

    path = tmp_path / "all.parquet"
    shutil.copy(report / "examples.parquet", path)
    rows = pq.read_table(path).to_pylist()
    extra = [dict(r, run="worker-2") for r in rows[:5]]
    store.append_examples(path, extra)
    t = pq.read_table(path)
    assert t.num_rows == len(rows) + 5 and t.to_pylist()[-5:] == extra
    assert t.schema.equals(store.schema())
    pq.write_table(pa.table({"model": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="different schema"):
        store.append_examples(tmp_path / "other.parquet", extra)
