"""The report written through :class:`relprop.report.store.Output`: a local folder or any fsspec URL
(``memory://``, ``file://`` here), with the same files, the same numbers, atomic writes and the cache
reused by the next run; bad URLs get one line."""

import io
import json
import sys
import uuid

import pytest
import torch
from torch import nn

from cli_helpers import one_line_error
from relprop.report import Settings, run_compare
from relprop.report.compare import Job
from relprop.report.store import Output
from relprop.specs import SpecError

fsspec = pytest.importorskip("fsspec")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")
pytest.importorskip("matplotlib")

SETTINGS = dict(
    samples=6,
    grid=3,
    sensitivity_samples=3,
    randomisation_samples=5,
    randomisation_layers=1,
    regions=4,
    steps=4,
    bootstrap=50,
    batch_size=3,
)
FILES = ("results.json", "index.html", "examples.parquet")


def quiet(_):
    pass


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    x = torch.rand(9, 3, 8, 8)
    y = torch.tensor([0, 1, 2] * 3)
    return {"net": net}, (x, y)


def compare(case, out, **kw):
    models, data = case
    return run_compare(models, data, ["gradient"], out, Settings(**SETTINGS), progress=False, log=quiet, **kw)


def numbers(res: dict) -> list:
    """Every number of the cells but the times (which are measured)."""
    skip = ("seconds", "metric_seconds", "explain_seconds_per_sample", "reused", "explain_seconds")
    out = []
    for m in res["models"]:
        for c in m["methods"]:
            assert c["status"] == "ok", c
            summ = {k: v for k, v in c["summary"].items() if k not in skip}
            out.append([m["accuracy"], summ, c["curves"], {k: v for k, v in c.items() if k in ("abpc", "deletion")}])
    return out


def table(read) -> list[dict]:
    rows = pq.read_table(pa.BufferReader(read("examples.parquet"))).to_pylist()
    return [{k: v for k, v in r.items() if k != "explain_seconds"} for r in rows]


def memory_url() -> str:
    return f"memory://relprop-test-{uuid.uuid4().hex[:8]}/report"


def test_memory_and_file_urls_get_the_local_report(case, tmp_path):
    """The same files with the same numbers in a folder, at memory:// and at file://."""
    local = compare(case, tmp_path / "local")
    url = memory_url()
    remote = compare(case, url)
    assert numbers(remote) == numbers(local)
    fs, root = fsspec.core.url_to_fs(url)
    for name in FILES + (local["models"][0]["grid_figure"], local["models"][0]["curves_figure"]):
        assert fs.exists(f"{root}/{name}"), name
        assert (tmp_path / "local" / name).exists(), name
    assert json.loads(fs.cat_file(f"{root}/results.json"))["models"][0]["methods"][0]["abpc"] == pytest.approx(
        local["models"][0]["methods"][0]["abpc"], abs=0
    )
    assert table(lambda n: fs.cat_file(f"{root}/{n}")) == table(lambda n: (tmp_path / "local" / n).read_bytes())
    assert b"Ranking of models" in fs.cat_file(f"{root}/index.html")
    assert fs.ls(f"{root}/cache")  # the finished cells, for the next run
    # file:// is the local folder (with its atomic rename), not a second code path
    furl = (tmp_path / "viafile").as_uri()
    assert Output(furl).local == tmp_path / "viafile"
    via = compare(case, furl)
    assert numbers(via) == numbers(local)
    assert all((tmp_path / "viafile" / n).exists() for n in FILES)
    assert not list((tmp_path / "viafile").rglob("*.tmp*"))  # no temporary file left behind


def test_a_url_report_resumes_from_its_own_cache(case, monkeypatch):
    """The second run at the same URL reuses every cell (no cell is computed) and gives the same numbers;
    a cache file made unreadable at the URL is recomputed with a warning, never trusted."""
    url = memory_url()
    first = compare(case, url)

    def boom(*a, **k):
        raise AssertionError("a cached cell must not be computed again")

    with monkeypatch.context() as mp:
        mp.setattr(Job, "compute_cell", boom)
        again = compare(case, url)
    assert all(c["reused"] for m in again["models"] for c in m["methods"])
    assert numbers(again) == numbers(first)
    fs, root = fsspec.core.url_to_fs(url)
    cells = [p for p in fs.ls(f"{root}/cache", detail=False) if p.endswith(".pt")]
    assert len(cells) == 1
    fs.pipe_file(cells[0], b"not a torch file")
    third = compare(case, url)
    assert not any(c["reused"] for m in third["models"] for c in m["methods"])
    assert any("is unreadable" in w for w in third["warnings"])
    assert numbers(third) == numbers(first)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_failed_write_leaves_no_file(where, tmp_path):
    """A writer that fails half way leaves neither the file nor a temporary one (a reader never sees half)."""
    out = Output(tmp_path / "o" if where == "local" else memory_url())
    out.write_text("a/keep.json", "{}")

    def half(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        out.write("a/b.json", half)
    assert not out.exists("a/b.json")
    assert out.listdir("a") == ["keep.json"]
    with pytest.raises(OSError):
        out.write("a/keep.json", half)
    assert out.read_bytes("a/keep.json") == b"{}"  # the old file is whole
    # the temporary name keeps the suffix: np.save and savefig pick the format from it
    out.write("t.npy", lambda tmp: __import__("numpy").save(tmp, __import__("numpy").arange(3)))
    assert __import__("numpy").load(io.BytesIO(out.read_bytes("t.npy"))).tolist() == [0, 1, 2]


def test_saved_attributions_go_to_the_url(case, tmp_path):
    """--save-attributions at a URL: the file the local run writes, at the name results.json gives."""
    models, data = case
    got = {}
    for where in (str(tmp_path / "local"), memory_url()):
        s = Settings(**SETTINGS, save_attributions="pt")
        res = run_compare(models, data, ["gradient"], where, s, progress=False, log=quiet, use_cache=False)
        name = res["models"][0]["methods"][0]["attributions_file"]
        assert name.startswith("attributions/") and name.endswith(".pt")
        got[where] = torch.load(io.BytesIO(Output(where).read_bytes(name)), weights_only=True)
    a, b = got.values()
    assert a.shape == (6, 3, 8, 8) and a.abs().sum() > 0 and torch.equal(a, b)


def test_unknown_protocol_is_one_line(case, capsys):
    with pytest.raises(SpecError, match="unknown protocol 'nosuchfs'") as ei:
        compare(case, "nosuchfs://x/report")
    assert "\n" not in str(ei.value)
    line = one_line_error(capsys, ["compare", "--models", "zoo:resnet_digits", "--out", "nosuchfs://x/r"])
    assert "--out nosuchfs://x/r: unknown protocol 'nosuchfs'" in line


def test_the_python_api_refuses_a_file_as_folder_and_a_bad_seed_before_any_work(case, tmp_path):
    """run_compare checks what the CLI checks, before a model runs (they failed at the end, or in NumPy)."""
    (tmp_path / "report.html").write_text("mine")
    with pytest.raises(SpecError, match=r"^out .*report\.html is a file; the report is a folder"):
        compare(case, tmp_path / "report.html")
    assert (tmp_path / "report.html").read_text() == "mine"
    models, data = case
    with pytest.raises(SpecError, match=r"^seed must be between 0 and 2\*\*32 - 1, got -1$"):
        run_compare(models, data, ["gradient"], tmp_path / "r", Settings(seed=-1), progress=False, log=quiet)
    assert not (tmp_path / "r").exists()


def test_missing_protocol_package_and_missing_fsspec_name_the_install(monkeypatch):
    from fsspec.registry import known_implementations, register_implementation

    register_implementation(
        "relpropmissing", "relprop_no_such_package.FS", errtxt="Install relprop_no_such_package to access it"
    )
    try:
        with pytest.raises(SpecError, match="Install relprop_no_such_package") as ei:
            Output("relpropmissing://bucket/report")
        assert "\n" not in str(ei.value)
    finally:
        known_implementations.pop("relpropmissing", None)
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if not installed
    with pytest.raises(SpecError, match=r"needs fsspec: pip install '\.\[report\]'"):
        Output("memory://x")
    assert Output("plain/folder").local is not None  # a local path never needs fsspec


def test_cache_key_holds_the_resolved_device_and_dtype(case, tmp_path, monkeypatch):
    """``--device auto`` is keyed as what it resolves to: the same cells as ``cpu`` on a CPU machine, other
    cells once it resolves to cuda; the dtype is keyed as resolved too (``bf16`` is ``bfloat16``)."""
    from relprop.report import MethodSpec
    from relprop.specs.adapters import to_data, to_models

    models, data = case
    model = to_models(models)[0]
    m = MethodSpec.parse("gradient")

    def keys(**s):
        job = Job(tmp_path, to_data(data), [m], Settings(**SETTINGS, **s), progress=False, log=quiet)
        return job.cell_key(model, m, {}), job._placement()

    cpu, auto, bf16, bfloat16 = keys(device="cpu"), keys(device="auto"), keys(dtype="bf16"), keys(dtype="bfloat16")
    assert auto == cpu and auto[1]["device"] == "cpu"
    assert bf16 == bfloat16 and bf16[0] != cpu[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = keys(device="auto")
    assert on_gpu[1]["device"].startswith("cuda") and on_gpu[0] != cpu[0]


@pytest.mark.slow
def test_ray_engine_writes_its_report_to_a_url(tmp_path):
    """``--engine ray`` with ``--out`` at a URL (memory://: the driver's own process writes the report; the
    workers' shards go to a folder every worker reaches): the local engine's report, number for number."""
    pytest.importorskip("ray")
    from relprop.specs import load_data

    data = load_data("zoo:digits")
    s = dict(samples=4, grid=2, sensitivity_samples=2, randomisation_samples=5, randomisation_layers=1)
    s |= dict(regions=4, steps=4, batch_size=2, bootstrap=50)
    kw = dict(progress=False, use_cache=False, command="test", log=quiet)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: the condition for identical numbers
    try:
        local = run_compare(["zoo:resnet_digits"], data, ["gradient"], tmp_path / "local", Settings(**s), **kw)
    finally:
        torch.set_num_threads(torch_threads)
    url = memory_url()
    ray_opts = {"workers": 1, "shards": str(tmp_path / "shards")}
    res = run_compare(
        ["zoo:resnet_digits"], data, ["gradient"], url, Settings(**s), engine="ray", ray_options=ray_opts, **kw
    )
    assert res["engine"]["name"] == "ray" and res["status"] == "complete", res["problems"]
    assert numbers(res) == numbers(local)
    out = Output(url)
    assert all(out.exists(n) for n in FILES)
    assert table(out.read_bytes) == table(lambda n: (tmp_path / "local" / n).read_bytes())
