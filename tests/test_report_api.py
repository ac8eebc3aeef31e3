"""``relprop.report.run_compare`` from Python with a user's own modules and tensors, against the CLI on the
same model saved to a file; failed model loads, repeated methods, switched-off checks, honest timing and
bold that follows the ranks' tie test."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn

from relprop.cli import main
from relprop.report import MethodSpec, Settings, html, run_compare
from relprop.report.compare import Job
from relprop.specs import Data, SpecError
from relprop.specs.adapters import from_dataset, from_tensors, to_models

PIL = pytest.importorskip("PIL.Image")


class TinyCNN(nn.Module):
    """A user's model, made here (module level, so that ``torch.save(model)`` can pickle it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


SETTINGS = dict(
    samples=8,
    grid=4,
    sensitivity_samples=4,
    randomisation_samples=5,
    randomisation_layers=2,
    regions=8,
    steps=8,
    bootstrap=200,
    batch_size=4,
)
FLAGS = [x for k, v in SETTINGS.items() for x in ("--" + k.replace("_", "-"), str(v))]


def quiet(_):
    pass


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A tiny CNN, 12 random images with values k/255 (so PNG files hold exactly the same numbers) sorted by
    label, the same images as a class-folder of PNGs, and the model pickled to a file."""
    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    net = TinyCNN()
    x = torch.randint(0, 256, (12, 3, 16, 16)).float() / 255.0
    y = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    for i, (img, lab) in enumerate(zip(x, y)):
        d = root / "images" / str(int(lab))
        d.mkdir(parents=True, exist_ok=True)
        arr = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        PIL.fromarray(arr).save(d / f"{i:03d}.png")
    torch.save(net, root / "model.pt")
    return {"net": net, "x": x, "y": y, "root": root}


def _numbers(res: dict) -> dict:
    """Every number of every cell but the times (which are measured)."""
    out = {}
    for m in res["models"]:
        out["accuracy"] = m["accuracy"]
        for c in m["methods"]:
            assert c["status"] == "ok", c
            for k, v in c["summary"].items():
                if k != "explain_seconds":
                    out[(c["method"], k)] = (v["mean"], tuple(v["ci"]), v["n"])
            out[(c["method"], "curves")] = c["curves"]
            out[(c["method"], "randomisation_check")] = c["randomisation_check"]
    return out


def _examples(out) -> dict:
    import pyarrow.parquet as pq

    t = pq.read_table(out / "examples.parquet").to_pydict()
    keys = [k for k in t if k not in ("run", "model", "model_name", "explain_seconds")]
    return {k: t[k] for k in keys}


def test_own_module_and_tensors_equal_the_cli_on_the_same_model_file(user, tmp_path):
    net, x, y, root = user["net"], user["x"], user["y"], user["root"]
    net.train()
    grads_before = [p.requires_grad for p in net.parameters()]
    cli_out = tmp_path / "cli"
    args = ["compare", "--models", str(root / "model.pt"), "--trust-pickle", "--data", str(root / "images")]
    assert main([*args, "--methods", "saliency,lrp", *FLAGS, "--out", str(cli_out), "--quiet"]) == 0
    cli = json.loads((cli_out / "results.json").read_text())

    api = run_compare(
        {"mine": net}, (x, y), ["saliency", "lrp"], tmp_path / "api", Settings(**SETTINGS), progress=False, log=quiet
    )
    assert api["status"] == "complete" and api["models"][0]["name"] == "mine"
    assert api["data"]["n"] == 12 and api["models"][0]["n_eval"] == 12
    assert _numbers(api) == _numbers(cli)  # bit for bit: the same inputs, model and settings
    assert _examples(tmp_path / "api") == _examples(cli_out)
    assert 0.0 <= api["models"][0]["accuracy"] <= 1.0
    # the user's module is left as it was found (train mode, parameters requiring grad)
    assert net.training and [p.requires_grad for p in net.parameters()] == grads_before

    # a map-style Dataset of (input, label) and a list of modules: the same numbers again
    ds = torch.utils.data.TensorDataset(x, y)
    again = run_compare(
        [net], ds, ["saliency", "lrp"], tmp_path / "ds", Settings(**SETTINGS), progress=False, log=quiet
    )
    assert again["models"][0]["spec"] == "module:TinyCNN"
    assert _numbers(again) == _numbers(api)
    # the report page is written from the same path
    page = (tmp_path / "api" / "index.html").read_text()
    assert "tensors:tensors" in page and "mine" in page
    assert api["models"][0]["preprocess"]["source"] == "none (the tensors given are its inputs)"
    assert cli["models"][0]["preprocess"]["source"] == "inferred (first conv layer)"


def test_normalised_tensors_go_in_as_given_and_are_shown_rescaled(user, tmp_path):
    net, x, y = user["net"], user["x"], user["y"]
    z = (x - 0.5) / 0.25  # normalised inputs, outside [0, 1]
    data = from_tensors(z, y, ["a", "b", "c"])
    assert torch.equal(data.model_ready, z) and data.images.min() >= 0 and data.images.max() <= 1
    job = Job(tmp_path, data, [], Settings(**SETTINGS), log=quiet, progress=False)
    prep = job.prepare(to_models(net)[0], [0, 5])
    assert torch.equal(prep.inputs, z[[0, 5]])  # not clamped, resized or normalised again
    assert prep.label_names == ["a", "b"]


def test_a_model_that_fails_to_load_is_reported_like_a_failed_cell(user, tmp_path):
    res = run_compare(
        [str(tmp_path / "missing.pt"), user["net"]],
        (user["x"], user["y"]),
        ["saliency"],
        tmp_path / "r",
        Settings(**SETTINGS),
        progress=False,
        log=quiet,
    )
    assert res["status"] == "incomplete"
    bad, good = res["models"]
    assert "could not load the model" in bad["error"] and "not found" in bad["error"] and bad["methods"] == []
    assert any("missing.pt" in p and "not found" in p for p in res["problems"])
    assert good["methods"][0]["status"] == "ok"  # the other model still ran
    assert [r["name"] for r in res["ranking"]][0] == "TinyCNN" and res["ranking"][1]["rank"] is None
    page = (tmp_path / "r" / "index.html").read_text()
    assert "Failed: could not load the model" in page and 'id="incomplete"' in page
    assert main(["compare", "--models", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "c")]) != 0


def test_user_input_errors_are_one_line(user):
    x, y = user["x"], user["y"]
    cases = [
        (lambda: from_tensors((x * 255).to(torch.uint8), y), "floating-point image batch"),
        (lambda: from_tensors(x, y[:3]), "12 integer class indices"),
        (lambda: from_tensors(x, y.float()), "integer class indices"),
        (lambda: from_tensors(x.flatten(1), y), "(N, C, H, W)"),
        (lambda: from_tensors(x, y, ["a"]), "class_names has 1 names"),
        (lambda: from_tensors(torch.full_like(x, float("nan")), y), "NaN"),
        (lambda: from_dataset([(np.zeros((3, 4, 4)), 0)]), "not a tensor"),
        (lambda: to_models([3]), "spec string, a torch.nn.Module"),
        (lambda: to_models([user["net"], "a", "a"]), "given twice"),
        (lambda: run_compare([user["net"]], x, ["saliency"], "/nonexistent/never"), "needs the labels too"),
        (lambda: run_compare([user["net"]], (x, y), ["salency"], "/nonexistent/never"), "Did you mean"),
    ]
    for make, text in cases:
        with pytest.raises(SpecError) as err:
            make()
        assert text in str(err.value) and "\n" not in str(err.value), (text, str(err.value))


def test_repeated_methods_are_computed_once_with_a_warning(user, tmp_path, monkeypatch, capsys):
    calls = []
    real = Job.compute_cell

    def counting(self, model, m, *a, **k):
        calls.append(m.label)
        return real(self, model, m, *a, **k)

    monkeypatch.setattr(Job, "compute_cell", counting)
    methods = [
        "saliency",
        "saliency",
        "ig",
        "integrated_gradients:n_steps=16",
        "lrp",
        "lrp:composite=epsilon_plus_flat",
    ]
    res = run_compare(
        [user["net"]], (user["x"], user["y"]), methods, tmp_path / "r", Settings(**SETTINGS), progress=False, log=quiet
    )
    assert calls == ["saliency", "ig", "lrp"]
    assert res["methods"] == ["saliency", "ig", "lrp", "lrp:composite=epsilon_plus_flat"]
    w = " | ".join(res["warnings"])
    assert "'saliency' and 'saliency' are given twice" in w
    assert "'ig' and 'integrated_gradients:n_steps=16' are the same computation" in w
    assert "'lrp' and 'lrp:composite=epsilon_plus_flat' are the same computation" in w  # same on this model
    cells = {c["method"]: c for c in res["models"][0]["methods"]}
    twin = cells["lrp:composite=epsilon_plus_flat"]
    assert twin["duplicate_of"] == "lrp" and twin["summary"]["abpc"] == cells["lrp"]["summary"]["abpc"]
    # the command line refuses the same spec twice before any work
    assert main(["compare", "--methods", "saliency,saliency", "--out", str(tmp_path / "c")]) != 0
    assert "method given twice: saliency" in capsys.readouterr().err


def test_randomisation_off_is_said_not_run_without_an_empty_column(user, tmp_path, capsys):
    out = tmp_path / "r"
    flags = [f if f != "5" else "0" for f in FLAGS]  # --randomisation-samples 0
    assert "--randomisation-samples" in flags and flags[flags.index("--randomisation-samples") + 1] == "0"
    root = user["root"]
    args = ["compare", "--models", str(root / "model.pt"), "--trust-pickle", "--data", str(root / "images")]
    assert main([*args, "--methods", "saliency", *flags, "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "randomisation check was not run: randomisation_samples is 0 (--randomisation-samples 0)" in (
        said.out + said.err
    )
    res = json.loads((out / "results.json").read_text())
    assert res["not_run"] == {
        "randomisation": "the randomisation check was not run: randomisation_samples is 0 (--randomisation-samples 0)"
    }
    cell = res["models"][0]["methods"][0]
    assert "randomisation_similarity" not in cell["summary"] and cell["randomisation_check"] is None
    page = (out / "index.html").read_text()
    assert 'id="not-run"' in page and "The randomisation check was not run" in page
    assert "Randomisation sim." not in page and "Randomisation<br>" not in page  # no column for it
    assert "randomisation check</b>: not run (randomisation_samples is 0" in page
    with PIL.open(out / res["models"][0]["curves_figure"]) as im:
        assert im.size[0] < 1400  # three panels, no empty randomisation plot (four are 1600 px wide)


def test_explanation_time_is_per_batch_without_an_interval(user, tmp_path):
    from relprop.report.cell_metrics import per_batch_seconds

    assert per_batch_seconds([(2, 1.0), (1, 0.5)]) == [0.5, 0.5, 0.5]
    res = run_compare(
        [user["net"]], (user["x"], user["y"]), ["saliency"], tmp_path / "r", Settings(**SETTINGS), progress=False,
        log=quiet,
    )  # fmt: skip
    c = res["models"][0]["methods"][0]
    t = c["summary"]["explain_seconds"]
    assert t["ci"] == [None, None] and t["note"] == "per-batch timing" and t["mean"] > 0
    assert res["ranking"][0]["overall"]["explain_seconds"]["ci"] == [None, None]
    assert c["summary"]["abpc"]["ci"][0] is not None  # the other metrics keep their intervals
    import pyarrow.parquet as pq

    per = pq.read_table(tmp_path / "r" / "examples.parquet").to_pydict()["explain_seconds"]
    assert len(per) == 8 and len(set(per[:4])) == 1 and len(set(per[4:])) == 1  # two batches of 4
    assert sum(per) == pytest.approx(t["mean"] * 8)
    page = (tmp_path / "r" / "index.html").read_text()
    assert "Explain time<br>" in page and "per-batch timing" in page


# ------------------------------------------------------------------------------------ bold = tied for best
def _results(values: dict[str, dict[str, list[float]]], tmp_path) -> dict:
    """A results dict as run_compare assembles it, from per-example values model -> method -> ABPC."""
    from relprop.report import _assemble
    from relprop.report.cell_metrics import summary_of

    s = Settings(bootstrap=500)
    models = []
    for name, per_method in values.items():
        cells = []
        for meth, v in per_method.items():
            ex = {"example": list(range(len(v))), "abpc": v, "insertion": v, "deletion": [1 - a for a in v]}
            per = {k: ex[k] for k in ("abpc", "insertion", "deletion")}
            c = {"method": meth, "status": "ok", "examples": ex, "summary": summary_of(per, s)}
            c.update({k: c["summary"][k]["mean"] for k in per})
            cells.append(c)
        models.append({"spec": f"x:{name}", "name": name, "anchor": f"m-{name}", "methods": cells})
    data = Data(spec="d", name="d", kind="image", labels=torch.zeros(len(v), dtype=torch.long), class_names=["0"])
    methods = [MethodSpec.parse(k) for k in dict.fromkeys(k for pm in values.values() for k in pm)]
    res = _assemble(models, methods, data, s, "cmd", "complete", 0, 0, 0.0, tmp_path)
    res["data"]["n_metrics"] = len(v)
    return res


def test_bold_marks_every_row_tied_for_best(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.2, 40)
    a = list(base)
    noise = rng.normal(0, 0.03, 40)
    b = list(base - 0.004 + noise - noise.mean())  # mean 0.004 lower, but the paired interval contains 0
    c = list(base - 0.3)  # clearly worse
    res = _results({"A": {"lrp": a}, "B": {"lrp": b}, "C": {"lrp": c}}, tmp_path)
    best = {r["name"]: r["best"] for r in res["ranking"]}
    assert np.mean(a) > np.mean(b)
    assert "abpc" in best["A"] and "abpc" in best["B"] and "abpc" not in best["C"]
    assert "deletion" in best["A"] and "deletion" in best["B"] and "deletion" not in best["C"]
    ranks = {r["model"]: r["rank"] for r in res["rankings_per_method"]["lrp"]}
    assert ranks == {"m-A": 1, "m-B": 1, "m-C": 3}  # the same test: bold == rank 1
    # within one model: two methods tied for best are both bold, a worse one is not
    res = _results({"A": {"lrp": a, "saliency": b, "gradient": c}}, tmp_path)
    got = {c["method"]: c["best"] for c in res["models"][0]["methods"]}
    assert "abpc" in got["lrp"] and "abpc" in got["saliency"] and "abpc" not in got["gradient"]
    html.render(res, tmp_path)
    page = (tmp_path / "index.html").read_text()
    rows = {r.split("</td>")[0]: r for r in page.split('<tr><td class="l name">')[1:]}
    assert rows["lrp"].count("<b>") == rows["saliency"].count("<b>") >= 3 and "<b>" not in rows["gradient"]
    assert "every row tied with it" in page and "paired-bootstrap interval" in page


def test_settings_of_the_test_match_the_cli_flags():
    """FLAGS and SETTINGS describe one run (the equality test depends on it)."""
    from relprop.cli import build_parser

    args = build_parser().parse_args(["compare", *FLAGS])
    assert {k: getattr(args, k) for k in SETTINGS} == SETTINGS
    assert asdict(Settings(**SETTINGS))["bootstrap"] == 200


def test_the_readme_python_api_snippet_runs(tmp_path, monkeypatch):
    """The README's "Python API" example, as written (its own modules and random tensors)."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Python API: your own models and tensors", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the documented example itself
    res = scope["res"]
    assert res["status"] == "complete" and [m["name"] for m in res["models"]] == ["small", "wide"]
    assert res["methods"] == ["lrp", "saliency"] and res["data"]["n_metrics"] == 16
    assert (tmp_path / "report" / "index.html").exists() and (tmp_path / "report" / "results.json").exists()


def test_method_specs_live_in_the_specs_layer():
    """The report re-exports the CLI/specs layer's MethodSpec; it has no class of its own."""
    import relprop.report
    import relprop.specs.methods

    assert relprop.report.MethodSpec is relprop.specs.methods.MethodSpec


def test_own_modules_are_cached_by_weights_and_code(user, tmp_path):
    """A module from Python is cached like a model file: reused while its weights and code are the same,
    recomputed when a weight changes, and never cached when its class is defined in no file (a notebook)."""
    import copy

    net = copy.deepcopy(user["net"])
    data = (user["x"], user["y"])

    def run(model, out="r"):
        res = run_compare([model], data, ["saliency"], tmp_path / out, Settings(**SETTINGS), progress=False, log=quiet)
        return res, res["models"][0]["methods"][0]

    _, first = run(net)
    res, again = run(net)
    assert first["reused"] is False and again["reused"] is True
    with torch.no_grad():
        net.fc.bias[0] += 1.0
    _, changed = run(net)
    assert changed["reused"] is False and changed["summary"]["abpc"] != first["summary"]["abpc"]

    scope: dict = {"nn": nn, "torch": torch}
    exec(  # noqa: S102 - a class whose source is in no file, as in a notebook
        "class Cell(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 3, 3, padding=1)\n"
        "    def forward(self, x):\n"
        "        return self.conv(x).mean((2, 3))\n",
        scope,
    )
    cell = scope["Cell"]()
    res, one = run(cell, "nb")
    _, two = run(cell, "nb")
    assert one["reused"] is False and two["reused"] is False
    assert any("Cell: results are not cached" in w and "in no file" in w for w in res["warnings"])
    cache = tmp_path / "nb" / "cache"
    assert not cache.exists() or not any(cache.iterdir())  # nothing written that a later run could trust


def test_a_long_error_keeps_its_hint_whole():
    """Errors stored in results.json were cut at 300 characters, ending a hint mid-word ("(Ra")."""
    from relprop.report.compare import one_line as _one_line

    long = "x " * 200 + "(Ray: pass --model-files shared)"
    assert _one_line(ValueError(long)).endswith("(Ray: pass --model-files shared)")
    huge = "word " * 1000
    cut = _one_line(ValueError(huge))
    assert len(cut) <= 2000 and cut.endswith("word...")


class FourierCNN(TinyCNN):
    """TinyCNN with an FFT before its head: saliency works, LRP has no rule for the FFT (its cell fails)."""

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(torch.fft.fft(self.pool(x).flatten(1)).real)


def test_a_model_with_a_failed_method_is_not_ranked_overall(user, tmp_path):
    """Its mean rank and overall means would be over fewer methods than the others' (unequal footing, as a
    model a Ctrl-C stopped in): its per-method ranks stand, its overall rank and best marks do not."""
    torch.manual_seed(1)
    res = run_compare(
        {"good": user["net"], "fourier": FourierCNN()},
        (user["x"], user["y"]),
        ["saliency", "lrp"],
        tmp_path / "r",
        Settings(**SETTINGS),
        progress=False,
        log=quiet,
    )
    assert res["status"] == "incomplete"
    rows = {r["name"]: r for r in res["ranking"]}
    fourier, good = rows["fourier"], rows["good"]
    assert [c["status"] for c in res["models"][1]["methods"]] == ["ok", "failed"]
    assert fourier["ranks"]["saliency"] is not None  # ranked where it finished
    assert fourier["rank"] is None and fourier["mean_rank"] is None and fourier["best"] == []
    assert fourier["failed_methods"] == ["lrp"] and good["rank"] == 1 and good["failed_methods"] == []
    page = (tmp_path / "r" / "index.html").read_text()
    assert "lrp failed; not ranked overall" in page


def test_one_failed_cell_record_for_both_engines():
    """The failed-cell record is built by one function (it was built in report/__init__ and again in the Ray
    engine): an exception is said as its type and first line, a worded message is kept (shortened)."""
    from relprop.report.compare import failed_cell
    from relprop.specs import MethodSpec

    m = MethodSpec.parse("lrp:composite=epsilon")
    rec = failed_cell(m, ValueError("no layer named fc\n  (traceback detail)"))
    assert rec == {"method": m.label, "name": "lrp", "status": "failed", "error": "ValueError: no layer named fc",
                   "reused": False}  # fmt: skip
    assert failed_cell(m, "SpecError: too large")["error"] == "SpecError: too large"
    assert failed_cell(m, "x " * 2000)["error"].endswith("...")
