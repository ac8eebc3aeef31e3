"""``relprop compare --engine ray`` on a local 2-worker Ray instance (started here, shut down after): the
same results.json numbers and per-example rows as the single-process engine, a worker killed mid-run
recovered with nothing lost, and a re-run that skips the finished shards (shards at a ``file://`` URL);
text data (padded to the single-process engine's length), and data and model files the workers cannot
reach: the instance runs its workers in an empty working directory (``runtime_env``), and the image folder,
the CSV, the Hugging Face folder, the checkpoint, the ``python:`` file and its weights are given by relative
paths from the test's own directory, so a worker that opened one of them would fail.

Compared: every value of results.json except timings (``seconds``, ``metric_seconds``, ``explain_seconds``,
``explain_seconds_per_sample``), ``created``, ``environment``, ``engine`` and ``reused``. Tolerance: none,
the numbers are equal as floats, when the single-process run uses the workers' torch thread count (one);
with another thread count the stated tolerance (README) is 1e-6 relative.
"""

import contextlib
import json
import math
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from relprop.report import Settings, run_compare  # noqa: E402
from relprop.report.distributed import CRASH_ENV, RayEngine, RayOptions, read_shard, shard_folder  # noqa: E402
from relprop.report.store import Output  # noqa: E402
from relprop.specs import SpecError, load_data, parse_methods  # noqa: E402

pytestmark = pytest.mark.slow

# DenseNet: its CPU kernels round a perturbed copy's score by its place in the forward pass, which gave
# ~1e-8 differences while the metrics mixed the copies of several batches (tests/test_sharding.py)
MODELS = ["zoo:resnet_digits", "zoo:densenet_digits"]
# batch 4, 8 samples: 2 shards per cell; the grid, class-sensitivity and randomisation examples span both;
# insertion starts from noise (drawn per example: the same draws in a shard as in the whole batch)
SETTINGS = dict(
    samples=8, grid=6, sensitivity_samples=6, randomisation_samples=5, randomisation_layers=2,
    regions=8, steps=8, batch_size=4, bootstrap=200, insertion_baseline="noise",
)  # fmt: skip
TIMING = {"seconds", "created", "metric_seconds", "explain_seconds_per_sample", "explain_seconds"}
SKIP = TIMING | {"environment", "engine", "reused"}


def _strip(o):
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k not in SKIP}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o


def _numbers(out) -> dict:
    return _strip(json.loads((out / "results.json").read_text()))


def _close(x, y, rel: float) -> bool:
    """Every number of ``y`` within ``rel`` (relative) of ``x``'s at the same place; everything else equal."""
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_close(x[k], y[k], rel) for k in x)
    if isinstance(x, list):
        return isinstance(y, list) and len(x) == len(y) and all(_close(a, b, rel) for a, b in zip(x, y))
    if isinstance(x, float) and isinstance(y, float):
        return math.isclose(x, y, rel_tol=rel, abs_tol=1e-12)
    return x == y


@contextlib.contextmanager
def _threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _rows(out) -> list[dict]:
    rows = pq.read_table(out / "examples.parquet").to_pylist()
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def data():
    return load_data("zoo:digits")


@pytest.fixture(scope="module")
def methods():
    return parse_methods("lrp,gradient", [])


def _run(data, methods, out, models=MODELS, log=lambda _: None, **kw):
    return run_compare(
        models, data, methods, out, Settings(**SETTINGS), progress=False, use_cache=False, command="test",
        log=log, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def local(tmp_path_factory, data, methods):
    out = tmp_path_factory.mktemp("local")
    with _threads(1):  # the workers' thread count (cpus_per_worker): the condition for identical numbers
        _run(data, methods, out)
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A quiet local instance of 2 CPUs (one per worker), shut down after the module. Its workers run in an
    empty working directory: relative data paths of the driver do not exist there (another node's view)."""
    mp = pytest.MonkeyPatch()  # the process's environment as it was after the module
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    empty = tmp_path_factory.mktemp("worker_cwd")
    # "local": a new instance, never a cluster another process left on record (/tmp/ray/ray_current_cluster)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"working_dir": str(empty)})  # fmt: skip
    yield
    ray.shutdown()
    mp.undo()


def test_ray_engine_gives_the_single_process_numbers(local, cluster, tmp_path, data, methods):
    res = _run(data, methods, tmp_path, engine="ray", ray_options={"workers": 2})
    assert res["status"] == "complete" and res["engine"]["name"] == "ray", res["problems"]
    assert res["engine"]["shards_computed"] == 2 * 2 * 2 and res["engine"]["shards_reused"] == 0
    assert _numbers(tmp_path) == _numbers(local)
    assert _rows(tmp_path) == _rows(local)
    # the per-shard tables are in the examples.parquet schema, read together as one data set
    import pyarrow.dataset as ds

    files = sorted(str(p) for p in (tmp_path / "shards").rglob("*.parquet"))
    assert len(files) == 8 and ds.dataset(files).to_table().num_rows == 2 * 2 * 8


def test_another_thread_count_agrees_within_the_stated_tolerance(local, tmp_path, data, methods):
    """With two torch threads instead of the workers' one, CPU kernels may split reductions differently
    (on the zoo default: gradients in the sanity checks, 2e-7 relative): within 1e-6 (README)."""
    with _threads(2):
        _run(data, methods, tmp_path)
    assert _close(_numbers(local), _numbers(tmp_path), 1e-6)


def test_killed_worker_loses_nothing(local, cluster, tmp_path, data, methods, monkeypatch):
    marker = tmp_path / "killed.txt"
    monkeypatch.setenv(CRASH_ENV, str(marker))  # the first shard's worker os._exit()s once
    out = tmp_path / "r"
    res = _run(data, methods, out, engine="ray", ray_options={"workers": 2})
    assert marker.exists(), "the test hook did not kill a worker"
    assert res["status"] == "complete" and not res["problems"]
    assert (res["engine"]["shards_computed"], res["engine"]["shards_retried"]) == (8, 1)  # the lost one ran again
    assert _numbers(out) == _numbers(local)


def test_rerun_resumes_from_finished_shards(local, cluster, tmp_path, data, methods):
    pytest.importorskip("fsspec")
    opts = {"workers": 2, "shards": (tmp_path / "elsewhere").as_uri()}  # file:///...: any fsspec URL
    first = _run(data, methods, tmp_path / "r", engine="ray", ray_options=opts)
    assert first["engine"]["shards_computed"] == 8, (first["engine"], first["problems"], list(tmp_path.rglob("*")))
    assert not (tmp_path / "r" / "shards").exists()
    tables = sorted((tmp_path / "elsewhere").rglob("*.parquet"))
    tables[0].unlink()  # as if Ctrl-C came before this shard finished
    tables[1].write_bytes(tables[1].read_bytes()[:100])  # a torn file is not trusted
    res = _run(data, methods, tmp_path / "r", engine="ray", ray_options=opts)
    assert not res["problems"], res["problems"]
    assert (res["engine"]["shards_computed"], res["engine"]["shards_reused"]) == (2, 6)
    assert _numbers(tmp_path / "r") == _numbers(local)
    assert all(read_shard(p.parent, int(p.stem), p.parent.name.rsplit("__", 1)[1], 4) for p in tables)


def test_interrupt_lists_every_model(local, cluster, tmp_path, data, methods, monkeypatch):
    """Ctrl-C (simulated) while the second model's cells run on Ray, after every shard of its first method
    finished: both models are listed, the first complete, the second with that cell (equal to the
    single-process engine's) and marked incomplete; it used to be left out with no cell."""
    run, calls = RayEngine._run, []

    def interrupted(self, model, plan, bounds, todo, *rest):
        calls.append(model.spec)
        if len(calls) == 1:
            return run(self, model, plan, bounds, todo, *rest)
        run(self, model, plan, bounds, [t for t in todo if t[0] == methods[0].label], *rest)
        raise KeyboardInterrupt

    monkeypatch.setattr(RayEngine, "_run", interrupted)
    said: list[str] = []
    res = _run(data, methods, tmp_path, engine="ray", ray_options={"workers": 2}, log=said.append)
    assert res["status"] == "interrupted" and [m["spec"] for m in res["models"]] == MODELS
    first, second = res["models"]
    assert first.get("interrupted") is None and len(first["methods"]) == 2
    assert second["interrupted"] == {"cells_done": 1, "cells_total": 2}
    assert [c["method"] for c in second["methods"]] == [methods[0].label]
    cell, alone = _numbers(tmp_path)["models"][1]["methods"][0], _numbers(local)["models"][1]["methods"][0]
    assert {**cell, "best": None} == {**alone, "best": None}  # "best": among the model's finished methods
    assert next(r for r in res["ranking"] if r["model"] == MODELS[1])["interrupted"]["cells_done"] == 1
    name = res["models"][1]["name"]  # the finished cell is said on the terminal like every other one
    assert any(s.startswith(f"  {name} × {methods[0].label}: ") and s.endswith("(finished)") for s in said), said


def test_runs_whose_numbers_would_depend_on_shards_are_refused(data):
    with pytest.raises(SpecError, match="multiple of --batch-size"):
        RayEngine(data, [], Settings(batch_size=4), "unused", options=RayOptions(shard_size=6))
    with pytest.raises(SpecError, match="memory:// file system lives in one process"):
        RayEngine(data, [], Settings(), "unused", options=RayOptions(shards="memory://shards"))


def test_local_folders_reach_workers_as_absolute_paths(tmp_path, monkeypatch):
    """Workers on a cluster joined with --address run in their own working folders: a relative --out or
    --shards would be written there, and the driver would find no shard (a new user's finding)."""
    monkeypatch.chdir(tmp_path)
    out = Output("rel_out")
    assert out.where() == str(tmp_path / "rel_out")
    assert shard_folder(out, None) == str(tmp_path / "rel_out" / "shards")
    assert shard_folder(out, "rel_shards/") == str(tmp_path / "rel_shards")
    assert shard_folder(out, "file:///x/shards/") == "/x/shards"


@pytest.mark.parametrize("env", [None, "10.0.0.1:6379"])
def test_without_address_a_new_local_instance_or_ray_address(data, monkeypatch, env):
    """No --address: a new local instance (address "local"), so a cluster a past `ray start` left on record is
    never joined by accident (it failed: "num_cpus ... must not be provided"); RAY_ADDRESS (a Ray job) is joined."""
    import ray

    calls = []

    def init(**kw):
        calls.append(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    probed = []  # --address is probed first (relprop.specs.address, tested there): recorded, not connected
    monkeypatch.setattr("relprop.specs.address.check_ray_address", probed.append)
    before = dict(os.environ)
    with pytest.raises(RuntimeError, match="stop here"):
        RayEngine(data, [], Settings(), "unused", options=RayOptions(workers=2))
    assert calls[0]["address"] == (env or "local")
    assert ("num_cpus" in calls[0]) == (env is None)
    assert probed == ([] if env is None else [env])
    assert dict(os.environ) == before  # no process-wide state: the driver's environment is left as it was


def test_the_shard_folder_is_one_output(data, monkeypatch, tmp_path):
    """RayEngine checks the --shards URL through the Output that names the folder (it built a second one)."""
    import relprop.report.distributed as dist

    built = []

    class Counted(Output):
        def __init__(self, where, flag="--out"):
            built.append((str(where), flag))
            super().__init__(where, flag)

    monkeypatch.setattr(dist, "Output", Counted)
    url = (tmp_path / "s").as_uri()
    with pytest.raises(SpecError, match="memory:// file system lives in one process"):
        RayEngine(data, [], Settings(), tmp_path / "out", options=RayOptions(shards="memory://shards"))
    assert [w for w, flag in built if flag == "--shards"] == ["memory://shards"], built
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: (_ for _ in ()).throw(RuntimeError("stop here")))
    built.clear()
    with pytest.raises(RuntimeError, match="stop here"):
        RayEngine(data, [], Settings(), tmp_path / "out", options=RayOptions(shards=url))
    assert [w for w, flag in built if flag == "--shards"] == [url], built
    assert dist.shard_output(Output(tmp_path / "out"), url)[1] == str(tmp_path / "s")


# ------------------------------------------------------------------------------------ text, unreachable data
TEXTS = [  # one text far longer than the rest: the shard without it would pad shorter on its own
    ("a good film", "positive"), ("bad plot", "negative"), ("good", "positive"), ("a bad film", "negative"),
    ("film plot good a good film good plot a film good good a plot", "positive"), ("bad", "negative"),
    ("good plot film", "positive"), ("a bad bad plot", "negative"),
]  # fmt: skip


def _text_data(tmp_path, monkeypatch):
    """A tiny BERT folder and a CSV, both by relative paths (the workers get the model's files shipped)."""
    from test_cli_user_paths import tiny_bert

    tiny_bert(tmp_path / "bert")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reviews.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in TEXTS))
    data = load_data("reviews.csv")
    return "hf:bert", data


def test_text_data_gives_the_single_process_numbers_and_resumes(cluster, tmp_path, monkeypatch, methods):
    pytest.importorskip("transformers")
    model, data = _text_data(tmp_path, monkeypatch)
    with _threads(1):
        _run(data, methods, tmp_path / "local", models=[model])
    res = _run(data, methods, tmp_path / "ray", models=[model], engine="ray", ray_options={"workers": 2})
    assert res["status"] == "complete" and not res["problems"], res["problems"]
    assert (res["engine"]["shards_computed"], res["engine"]["shards_reused"]) == (4, 0)
    local = _numbers(tmp_path / "local")
    assert _numbers(tmp_path / "ray") == local
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")
    cell = local["models"][0]["methods"][0]
    assert (
        cell["n_samples"] == 8
        and cell["class_sensitivity"] is not None
        and cell["randomisation_similarity"] is not None
    )
    # resume: one shard lost; the other three are read back, the numbers stay
    tables = sorted((tmp_path / "ray" / "shards").rglob("*.parquet"))
    tables[-1].unlink()
    again = _run(data, methods, tmp_path / "ray", models=[model], engine="ray", ray_options={"workers": 2})
    assert (again["engine"]["shards_computed"], again["engine"]["shards_reused"]) == (1, 3), again["problems"]
    assert _numbers(tmp_path / "ray") == local


def test_the_padding_of_the_whole_run_matters(tmp_path, monkeypatch):
    """Why the driver hands its padding length to the shards: padded to its own batch's longest, a text's
    explanation differs in its bits from the one padded to the longest of all the samples."""
    pytest.importorskip("transformers")
    import torch

    import relprop
    from relprop.specs import load_model, text_batch

    model, _ = _text_data(tmp_path, monkeypatch)
    m = load_model(model)
    texts = [t for t, _ in TEXTS]
    whole = text_batch(m, texts)
    own = text_batch(m, texts[:4])
    assert own["input_ids"].shape[1] < whole["input_ids"].shape[1]
    with _threads(1):
        a_whole = relprop.explain(m.module, {k: v[:4] for k, v in whole.items()}, target=0, method="lrp")
        a_own = relprop.explain(m.module, own, target=0, method="lrp")
    n = own["input_ids"].shape[1]
    assert not torch.equal(a_whole.attributions["input_ids"][:, :n], a_own.attributions["input_ids"])


def test_image_files_the_workers_cannot_see(cluster, tmp_path, monkeypatch, methods):
    """An image folder given by a relative path (the workers run elsewhere): the driver ships each shard's
    PNG bytes and the workers decode them as the single-process engine decodes the files."""
    from PIL import Image

    digits = load_data("zoo:digits")
    for i in range(12):
        c = int(digits.labels[i])
        (tmp_path / "imgs" / str(c)).mkdir(parents=True, exist_ok=True)
        a = (digits.images[i][0].numpy() * 255).round().astype("uint8")
        Image.fromarray(a, "L").save(tmp_path / "imgs" / str(c) / f"{i:02d}.png")
    monkeypatch.chdir(tmp_path)
    data = load_data("imgs")
    with _threads(1):
        _run(data, methods, tmp_path / "local", models=MODELS[:1])
    res = _run(data, methods, tmp_path / "ray", models=MODELS[:1], engine="ray", ray_options={"workers": 2})
    assert res["status"] == "complete" and not res["problems"], res["problems"]
    assert res["engine"]["shards_computed"] == 4
    assert _numbers(tmp_path / "ray") == _numbers(tmp_path / "local")
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")


def shipped_equals_local(data, methods, tmp_path, **kw) -> dict:
    """Run ``kw``'s models single-process and on the 2-worker cluster (which ships what they need): the same
    results.json numbers and rows, the workers' copies removed; then the first model with ``ship_models=False``,
    whose result (the workers' own failure) the caller checks."""
    import tempfile

    with _threads(1):
        _run(data, methods, tmp_path / "local", **kw)
    copies = set(Path(tempfile.gettempdir()).glob("relprop-model-*"))
    res = _run(data, methods, tmp_path / "ray", engine="ray", ray_options={"workers": 2}, **kw)
    assert res["status"] == "complete" and not res["problems"], res["problems"]
    assert res["engine"]["shards_computed"] == 2 * 2 * 2
    assert _numbers(tmp_path / "ray") == _numbers(tmp_path / "local")
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")
    assert set(Path(tempfile.gettempdir()).glob("relprop-model-*")) <= copies  # the workers removed theirs
    return _run(data, methods, tmp_path / "shared", engine="ray", ray_options={"workers": 2, "ship_models": False},
                **dict(kw, models=kw["models"][:1]))  # fmt: skip


def test_model_files_the_workers_cannot_see(cluster, tmp_path, monkeypatch, data, methods):
    """A zoo-format checkpoint (``.safetensors`` + its ``.json``) and a ``python:`` file with ``--weights``,
    by relative paths: the driver ships their bytes, each worker loads them with the same loader from a
    private temporary folder (removed after), and the numbers are the single-process engine's. With
    ``ship_models=False`` (files on shared storage) the workers open the paths as given, and here fail;
    past ``model_bytes`` the model's cells fail on the driver, naming the file and the limit."""
    import shutil

    import torch
    from torch import nn

    from relprop import zoo

    for ext in ("safetensors", "json"):
        shutil.copy(zoo.WEIGHTS_DIR / f"resnet_digits.{ext}", tmp_path / f"rd.{ext}")
    (tmp_path / "net.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 10))\n"
    )
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 10))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    models = ["rd.safetensors", "python:net.py:build"]
    kw = dict(models=models, weights={"python:net.py:build": "w.pt"})
    shared = shipped_equals_local(data, methods, tmp_path, **kw)
    assert shared["status"] == "incomplete" and "model file not found: rd.safetensors" in shared["problems"][0]
    small = _run(data, methods, tmp_path / "small", engine="ray", ray_options={"workers": 2, "model_bytes": 1000},
                 **dict(kw, models=models[:1]))  # fmt: skip
    assert small["engine"]["shards_computed"] == 0 and len(small["problems"]) == 2
    assert all("over the limit of 1000 bytes" in p for p in small["problems"]), small["problems"]
