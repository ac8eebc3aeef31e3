"""Streamed data sources (:mod:`relprop.specs.sources`): every format gives the same numbers as the plain
in-memory computation, nothing is decoded before it is needed, memory is bounded by the batch, and
``--limit``/``--subset`` choose the examples (and key the cache).

Each test writes its data itself: real zoo digits (32 x 32 grayscale, ten classes) saved as an image
folder, a CSV/JSONL of image paths, a Parquet table of PNG bytes, a saved Hugging Face dataset and
WebDataset tar shards (png, npy and pickled members); texts as CSV/JSONL/Parquet/saved dataset/tar.
"""

import csv
import gc
import io
import json
import pickle
import tarfile
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from relprop.specs import SpecError, load_data, read_image
from relprop.specs import sources as sources_mod

PER_CLASS = 4  # 40 images: more than the batch sizes used below


@pytest.fixture(scope="module")
def digits():
    """40 digits as uint8 arrays (H, W) and their labels, in folder order (class, then file name)."""
    from relprop import zoo

    ds = zoo.load_dataset("digits")
    arrays, labels = [], []
    for c in range(10):
        for i in torch.nonzero(ds.labels == c).reshape(-1)[:PER_CLASS].tolist():
            arrays.append((ds.raw_images[i, 0].numpy() * 255).round().astype(np.uint8))
            labels.append(c)
    return arrays, labels


def png_bytes(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, "PNG")
    return buf.getvalue()


def npy_bytes(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, digits):
    """The plain reference: DIR/CLASS/k.png."""
    root = tmp_path_factory.mktemp("folder") / "digits"
    arrays, labels = digits
    for n, (a, c) in enumerate(zip(arrays, labels)):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        (root / str(c) / f"{n:03d}.png").write_bytes(png_bytes(a))
    return root


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, b in members:
            info = tarfile.TarInfo(name)
            info.size = len(b)
            tf.addfile(info, io.BytesIO(b))
    return path


def tar_shards(root: Path, digits, encode=lambda a: ("png", png_bytes(a)), shards: int = 3) -> Path:
    """The digits as WebDataset shards ``root/shard-00K.tar`` (round-robin blocks), ``.cls`` labels."""
    arrays, labels = digits
    root.mkdir(parents=True, exist_ok=True)
    per = -(-len(arrays) // shards)
    for s in range(shards):
        members = []
        for n in range(s * per, min(len(arrays), (s + 1) * per)):
            ext, b = encode(arrays[n])
            members += [(f"d/{n:05d}.{ext}", b), (f"d/{n:05d}.cls", f"{labels[n]}\n".encode())]
        write_tar(root / f"shard-{s:03d}.tar", members)
    return root


def images_of(data) -> list[torch.Tensor]:
    return [data.images[i] for i in range(len(data))]


def assert_same_images(data, ref):
    assert len(data) == len(ref)
    assert torch.equal(data.labels, ref.labels)
    assert data.class_names == ref.class_names
    for a, b in zip(images_of(data), images_of(ref)):
        assert a.dtype == b.dtype and torch.equal(a, b)


# ------------------------------------------------------------------------------------ same numbers
def test_folder_reads_what_read_image_reads(folder, digits):
    data = load_data(str(folder))
    files = sorted(folder.rglob("*.png"))
    assert data.class_names == [str(c) for c in range(10)]
    assert data.labels.tolist() == digits[1]
    for i, f in enumerate(files):  # the plain computation: every file decoded on its own
        assert torch.equal(data.images[i], read_image(f))
    assert torch.equal(data.images[-1], read_image(files[-1])) and len(data.images[2:5]) == 3
    with pytest.raises(IndexError):
        data.images[len(data)]


def test_every_image_format_gives_the_same_inputs_and_labels(tmp_path, folder, digits):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    ref = load_data(str(folder))
    arrays, labels = digits
    files = [str(f.relative_to(folder.parent)) for f in sorted(folder.rglob("*.png"))]
    # CSV / JSONL of image paths (relative to the table's folder), integer labels
    with open(folder.parent / "images.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label"])
        w.writerows(zip(files, labels))
    (folder.parent / "images.jsonl").write_text(
        "".join(json.dumps({"label": c, "image": f}) + "\n" for f, c in zip(files, labels))
    )
    # Parquet: PNG bytes, small row groups (the reader goes from group to group)
    table = pa.table({"image": [png_bytes(a) for a in arrays], "label": labels})
    pq.write_table(table, tmp_path / "digits.parquet", row_group_size=7)
    # a saved Hugging Face dataset (Image feature, ClassLabel) and a DatasetDict with a test split
    feats = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(c) for c in range(10)])}
    )
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes(a), "path": None} for a in arrays], "label": labels}, features=feats
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "hfdict"))
    # WebDataset shards: png members, npy members (the same uint8 arrays)
    tar_shards(tmp_path / "tars", digits)
    tar_shards(tmp_path / "npys", digits, encode=lambda a: ("npy", npy_bytes(a)))
    specs = [
        str(folder.parent / "images.csv"),
        str(folder.parent / "images.jsonl"),
        str(tmp_path / "digits.parquet"),
        str(tmp_path / "hf"),
        str(tmp_path / "hfdict"),
        str(tmp_path / "tars"),  # a folder of shards
        str(tmp_path / "tars" / "shard-{000..002}.tar"),  # brace expansion
        str(tmp_path / "npys"),
    ]
    for spec in specs:
        data = load_data(spec)
        assert data.kind == "image", spec
        assert isinstance(data.images, sources_mod.Lazy), spec
        assert_same_images(data, ref)
        shipped = pickle.loads(pickle.dumps(data))  # the Ray engine ships the data to its workers
        assert torch.equal(shipped.images[len(data) - 1], ref.images[len(data) - 1]), spec
    assert load_data(str(tmp_path / "hfdict")).info["split"] == "test"  # results.json names the split it used
    assert load_data(str(tmp_path / "hf")).info["split"] is None
    with pytest.raises(SpecError, match=r"^shard not found: file:///nowhere/x\.tar$"):
        load_data("file:///nowhere/x.tar")
    one = load_data(str(tmp_path / "tars" / "shard-001.tar"))  # one shard: its own examples only
    per = -(-len(arrays) // 3)
    assert one.labels.tolist() == labels[per : 2 * per]


def text_rows():
    """Texts that are hard to index by line: quotes, commas, a newline inside a field, non-ASCII."""
    texts = ['a "good" film', "bad, very bad", "two\nlines", "naïve plot ☺", "", "  padded  ", "ok"]
    labels = ["positive", "negative", "Positive", "negative", "neutral", "neutral", "positive"]
    return texts, labels


def test_every_text_format_gives_the_same_texts_and_labels(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    texts, labels = text_rows()
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text", "label"])
        w.writerows((k, t, lab) for k, (t, lab) in enumerate(zip(texts, labels)))
    # the plain computation: the whole CSV read at once by csv.DictReader
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["text"] for r in rows] == texts
    ref = load_data(str(tmp_path / "t.csv"))
    assert ref.kind == "text" and [ref.texts[i] for i in range(len(ref))] == texts
    assert ref.class_names == ["negative", "neutral", "positive"]  # "Positive" is "positive" (one class)
    assert ref.labels.tolist() == [2, 0, 2, 0, 1, 1, 2]
    (tmp_path / "t.jsonl").write_text(
        "\n\n".join(json.dumps({"text": t, "label": lab}) for t, lab in zip(texts, labels)) + "\n"
    )
    pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / "t.parquet", row_group_size=3)
    datasets.Dataset.from_dict({"text": texts, "label": labels}).save_to_disk(str(tmp_path / "hf"))
    members = []
    for k, (t, lab) in enumerate(zip(texts, labels)):
        members += [(f"{k:03d}.txt", t.encode()), (f"{k:03d}.json", json.dumps({"label": lab}).encode())]
    write_tar(tmp_path / "t.tar", members)
    for spec in ("t.jsonl", "t.parquet", "hf", "t.tar"):
        data = load_data(str(tmp_path / spec))
        assert data.kind == "text" and isinstance(data.texts, sources_mod.Lazy), spec
        assert [data.texts[i] for i in range(len(data))] == texts, spec
        assert torch.equal(data.labels, ref.labels) and data.class_names == ref.class_names, spec


def test_saved_dataset_class_label_names_every_class_in_its_order(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["z", "a", "unused"])}
    )
    datasets.Dataset.from_dict({"text": ["x", "y"], "label": [1, 0]}, features=feats).save_to_disk(str(tmp_path / "hf"))
    data = load_data(str(tmp_path / "hf"))
    assert data.class_names == ["z", "a", "unused"] and data.labels.tolist() == [1, 0]


# ------------------------------------------------------------------------------------ laziness and memory
class Decodes:
    """Counts decodes, and how many decoded images are alive at once (weak references)."""

    def __init__(self, monkeypatch):
        self.count = self.alive = self.peak = 0
        real = sources_mod.decode_image

        def counting(*a, **k):
            t = real(*a, **k)
            self.count += 1
            self.alive += 1
            self.peak = max(self.peak, self.alive)
            weakref.finalize(t, self._freed)
            return t

        monkeypatch.setattr(sources_mod, "decode_image", counting)

    def _freed(self):
        self.alive -= 1


def test_loading_and_hashing_decode_nothing(monkeypatch, folder, tmp_path, digits):
    seen = Decodes(monkeypatch)
    data = load_data(str(folder))
    tar = load_data(str(tar_shards(tmp_path / "tars", digits)))
    fp = data.fingerprint()
    tar.fingerprint()
    assert seen.count == 0  # labels, class names and the cache key come from the stored bytes
    data.images[3]
    data.images[3]
    assert seen.count == 2  # no cache: asked twice, read twice
    assert load_data(str(folder)).fingerprint() == fp
    shipped = pickle.loads(pickle.dumps(data))  # to Ray workers: with its key, nothing is read again to hash

    def no_reading(self, i):
        raise AssertionError("read again")

    monkeypatch.setattr(sources_mod.Images, "raw", no_reading)
    assert shipped.fingerprint() == fp


def test_accuracy_pass_holds_a_batch_not_the_dataset(monkeypatch, folder):
    from relprop.report import compare
    from relprop.specs import image_batch, load_model

    model = load_model("zoo:resnet_digits")
    data = load_data(str(folder))
    # the plain computation: every image in memory, one forward pass
    x, _ = image_batch(model, [read_image(f) for f in sorted(folder.rglob("*.png"))])
    with torch.no_grad():
        pred = model.module(x).argmax(-1)
    plain = int((pred == data.labels).sum()) / len(data)
    seen = Decodes(monkeypatch)
    monkeypatch.setattr(compare, "ACCURACY_BATCH", 6)
    job = compare.Job(tmp_path_for(folder), data, [], compare.Settings(samples=2, grid=1), use_cache=False)
    gc.collect()
    res = job.accuracy(model)
    assert res["accuracy"] == plain and res["n"] == len(data) == 40
    assert seen.count == len(data)  # each image read once in the pass
    assert seen.peak <= 2 * 6 < len(data)  # the batch being used and the one being read, never all 40


def tmp_path_for(folder: Path) -> Path:
    return folder.parent / "out"


def test_batches_with_worker_processes_give_the_same_items(folder):
    data = load_data(str(folder), loader_workers=2)
    got = list(sources_mod.batches(data, range(len(data)), 16))
    assert [len(i) for i, _ in got] == [16, 16, 8]
    flat = [t for _, items in got for t in items]
    assert all(torch.equal(a, read_image(f)) for a, f in zip(flat, sorted(folder.rglob("*.png"))))
    zoo = load_data("zoo:digits")  # in memory: indices only, the caller indexes its tensors
    assert all(items is None for _, items in sources_mod.batches(zoo, range(10), 4))


def test_accuracy_with_loader_workers_equals_in_process(monkeypatch, folder):
    from relprop.report import compare
    from relprop.specs import load_model

    model = load_model("zoo:resnet_digits")
    monkeypatch.setattr(compare, "ACCURACY_BATCH", 16)
    got = []
    for workers in (0, 2):
        data = load_data(str(folder), loader_workers=workers)
        job = compare.Job(tmp_path_for(folder), data, [], compare.Settings(samples=2, grid=1), use_cache=False)
        got.append((job.accuracy(model)["accuracy"], job.prepare(model, list(range(len(data)))).pred.tolist()))
    assert got[0] == got[1]


def test_fingerprint_follows_the_stored_bytes(tmp_path, digits):
    arrays, labels = digits
    root = tmp_path / "d"
    for n, (a, c) in enumerate(zip(arrays[:8], labels[:8])):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        (root / str(c) / f"{n}.png").write_bytes(png_bytes(a))
    before = load_data(str(root)).fingerprint()
    f = sorted(root.rglob("*.png"))[5]
    b = arrays[5].copy()
    b[0, 0] ^= 1  # one pixel, one bit
    f.write_bytes(png_bytes(b))
    assert load_data(str(root)).fingerprint() != before
    f.write_bytes(png_bytes(arrays[5]))
    assert load_data(str(root)).fingerprint() == before


# ------------------------------------------------------------------------------------ --limit / --subset
def test_limit_and_subset_choose_examples(folder):
    full = load_data(str(folder))
    first = full.select(limit=7)
    assert len(first) == 7 and torch.equal(first.labels, full.labels[:7])
    assert all(torch.equal(first.images[i], full.images[i]) for i in range(7))
    sub = full.select(subset=9, seed=3)
    chosen = sub.images.indices
    assert len(sub) == 9 and chosen == sorted(chosen) and len(set(chosen)) == 9
    assert torch.equal(sub.labels, full.labels[chosen])
    assert all(torch.equal(sub.images[k], full.images[i]) for k, i in enumerate(chosen))
    assert full.select(subset=9, seed=3).images.indices == chosen  # seeded
    assert full.select(subset=9, seed=4).images.indices != chosen
    both = full.select(limit=10, subset=4, seed=0)
    assert len(both) == 4 and max(both.images.indices) < 10
    assert sub.select(subset=9, seed=3) is sub  # applied once (Job applies the settings again)
    fps = {full.fingerprint(), first.fingerprint(), sub.fingerprint(), both.fingerprint()}
    assert len(fps) == 4
    assert full.select() is full and full.select(limit=1000).labels.shape[0] == 40
    assert full.warnings == [] and sub.warnings == [] and both.warnings == []
    whole = full.select(limit=10, subset=12, seed=3)  # nothing to draw: all 10, with a warning (once)
    assert len(whole) == 10 and whole.select(limit=10, subset=12, seed=3) is whole
    assert whole.warnings == ["--subset 12 is more than the 10 examples left by --limit 10: all 10 are used"]
    assert full.select(subset=41).warnings == ["--subset 41 is more than the 40 examples: all 40 are used"]
    assert full.select(subset=40).warnings == []  # all of them, as asked
    # The Python path (a Job selecting by its Settings) keeps the selection's warning for the report.
    from relprop.report import compare

    job = compare.Job(tmp_path_for(folder), full, [], compare.Settings(samples=2, grid=1, subset=41), use_cache=False)
    assert job.warnings == ["--subset 41 is more than the 40 examples: all 40 are used"]
    assert full.select(limit=50).warnings[-1] == "--limit 50 is more than the 40 examples: all 40 are used"
    assert not [w for w in full.select(limit=40).warnings if "--limit" in w]
    with pytest.raises(SpecError, match="--limit"):
        full.select(limit=0)
    zoo = load_data("zoo:digits", subset=5, seed=1)  # in-memory tensors are indexed
    assert zoo.images.shape[0] == zoo.model_ready.shape[0] == len(zoo) == 5


def test_compare_limit_subset_in_settings_results_and_cache_key(tmp_path, folder, capsys):
    from relprop.cli import main

    fast = ["--samples", "3", "--grid", "1", "--sensitivity-samples", "0", "--randomisation-samples", "0",
            "--regions", "4", "--steps", "4", "--quiet", "--bootstrap", "10"]  # fmt: skip
    out = tmp_path / "r"
    base = ["compare", "--models", "zoo:resnet_digits", "--methods", "gradient", "--data", str(folder),
            "--out", str(out), *fast]  # fmt: skip

    def run(*extra):
        assert main([*base, *extra]) == 0, capsys.readouterr().err
        res = json.loads((out / "results.json").read_text())
        return res, res["models"][0]["methods"][0]

    res, cell = run("--subset", "12", "--seed", "1")
    assert res["settings"]["subset"] == 12 and res["settings"]["limit"] is None
    assert res["data"]["n"] == 12 == res["models"][0]["n_eval"] and res["data"]["selected_from"] == 40
    assert res["data"]["selection"] == {"limit": None, "subset": 12, "seed": 1} and res["data"]["split"] is None
    chosen = load_data(str(folder)).select(subset=12, seed=1).images.indices
    assert res["data"]["selected_indices"] == chosen and len(chosen) == 12
    assert run("--subset", "12", "--seed", "1")[1]["reused"] is True
    assert run("--subset", "11", "--seed", "1")[1]["reused"] is False  # in the key
    res, cell = run("--limit", "10", "--data-workers", "1")
    assert res["data"]["n"] == 10 and res["settings"]["limit"] == 10 and cell["reused"] is False
    assert "Settings of this run" in (out / "index.html").read_text()
    assert main([*base, "--limit", "0"]) == 2 and "--limit must be at least 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ pickles in shards
def test_pickled_shard_members_need_trust_pickle(tmp_path, digits):
    arrays, _ = digits
    ref = load_data(str(tar_shards(tmp_path / "npy", digits, encode=lambda a: ("npy", npy_bytes(a)), shards=1)))
    pyd = tar_shards(tmp_path / "pyd", digits, encode=lambda a: ("pyd", pickle.dumps(a)), shards=1)
    with pytest.raises(SpecError, match="pickle.*--trust-pickle"):
        load_data(str(pyd))
    assert_same_images(load_data(str(pyd), trust_pickle=True), ref)
    # a plain tensor in .pt loads with weights_only (no code runs), (C, H, W) as torch stores it
    pt = tar_shards(
        tmp_path / "pt", digits, encode=lambda a: ("pt", _torch_bytes(torch.from_numpy(a)[None].clone())), shards=1
    )
    assert_same_images(load_data(str(pt)), ref)
    # a .pt that needs more than weights_only is refused at load time, not mid-run
    obj = tar_shards(tmp_path / "obj", digits, encode=lambda a: ("pt", _torch_bytes(Holder(a))), shards=1)
    with pytest.raises(SpecError, match="--trust-pickle"):
        load_data(str(obj))
    # a png next to a pickle: the png is read, no flag needed
    both = tmp_path / "both.tar"
    write_tar(both, [("k.png", png_bytes(arrays[0])), ("k.pyd", pickle.dumps(arrays[0])), ("k.cls", b"0")])
    assert torch.equal(load_data(str(both)).images[0], ref.images[0])


class Holder:
    def __init__(self, a):
        self.a = a


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ errors
def test_source_errors_are_one_line_and_name_the_fix(tmp_path, monkeypatch, digits):
    import gzip
    import sys

    arrays, _ = digits
    tar = write_tar(tmp_path / "a.tar", [("k.png", png_bytes(arrays[0]))])
    with pytest.raises(SpecError, match=r"k has no label \(a .cls member"):
        load_data(str(tar))
    (tmp_path / "b.tar").write_bytes(gzip.compress(tar.read_bytes()))
    with pytest.raises(SpecError, match="compressed.*gunzip"):
        load_data(str(tmp_path / "b.tar"))
    with pytest.raises(SpecError, match="shard not found"):
        load_data(str(tmp_path / "s-{000..002}.tar"))
    with pytest.raises(SpecError, match="data not found"):  # braces are a shard pattern only
        load_data(str(tmp_path / "t-{0..2}.csv"))
    (tmp_path / "t.csv").write_text("txt,label\nhello,1\n")
    with pytest.raises(SpecError, match="no column 'text'.*--text-column"):
        load_data(str(tmp_path / "t.csv"))
    (tmp_path / "short.csv").write_text("text,label\nhello,1\nworld\n")
    with pytest.raises(SpecError, match="row 2 has 1 fields"):
        load_data(str(tmp_path / "short.csv"))
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"], "label": [0]})}).save_to_disk(
        str(tmp_path / "hf")
    )
    with pytest.raises(SpecError, match="no split 'test' \\(splits: train\\).*--split"):
        load_data(str(tmp_path / "hf"))
    assert load_data(str(tmp_path / "hf"), split="train").texts[0] == "a"
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(SpecError, match=r"pip install '\.\[data\]' from your relprop clone"):
        load_data(str(tmp_path / "hf"))


def test_16_bit_note_at_load_time_without_decoding_8_bit_images(tmp_path, monkeypatch, digits):
    from PIL import Image

    arrays, _ = digits
    root = tmp_path / "d"
    (root / "1").mkdir(parents=True)
    Image.fromarray(arrays[0]).save(root / "1" / "a.png")  # 8-bit: not decoded at load
    Image.fromarray(arrays[1].astype(np.uint16) * 16).save(root / "1" / "b.png")  # 12-bit values, no sBIT
    seen = Decodes(monkeypatch)
    data = load_data(str(root))
    assert seen.count == 1 and any("16-bit" in w and "1 of 2 images" in w for w in data.warnings)


def test_npy_integers_wider_than_8_bits_are_refused_or_noted_at_load_time(tmp_path, digits):
    arrays, _ = digits
    cls = [("k0.cls", b"1\n")]
    # NumPy's default integer holding 8-bit values: dividing by the int64 range would make it black
    wide = write_tar(tmp_path / "int.tar", [("k0.npy", npy_bytes(arrays[0].astype(np.int64)))] + cls)
    with pytest.raises(SpecError, match=r"^cannot read image int\.tar:k0\.npy: an int64 array with values in \[0, "):
        load_data(str(wide))
    for dtype in (np.int32, np.uint64):
        a = arrays[0].astype(dtype) * (np.iinfo(dtype).max // 255)  # fills its type's range: scaled by it
        ok = load_data(str(write_tar(tmp_path / "full.tar", [("k0.npy", npy_bytes(a))] + cls)))
        assert torch.allclose(ok.images[0], torch.from_numpy(arrays[0][None] / 255.0).float(), atol=1e-6)
    # 16-bit arrays with 12-bit values: scaled by 65535 as before, with the 16-bit note at load time
    deep = write_tar(tmp_path / "deep.tar", [("k0.npy", npy_bytes(arrays[0].astype(np.uint16) * 16))] + cls)
    data = load_data(str(deep))
    assert any("1 of 1 images" in w and "16-bit range" in w for w in data.warnings)
    assert torch.allclose(data.images[0], torch.from_numpy(arrays[0][None] * 16.0 / 65535.0).float())
    assert load_data(str(tar_shards(tmp_path / "u8", digits, lambda a: ("npy", npy_bytes(a))))).warnings == []


def test_npy_probe_reads_the_header_not_the_member(tmp_path, monkeypatch):
    """The load-time probe of a ``.npy`` tar member reads its header in place: a 16 MiB member is not read
    (the whole member used to be read to see the header), and a wide-integer one is still found and noted."""
    import tracemalloc

    big = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)  # 16 MiB, float: nothing to note
    deep = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 256) * 16  # 12-bit values in uint16: noted
    path = write_tar(
        tmp_path / "big.tar",
        [("k0.npy", npy_bytes(big)), ("k0.cls", b"1"), ("k1.npy", npy_bytes(deep)), ("k1.cls", b"0")],
    )
    read = []
    cell = sources_mod._TarCells.cell
    monkeypatch.setattr(sources_mod._TarCells, "cell", lambda self, i: read.append(i) or cell(self, i))
    tracemalloc.start()
    try:
        data = load_data(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert read == [1], read  # only the member whose header asks for a check is read whole
    assert peak < big.nbytes / 8, peak
    assert any("1 of 2 images" in w and "16-bit range" in w for w in data.warnings), data.warnings
    assert torch.equal(data.images[0], torch.from_numpy(big)[None])  # and reading it still gives the array
    # a member cut short is still named at load time (the header probe cannot decode it: the decoder says why)
    cut = write_tar(tmp_path / "cut.tar", [("k0.npy", npy_bytes(big)[:100]), ("k0.cls", b"1")])
    with pytest.raises(SpecError, match=r"cut\.tar:k0\.npy"):
        load_data(str(cut))


def test_a_missing_image_column_is_named_with_its_option(tmp_path, digits):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "d.parquet"
    pd.DataFrame({"image": [png_bytes(digits[0][0])], "label": [1]}).to_parquet(path)
    with pytest.raises(
        SpecError, match=r"no column 'img' \(columns: image, label\)\..*Choose one with --image-column$"
    ):
        load_data(str(path), image_column="img")
    with pytest.raises(SpecError, match=r"no column 'txt' .*--text-column \(texts\)"):
        load_data(str(path), text_column="txt", image_column="img")


def test_float_npy_errors_name_nan_and_the_member_once(tmp_path, digits):
    x = digits[0][0] / 255.0
    y = x.copy()
    y[3, 3] = np.nan
    members = [("k0.npy", npy_bytes(x)), ("k0.cls", b"1"), ("k1.npy", npy_bytes(y)), ("k1.cls", b"1")]
    data = load_data(str(write_tar(tmp_path / "nan.tar", members)))
    with pytest.raises(SpecError, match=r"^cannot read image nan\.tar:k1\.npy: .*NaN values \(1 of 1024\)"):
        data.images[1]
    # every member (1, H, W): the first one is named at load time (the compare preflight read a later one)
    chw = [m for n in range(6) for m in ((f"k{n}.npy", npy_bytes(x[None])), (f"k{n}.cls", b"1"))]
    with pytest.raises(
        SpecError, match=r"^cannot read image chw\.tar:k0\.npy: an array of shape \(1, 32, 32\).*transpose"
    ):
        load_data(str(write_tar(tmp_path / "chw.tar", chw)))


# ------------------------------------------------------------------------------------ other processes
def test_shipped_items_decode_to_the_same_inputs_where_the_source_is_gone(tmp_path, digits):
    """What the Ray engine sends its workers (:func:`detach` + :func:`pack_items`): the data without paths
    or readers, and each shard's stored items read where the source is; decoded by the same decoder they
    equal the items read from the source, after the source is moved away (a worker on another node)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    arrays, labels = digits
    src = tmp_path / "src"
    for n, (a, c) in enumerate(zip(arrays[:12], labels[:12])):
        (src / "folder" / str(c)).mkdir(parents=True, exist_ok=True)
        (src / "folder" / str(c) / f"{n:03d}.png").write_bytes(png_bytes(a))
    pq.write_table(pa.table({"image": [png_bytes(a) for a in arrays], "label": labels}), src / "d.parquet",
                   row_group_size=7)  # fmt: skip
    tar_shards(src / "npys", digits, encode=lambda a: ("npy", npy_bytes(a)))
    tar_shards(src / "pts", digits, encode=lambda a: ("pt", _torch_bytes(torch.from_numpy(a)[None].clone())))
    texts, tlabels = text_rows()
    (src / "t.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in zip(texts, tlabels))
    )
    specs = ["folder", "d.parquet", "npys", "pts", "t.jsonl"]
    loaded = {spec: load_data(str(src / spec)) for spec in specs}
    loaded["subset"] = load_data(str(src / "d.parquet"), subset=9, seed=3)  # a lazy view (Take) ships too
    sent = {}
    for name, data in loaded.items():
        seq = data.texts if data.kind == "text" else data.images
        assert isinstance(seq, sources_mod.Lazy), name
        ref = [seq[i] for i in range(len(data))]
        some = list(range(0, len(data), 2))
        shipped = sources_mod.detach(data)
        assert shipped.fingerprint() == data.fingerprint() and torch.equal(shipped.labels, data.labels)
        sent[name] = (ref, some, pickle.dumps(shipped), pickle.dumps(sources_mod.pack_items(data, some)))
    src.rename(tmp_path / "gone")
    for name, (ref, some, shipped_b, items_b) in sent.items():
        data = pickle.loads(shipped_b)
        with pytest.raises(SpecError, match="not shipped"):
            (data.texts if data.kind == "text" else data.images)[0]
        sources_mod.hold_items(data, pickle.loads(items_b))
        seq = data.texts if data.kind == "text" else data.images
        for i in some:
            got = seq[i]
            assert got == ref[i] if isinstance(got, str) else torch.equal(got, ref[i]), (name, i)
        if len(ref) > 1:
            with pytest.raises(SpecError, match="not shipped"):
                seq[1]
    memory = load_data("zoo:digits")  # in-memory data travels whole: nothing to pack
    assert sources_mod.detach(memory) is memory and sources_mod.pack_items(memory, [0, 1]) is None


def test_int8_npy_members_are_scaled_by_127_and_negatives_refused_at_load_time(tmp_path, digits):
    """int8 members: scaled by their type's maximum (127) as every signed type (they were divided by 255);
    negative values (uint8 pixels cast to int8 wrap above 127) are refused when the data is loaded, naming
    the member, not at the first batch."""
    arrays, _ = digits
    cls = [("k0.cls", b"1\n")]
    half = (arrays[0] // 2).astype(np.int8)  # 0-127
    half[0, 0] = 127
    ok = load_data(str(write_tar(tmp_path / "i8.tar", [("k0.npy", npy_bytes(half))] + cls)))
    assert torch.allclose(ok.images[0], torch.from_numpy(half[None] / 127.0).float(), atol=1e-6)
    wrapped = arrays[0].astype(np.int8)
    assert wrapped.min() < 0
    bad = write_tar(tmp_path / "neg.tar", [("k0.npy", npy_bytes(wrapped))] + cls)
    with pytest.raises(SpecError, match=r"^cannot read image neg\.tar:k0\.npy: negative pixel values \(an int8 "):
        load_data(str(bad))
