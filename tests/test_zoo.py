"""The embedded default zoo: packaged weights, real datasets, and the offline MiniLM text helper."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from relprop import zoo

REQUIRED_KEYS = {
    "name",
    "family",
    "architecture",
    "arch_kwargs",
    "dataset",
    "input_shape",
    "num_classes",
    "class_names",
    "normalization",
    "seed",
    "epochs",
    "batch_size",
    "optimizer",
    "train_size",
    "eval_split",
    "eval_size",
    "accuracy",
    "test_accuracy",
    "train_accuracy",
    "num_params",
    "torch_version",
    "command",
}

EXPECTED_SHAPES = {  # name: (split sizes, (C, H, W), number of classes)
    "digits": ({"train": 1347, "test": 450, "all": 1797}, (1, 32, 32), 10),
    "faces": ({"train": 150, "test": 50, "all": 200}, (1, 32, 32), 2),
    "chest_xray": ({"all": 16, "train": 16, "test": 16}, (1, 64, 64), 2),
}


def test_registry_lists_the_four_families_on_digits():
    names = zoo.list_models()
    assert set(zoo.DEFAULT_MODELS) <= set(names)
    assert zoo.DEFAULT_DATASET == "digits"
    families = {zoo.model_info(n)["family"] for n in zoo.models_for_dataset("digits")}
    assert {"ResNet", "VGG", "DenseNet", "ViT"} <= families
    assert zoo.list_datasets() == ["chest_xray", "digits", "faces"]


@pytest.mark.parametrize("name", zoo.list_models())
def test_model_loads_in_eval_mode_and_reaches_recorded_accuracy(name):
    info = zoo.model_info(name)
    assert REQUIRED_KEYS <= set(info), REQUIRED_KEYS - set(info)
    assert info["name"] == name
    assert (zoo.WEIGHTS_DIR / f"{name}.safetensors").stat().st_size < 1_000_000
    model = zoo.load_model(name)
    assert not model.training and all(not m.training for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == info["num_params"]

    ds = zoo.load_dataset(info["dataset"], info["eval_split"])
    assert len(ds) == info["eval_size"]
    assert list(ds.input_shape) == info["input_shape"]
    assert ds.class_names == info["class_names"]
    assert ds.mean == info["normalization"]["mean"] and ds.std == info["normalization"]["std"]
    acc = zoo.evaluate(model, ds)
    assert abs(acc - info["accuracy"]) <= 1e-6, (name, acc, info["accuracy"])
    if info["eval_split"] == "test":
        assert info["test_accuracy"] == info["accuracy"]
        assert acc > (0.9 if info["dataset"] == "digits" else 0.8)
    else:
        assert info["test_accuracy"] is None and "TRAINING accuracy" in info["notes"]

    x = ds.images[:1].expand(64, *ds.input_shape).contiguous()
    with torch.no_grad():
        model(x)  # warm-up
        best = min(_timed(model, x) for _ in range(3))
    assert best < 1.0, f"{name}: batch of 64 took {best:.3f}s"


def _timed(model, x):
    t = time.perf_counter()
    out = model(x)
    assert out.shape == (64, model_info_classes(model))
    return time.perf_counter() - t


def model_info_classes(model):
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.out_features


def test_loaded_model_is_fresh_and_frozen():
    a, b = zoo.load_model("resnet_digits"), zoo.load_model("resnet_digits")
    assert a is not b
    assert all(not p.requires_grad for p in a.parameters())
    # inputs can still require grad (what gradient/LRP methods need)
    x = zoo.load_dataset("digits").images[:2].clone().requires_grad_()
    a(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES))
def test_dataset_shapes_labels_and_normalisation(name):
    sizes, shape, n_classes = EXPECTED_SHAPES[name]
    for split, n in sizes.items():
        ds = zoo.load_dataset(name, split)
        assert ds.images.shape == (n, *shape) and ds.images.dtype == torch.float32
        assert ds.raw_images.shape == ds.images.shape
        assert ds.labels.shape == (n,) and ds.labels.dtype == torch.long
        assert len(ds.class_names) == n_classes
        assert int(ds.labels.min()) >= 0 and int(ds.labels.max()) == n_classes - 1
        assert float(ds.raw_images.min()) >= 0.0 and float(ds.raw_images.max()) <= 1.0
        torch.testing.assert_close(ds.normalize(ds.raw_images), ds.images)
        torch.testing.assert_close(ds.denormalize(ds.images), ds.raw_images)
        img, lab = ds[0]
        assert img.shape == shape and lab.ndim == 0
    train = zoo.load_dataset(name, "train")
    # the recorded constants are the train split's raw pixel statistics
    assert abs(float(train.raw_images.mean()) - train.mean) < 1e-3
    assert abs(float(train.raw_images.std()) - train.std) < 1e-3


def test_splits_are_disjoint_stratified_and_deterministic():
    for name in ("digits", "faces"):
        tr, te, al = (zoo.load_dataset(name, s) for s in ("train", "test", "all"))
        assert len(tr) + len(te) == len(al)
        # every image of the union appears exactly once
        both = torch.cat([tr.raw_images, te.raw_images]).flatten(1)
        assert torch.unique(both, dim=0).shape[0] == torch.unique(al.raw_images.flatten(1), dim=0).shape[0]
        counts = torch.bincount(te.labels).float()
        assert counts.max() - counts.min() <= 2
        again = zoo.load_dataset(name, "test")
        assert torch.equal(again.labels, te.labels) and torch.equal(again.images, te.images)


def test_faces_and_xray_label_conventions():
    faces = zoo.load_dataset("faces", "all")
    assert faces.class_names == ["non-face", "face"]
    assert faces.labels[:100].eq(1).all() and faces.labels[100:].eq(0).all()
    xray = zoo.load_dataset("chest_xray", "all")
    assert xray.class_names == ["normal", "pneumonia"]
    assert torch.bincount(xray.labels).tolist() == [8, 8]
    for f, y in zip(xray.info["files"], xray.labels.tolist()):
        assert y == (0 if f.startswith("NORMAL") else 1)
    assert "pneumonia_model_package" not in sys.modules  # read as files, never imported


@pytest.mark.parametrize(
    "call, bad, good",
    [
        (zoo.load_model, "resnet_digit", "resnet_digits"),
        (zoo.model_info, "vit-digits", "vit_digits"),
        (zoo.load_dataset, "digit", "digits"),
        (zoo.load_dataset, "chest-xray", "chest_xray"),
    ],
)
def test_unknown_names_give_helpful_errors(call, bad, good):
    with pytest.raises(ValueError) as e:
        call(bad)
    msg = str(e.value)
    assert bad in msg and f"Did you mean {good!r}" in msg and "Available:" in msg


def test_unknown_split_is_helpful():
    with pytest.raises(ValueError, match="Did you mean 'test'"):
        zoo.load_dataset("digits", "tset")


def test_zoo_import_is_light():
    code = (
        "import sys, relprop.zoo, relprop.zoo.text; "
        "bad = [m for m in ('transformers', 'sklearn', 'skimage', 'PIL') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- text (real MiniLM)


@pytest.fixture(scope="module")
def minilm():
    from relprop.zoo.text import load_minilm

    return load_minilm()  # must work offline; fails (not skips) if the package is missing


def test_minilm_is_found_in_the_installed_package():
    from relprop.zoo.text import minilm_path

    p = minilm_path()
    assert (p / "model.safetensors").exists() and (p / "tokenizer.json").exists()


def test_sentence_similarity_offline(minilm, monkeypatch):
    from relprop.zoo.text import SentenceSimilarity, sentence_similarity

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = minilm
    assert type(model).__name__ == "BertModel" and not model.training
    a, b = "A man is playing a guitar.", "Someone plays an instrument."
    assert sentence_similarity(a, a, model, tok) == pytest.approx(1.0, abs=1e-5)
    s_ab = sentence_similarity(a, b, model, tok)
    s_far = sentence_similarity(a, "The stock market fell sharply today.", model, tok)
    assert 0.3 < s_ab < 0.99 and s_far < s_ab

    sim = SentenceSimilarity.from_sentence(model, tok, a)
    enc = tok([a, b], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = sim(enc["input_ids"], enc["attention_mask"])
    assert out.shape == (2,)
    assert float(out[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(out[1]) == pytest.approx(s_ab, abs=1e-5)

    # the embedding path (what attribution methods differentiate) gives the same value and a gradient
    emb = sim.embed(enc["input_ids"]).requires_grad_()
    out2 = sim(attention_mask=enc["attention_mask"], inputs_embeds=emb)
    torch.testing.assert_close(out2.detach(), out, atol=1e-5, rtol=0)
    out2[1].backward()
    assert emb.grad[1].abs().sum() > 0 and emb.grad[0].abs().sum() == 0


def test_token_attribution_example(minilm):
    from relprop.zoo.text import token_attribution_example

    model, tok = minilm
    tokens, scores, s = token_attribution_example(
        "Someone plays an instrument.", "A man is playing a guitar.", model, tok
    )
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and len(tokens) == scores.shape[0]
    assert 0.3 < s < 0.99 and torch.isfinite(scores).all()
