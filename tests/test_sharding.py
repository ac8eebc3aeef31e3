"""What ``relprop compare --engine ray`` relies on to give the single-process numbers, checked without Ray:
an example's metric values depend only on its own explain batch (not on the examples of other batches),
the ``noise`` baseline draws each example's noise from (seed, example index), and a shard written through
fsspec reads back (or is refused when torn or foreign).
"""

import pytest
import torch

from relprop.metrics.baselines import example_seeds, noise, resolve
from relprop.report import Settings, cell_metrics


def test_noise_is_drawn_per_example_and_an_int_seed_keeps_its_draws():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 6, 6, generator=g)
    seeds = example_seeds(0, [7, 3, 11, 2, 5])
    whole = noise(x, seeds)
    for i in range(5):  # a row's noise does not depend on the batch around it
        assert torch.equal(noise(x[i : i + 1], seeds[i : i + 1]), whole[i : i + 1])
    assert example_seeds(0, [7, 3]) == seeds[:2] and len(set(seeds)) == 5
    assert example_seeds(1, [7])[0] != seeds[0]  # the run seed matters
    # the library's int seed: one generator for the batch, as before (the draws a user's results depend on)
    xf = x.reshape(5, -1)
    z = torch.randn(xf.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float()
    expected = xf.mean(1, keepdim=True) + xf.std(1, keepdim=True) * z
    assert torch.equal(resolve("noise", x, seed=4)[1].value, expected)
    with pytest.raises(ValueError, match="2 seeds for a batch of 5"):
        noise(x, seeds[:2])


@pytest.mark.parametrize("baseline", ["black", "noise"])
def test_perturbation_metrics_of_a_batch_do_not_depend_on_other_batches(baseline):
    """DenseNet's CPU kernels round a copy's score differently by its place in the forward pass (~1e-8):
    evaluating all copies of 8 examples together gave other ABPC values for the second batch of 4 than
    evaluating that batch alone. Each batch's copies are now evaluated apart, so the halves equal the whole."""
    from relprop import zoo
    from relprop.specs import load_data

    x = load_data("zoo:digits").model_ready[:8]
    model = zoo.load_model("densenet_digits").eval()
    attr = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = model(x).argmax(1)
    s = Settings(batch_size=4, regions=8, steps=8, baseline=baseline, insertion_baseline=baseline)
    examples = [40, 2, 17, 9, 33, 5, 21, 60]
    rows: dict = {}
    whole = cell_metrics.image_perturbation(model, x, attr, target, s, rows=rows, examples=examples)
    halves, half_rows = [], []
    for a in (0, 4):
        r: dict = {}
        part = slice(a, a + 4)
        halves.append(cell_metrics.image_perturbation(model, x[part], attr[part], target[part], s, rows=r,
                                                      examples=examples[part]))  # fmt: skip
        half_rows.append(r)
    for k, v in whole["per_example"].items():
        assert v == halves[0]["per_example"][k] + halves[1]["per_example"][k], k
    for k, v in rows.items():
        assert torch.equal(v, torch.cat([half_rows[0][k], half_rows[1][k]])), k
    if baseline == "noise":  # the noise follows the example, not its place: another order, other values
        s2 = cell_metrics.image_perturbation(model, x[:4], attr[:4], target[:4], s, examples=[1, 2, 3, 4])
        assert s2["per_example"]["abpc"] != halves[0]["per_example"]["abpc"]


def test_shards_through_fsspec_read_back_and_torn_or_foreign_ones_are_refused():
    pytest.importorskip("fsspec")
    pytest.importorskip("pyarrow")
    import fsspec

    from relprop.report.distributed import read_shard, write_shard

    url = "memory://relprop-test-shards/cell"
    rows = [{"run": "r", "model": "m", "method": "lrp", "example": i, "abpc": 0.5 + i} for i in range(3)]
    extra = {"rows": {"morf": torch.arange(6.0).reshape(3, 2)}, "n": 3}
    write_shard(url, 0, "KEY", rows, extra)
    table, side = read_shard(url, 0, "KEY", 3)
    assert table.column("abpc").to_pylist() == [0.5, 1.5, 2.5] and table.column("example").to_pylist() == [0, 1, 2]
    assert torch.equal(side["rows"]["morf"], extra["rows"]["morf"]) and side["key"] == "KEY"
    assert read_shard(url, 0, "OTHER", 3) is None  # another cell's key
    assert read_shard(url, 0, "KEY", 4) is None  # short
    assert read_shard(url, 1, "KEY", 3) is None  # absent
    fs = fsspec.filesystem("memory")
    path = "/relprop-test-shards/cell/00000.parquet"
    fs.pipe_file(path, fs.cat_file(path)[:50])  # torn
    assert read_shard(url, 0, "KEY", 3) is None
    fs.rm("/relprop-test-shards", recursive=True)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_shard_padded_to_the_run_length_tokenizes_as_the_whole_run(tmp_path, side):
    """The Ray engine's shards pad their texts to the length the single-process engine pads all samples to
    (``text_batch(pad_to=)``): the same ids and mask as the rows of the whole run, for either padding side,
    whatever the shard's own longest text."""
    pytest.importorskip("transformers")
    from relprop.specs import load_model, text_batch
    from test_cli_user_paths import tiny_bert

    model = load_model(f"hf:{tiny_bert(tmp_path / 'bert')}")
    model.tokenizer.padding_side = side
    texts = ["good", "a bad film", "film plot good a good film good plot a film", "bad plot", "a", "good film"]
    whole = text_batch(model, texts)
    for a in (0, 3):
        own = text_batch(model, texts[a : a + 3])
        padded = text_batch(model, texts[a : a + 3], pad_to=whole["input_ids"].shape[1])
        for k in ("input_ids", "attention_mask"):
            assert torch.equal(padded[k], whole[k][a : a + 3]), (side, a, k)
    assert own["input_ids"].shape[1] < whole["input_ids"].shape[1]  # the second shard alone pads shorter


def test_texts_longer_than_the_model_takes_are_truncated_to_its_positions(tmp_path):
    """A model with fewer positions than text_batch's max_length (here 32 < 128) used to fail on a long row
    with torch's "expanded size" error; the texts are truncated to what the model takes, as to max_length."""
    pytest.importorskip("transformers")
    from relprop.specs import check_forward, load_model, text_batch
    from test_cli_user_paths import tiny_bert

    model = load_model(f"hf:{tiny_bert(tmp_path / 'bert')}")
    long = " ".join(["good film"] * 40)  # 80 words
    batch = text_batch(model, [long, "bad"])
    assert batch["input_ids"].shape[1] == 32
    assert check_forward(model, batch).shape == (2, 2)
    short = text_batch(model, ["a good film", "bad"])
    assert short["input_ids"].shape[1] == 5  # [CLS] a good film [SEP]: short texts untouched
