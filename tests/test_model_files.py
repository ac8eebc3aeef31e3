"""Model files shipped to another machine (``--engine ray``): the loader notes the files a spec names
(``info["model_files"]``), the driver reads their bytes (bounded), and ``placed`` lets the same loader run
on copies in a private temporary folder. Each kind is loaded again after the originals are moved away, and
must give the same weights (bytes), classes, name and preprocessing as the first load; the folder is gone
after the block. The Ray engine end to end: tests/test_ray_engine.py."""

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from relprop import zoo
from relprop.specs import SpecError, load_model
from relprop.specs.hashing import state_hash
from relprop.specs.loaders import model_path, placed, read_model_files


def _same(a, b) -> None:
    assert state_hash(a.module) == state_hash(b.module)
    assert (a.spec, a.name, a.kind, a.class_names) == (b.spec, b.name, b.kind, b.class_names)
    assert (a.preprocess.describe() if a.preprocess else None) == (b.preprocess.describe() if b.preprocess else None)


def _reload_elsewhere(tmp_path, spec: str, moved: list[str], **kw):
    """Load ``spec``, ship its files, move ``moved`` away, load it again from the shipped copies."""
    first = load_model(spec, **kw)
    bundle = read_model_files(first.info["model_files"])
    for name in moved:
        shutil.move(tmp_path / name, tmp_path / "gone" / name)
    with pytest.raises(SpecError):
        load_model(spec, **kw)  # the originals are gone: the copies must be what the second load reads
    with placed(bundle):
        where = model_path(moved[0])
        assert where.exists() and not str(where).startswith(str(tmp_path))
        again = load_model(spec, **kw)
    assert not where.exists(), "the temporary copies are removed after the block"
    _same(first, again)
    return first, again


@pytest.fixture
def here(tmp_path, monkeypatch):
    (tmp_path / "gone").mkdir()
    monkeypatch.chdir(tmp_path)  # specs by relative paths, as a user gives them
    return tmp_path


def test_a_checkpoint_and_its_json(here):
    for ext in ("safetensors", "json"):
        shutil.copy(zoo.WEIGHTS_DIR / f"resnet_digits.{ext}", here / f"rd.{ext}")
    first, again = _reload_elsewhere(here, "rd.safetensors", ["rd.safetensors", "rd.json"])
    assert set(first.info["model_files"]) == {"rd.safetensors", "rd.json"}
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(first.module(x), again.module(x))


def test_a_python_file_with_weights_and_classes(here):
    (here / "net.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 4))\n"
    )
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 4))
    torch.save(net.state_dict(), here / "w.pt")
    (here / "classes.txt").write_text("a\nb\nc\nd\n")
    kw = dict(weights="w.pt", classes_file="classes.txt")
    first, _ = _reload_elsewhere(here, "python:net.py:build", ["net.py", "w.pt", "classes.txt"], **kw)
    assert set(first.info["model_files"]) == {"net.py", "w.pt", "classes.txt"}
    assert first.class_names == ["a", "b", "c", "d"]
    assert state_hash(first.module) == state_hash(net)


def test_a_link_keeps_the_name_it_was_given(here):
    """A Hugging Face cache names its files by hash and links to them: the copy bears the linked name."""
    for ext in ("safetensors", "json"):
        shutil.copy(zoo.WEIGHTS_DIR / f"resnet_digits.{ext}", here / f"blob-{ext}")
        (here / f"rd.{ext}").symlink_to(here / f"blob-{ext}")
    _reload_elsewhere(here, "rd.safetensors", ["rd.safetensors", "rd.json", "blob-safetensors", "blob-json"])


@pytest.mark.filterwarnings("ignore::relprop.specs.errors.TrustPickleWarning")
def test_a_trusted_whole_pickle(here):
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), here / "whole.pt")
    _reload_elsewhere(here, "whole.pt", ["whole.pt"], trust_pickle=True)
    # weights_only stays the stance on the copies: without --trust-pickle the copy is refused as well
    bundle = read_model_files(load_model(str(here / "gone" / "whole.pt"), trust_pickle=True).info["model_files"])
    with placed(bundle), pytest.raises(SpecError, match="trust-pickle"):
        load_model(str(here / "gone" / "whole.pt"))


def test_a_hugging_face_folder(here):
    pytest.importorskip("transformers")
    from test_cli_user_paths import tiny_bert

    tiny_bert(here / "bert")
    for other in ("tf_model.h5", "flax_model.msgpack", "onnx/model.onnx", ".git/HEAD"):  # no loader here reads them
        (here / "bert" / other).parent.mkdir(exist_ok=True)
        (here / "bert" / other).write_bytes(b"\0" * 64)
    shipped = read_model_files({"bert": str(here / "bert")})["entries"][0]["files"]
    assert (
        "config.json" in shipped
        and "vocab.txt" in shipped
        and not any(n.endswith((".h5", ".msgpack", ".onnx")) or n.startswith(".") for n in shipped)
    )
    first, again = _reload_elsewhere(here, "hf:bert", ["bert"])
    assert set(first.info["model_files"]) == {"bert"}
    enc = first.tokenizer(["a good film"], return_tensors="pt")
    assert torch.equal(enc["input_ids"], again.tokenizer(["a good film"], return_tensors="pt")["input_ids"])
    assert torch.equal(first.module(enc["input_ids"]), again.module(enc["input_ids"]))


def test_zoo_models_need_no_files():
    assert load_model("zoo:resnet_digits").info["model_files"] == {}


def test_too_large_or_gone_is_one_clear_error(here):
    (here / "w.pt").write_bytes(b"x" * 2048)
    (here / "small.txt").write_bytes(b"y")
    paths = {"small.txt": str(here / "small.txt"), "w.pt": str(here / "w.pt")}
    with pytest.raises(SpecError, match=r"model file .*w\.pt takes the model's files to 2\.0 KiB, over the limit of 1\.0 "
                       r"KiB .*--model-files shared"):  # fmt: skip
        read_model_files(paths, limit=1024)  # it said "0 MiB, over the limit of 0 MiB"
    with pytest.raises(SpecError, match=r"to 2049 bytes, over the limit of 2000 bytes"):
        read_model_files(paths, limit=2000)
    assert read_model_files(paths, limit=4096)["bytes"] == 2049
    (here / "w.pt").unlink()
    with pytest.raises(SpecError, match=r"w\.pt is gone"):
        read_model_files(paths)


def test_the_cli_passes_the_model_file_options(monkeypatch, tmp_path):
    import relprop.report
    from relprop.cli import main

    got: dict = {}

    def stopped(*a, **k):
        got.update(k["ray_options"])
        return {"status": "interrupted", "models": [], "cells_done": 0, "cells_total": 1, "seconds": 0.0,
                "ranking": [], "warnings": []}  # fmt: skip

    monkeypatch.setattr(relprop.report, "run_compare", stopped)
    argv = ["compare", "--models", "zoo:resnet_digits", "--methods", "saliency", "--samples", "2", "--limit", "8"]
    main([*argv, "--out", str(tmp_path / "r"), "--engine", "ray"])
    assert (got["ship_models"], got["model_bytes"]) == (True, 4096 << 20)
    main(
        [*argv, "--out", str(tmp_path / "r"), "--engine", "ray", "--model-files", "shared", "--model-files-limit", "5"]
    )
    assert (got["ship_models"], got["model_bytes"]) == (False, 5 << 20)


def test_what_the_ray_engine_ships(here):
    """Nothing for a zoo model, with ``ship_models=False``, or for a user's own model that the loader holds
    in memory (its files may be gone by then); a clear error past the bound."""
    from relprop.report.distributed import RayOptions, _Loader, model_bundle

    for ext in ("safetensors", "json"):
        shutil.copy(zoo.WEIGHTS_DIR / f"resnet_digits.{ext}", here / f"rd.{ext}")
    m = load_model("rd.safetensors")
    got = model_bundle(m, _Loader(), RayOptions())
    assert got is not None and {e["key"] for e in got["entries"]} == {"rd.safetensors", "rd.json"}
    assert got["bytes"] == sum((here / f"rd.{ext}").stat().st_size for ext in ("safetensors", "json"))
    assert model_bundle(m, _Loader(), RayOptions(ship_models=False)) is None
    assert model_bundle(m, _Loader(in_memory=frozenset({"rd.safetensors"})), RayOptions()) is None
    assert model_bundle(load_model("zoo:resnet_digits"), _Loader(), RayOptions()) is None
    with pytest.raises(SpecError, match=r"rd\.(safetensors|json) .*over the limit"):
        model_bundle(m, _Loader(), RayOptions(model_bytes=1000))


def test_run_compare_tells_the_ray_engine_which_models_it_holds(here, monkeypatch):
    import relprop.report.distributed as dist
    from relprop.report import run_compare

    class Stop(Exception):
        pass

    seen = {}

    def engine(*a, loader=None, **k):
        seen["loader"] = loader
        raise Stop

    monkeypatch.setattr(dist, "RayEngine", engine)
    for ext in ("safetensors", "json"):
        shutil.copy(zoo.WEIGHTS_DIR / f"resnet_digits.{ext}", here / f"rd.{ext}")
    mine = load_model("rd.safetensors")
    with pytest.raises(Stop):
        run_compare([mine, "zoo:resnet_digits"], "zoo:digits", ["gradient"], here / "out", engine="ray")
    assert seen["loader"].in_memory == {"rd.safetensors"}


# ------------------------------------------------------------------- Python modules (python:MODULE, pickles)
NET = (
    "import torch\n"
    "from torch import nn\n"
    "from .parts import Head\n"
    "class Net(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.conv, self.head = nn.Conv2d(1, 3, 3), Head()\n"
    "    def forward(self, x):\n"
    "        return self.head(self.conv(x).relu())\n"
    "def build():\n"
    "    torch.manual_seed(0)\n"
    "    return Net()\n"
)
PARTS = (
    "from torch import nn\n"
    "class Head(nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.fc = nn.Linear(12, 10)\n"
    "    def forward(self, x):\n"
    "        return self.fc(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))\n"
)


def write_package(folder, name: str) -> None:
    """A package ``name`` in ``folder`` whose ``nets.build`` builds a model of two classes in two modules."""
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text("")
    (folder / name / "nets.py").write_text(NET)
    (folder / name / "parts.py").write_text(PARTS)


@pytest.fixture
def forget():
    """The names of modules a test imports, removed from ``sys.modules`` after it (a driver keeps them)."""
    import sys

    names: list[str] = []
    yield names
    for n in list(sys.modules):
        if n.partition(".")[0] in names:
            del sys.modules[n]


def _imported_elsewhere(here, spec: str, tops: list[str], moved: list[str], **kw):
    """Load ``spec`` (its code in ``here``), ship it, move ``moved`` away and forget the module, load again
    from the bundle in another working folder: the same model; after, ``sys.path`` and ``sys.modules`` are
    as before and the copies are gone."""
    import os
    import sys

    first = load_model(spec, **kw)
    bundle = read_model_files(first.info["model_files"], modules=first.info["model_modules"])
    assert sorted(e["module"] for e in bundle["modules"]) == sorted(tops)
    for name in moved:
        shutil.move(here / name, here / "gone" / name)
    for n in [n for n in sys.modules if n.partition(".")[0] in tops]:
        del sys.modules[n]
    (here / "worker").mkdir()
    os.chdir(here / "worker")  # a worker runs elsewhere (the fixture restores the working folder)
    with pytest.raises(SpecError):
        load_model(spec, **kw)
    path, modules = list(sys.path), set(sys.modules)
    with placed(bundle):
        again = load_model(spec, **kw)
        where = Path(sys.modules[type(again.module).__module__].__file__)
        assert all(t in sys.modules for t in tops) and not where.is_relative_to(here)
    assert sys.path == path and set(sys.modules) == modules, "the process is left as found"
    assert not where.exists(), "the temporary copies are removed after the block"
    _same(first, again)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(first.module(x), again.module(x)), "the shipped code computes what the driver's does"
    return first, again


def test_a_python_module_of_the_users_package(here, forget):
    forget.append("rs_pkg_a")
    write_package(here, "rs_pkg_a")
    first, again = _imported_elsewhere(here, "python:rs_pkg_a.nets:build", ["rs_pkg_a"], ["rs_pkg_a"])
    assert first.info["model_modules"] == {"rs_pkg_a": [str(here / "rs_pkg_a")]}
    assert first.info["model_files"] == {}
    from relprop.specs.hashing import module_code_hash

    assert type(again.module).__module__ == "rs_pkg_a.nets"
    assert module_code_hash(first.module) != "" and first.fingerprint() == again.fingerprint()


def test_a_single_module_file_and_weights(here, forget):
    forget.append("rs_single")
    (here / "rs_single.py").write_text(NET.replace("from .parts import Head\n", PARTS))
    torch.manual_seed(1)
    net = load_model("python:rs_single:build").module
    for p in net.parameters():
        p.data.add_(1)
    torch.save(net.state_dict(), here / "w.pt")
    first, again = _imported_elsewhere(
        here, "python:rs_single:build", ["rs_single"], ["rs_single.py", "w.pt"], weights="w.pt"
    )
    assert state_hash(again.module) == state_hash(net)


@pytest.mark.filterwarnings("ignore::relprop.specs.errors.TrustPickleWarning")
def test_a_trusted_pickles_class_module(here, forget):
    import sys

    forget.append("rs_pkg_b")
    write_package(here, "rs_pkg_b")
    sys.path.insert(0, str(here))
    try:
        from rs_pkg_b.nets import build

        torch.save(build(), here / "whole.pt")
    finally:
        sys.path.remove(str(here))
    _imported_elsewhere(here, "whole.pt", ["rs_pkg_b"], ["whole.pt", "rs_pkg_b"], trust_pickle=True)


def test_the_modules_a_module_imports_go_along(here, forget):
    """A factory module that imports a helper module of the user's (and the helper one more): all three go,
    as they are found in the modules' globals; an installed module they import does not."""
    forget += ["rs_top", "rs_helper", "rs_deeper"]
    (here / "rs_deeper.py").write_text(PARTS)
    (here / "rs_helper.py").write_text("import json\nimport rs_deeper\nHead = rs_deeper.Head\n")
    (here / "rs_top.py").write_text(NET.replace("from .parts import Head", "from rs_helper import Head"))
    moved = ["rs_top.py", "rs_helper.py", "rs_deeper.py"]
    _imported_elsewhere(here, "python:rs_top:build", ["rs_top", "rs_helper", "rs_deeper"], moved)


def test_installed_modules_are_not_shipped():
    from relprop.specs.loaders import module_sources

    pytest.importorskip("torchvision")
    assert module_sources(["torch.nn", "json", "relprop.zoo", "torchvision.models", "__main__", "not_imported"]) == {}
    m = load_model("python:torchvision.models:resnet18")
    assert m.info["model_modules"] == {}


def test_what_cannot_be_shipped_is_named(here, forget):
    import sys

    from relprop.specs.loaders import module_sources

    forget += ["rs_pkg_c", "rs_ns"]
    write_package(here, "rs_pkg_c")
    load_model("python:rs_pkg_c.nets:build")
    (here / "rs_pkg_c" / "_fast.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    got = load_model("python:rs_pkg_c.nets:build")
    with pytest.raises(
        SpecError,
        match=r"module 'rs_pkg_c' holds compiled code \(.*_fast.*\.so\).*install it on every node.*--model-files shared",
    ):
        read_model_files({}, modules=got.info["model_modules"])
    from relprop.report.distributed import RayOptions, _Loader, model_bundle

    with pytest.raises(SpecError, match=r"module 'rs_pkg_c' holds compiled code"):  # the model's cells fail so
        model_bundle(got, _Loader(), RayOptions())
    assert model_bundle(got, _Loader(), RayOptions(ship_models=False)) is None  # the fix the message names
    for part in ("one", "two"):  # a namespace package over two folders
        (here / part / "rs_ns").mkdir(parents=True)
        (here / part / "rs_ns" / f"{part}.py").write_text("X = 1\n")
    sys.path[:0] = [str(here / "one"), str(here / "two")]
    try:
        import rs_ns.one  # noqa: F401

        found = module_sources(["rs_ns.one"])
    finally:
        del sys.path[:2]
    assert found == {"rs_ns": [str(here / "one" / "rs_ns"), str(here / "two" / "rs_ns")]}
    with pytest.raises(
        SpecError, match=r"module 'rs_ns' is a namespace package spread over 2 folders.*--model-files shared"
    ):
        read_model_files({}, modules=found)
    (here / "rs_pkg_c" / "_fast.cpython-311-x86_64-linux-gnu.so").unlink()
    (here / "rs_pkg_c" / "table.bin").write_bytes(b"z" * 4096)  # package data go along, under the limit
    with pytest.raises(SpecError, match=r"table\.bin .*over the limit"):
        read_model_files({}, limit=2048, modules=got.info["model_modules"])
    assert "table.bin" in read_model_files({}, modules=got.info["model_modules"])["modules"][0]["files"]


def test_sizes_and_long_messages_read_whole():
    """Sizes under 1 MiB in bytes/KiB (they read "0 MiB"); long messages are cut at a word, ending in "..."."""
    from relprop.specs.errors import shorten, size_text

    assert [size_text(n) for n in (0, 1023, 1536, 2**20, 5 * 2**30)] == ["0 bytes", "1023 bytes", "1.5 KiB", "1 MiB",
                                                                       "5120 MiB"]  # fmt: skip
    text = "word " * 1000 + "(Ray: the hint)"
    assert shorten(text[:1500]) == text[:1500]
    short = shorten(text, 2000)
    assert len(short) <= 2000 and short.endswith("word...") and short[:-3] == text[: len(short) - 3]


def test_a_python_file_imports_its_siblings_and_ships_them(here, forget):
    """``python:FILE.py`` runs as ``python FILE.py`` would: modules beside it import (before: "cannot import module
    'flat.py' (No module named 'rs_fhelper')" unless the folder was on sys.path), and on Ray they go along as code
    with the file (the file itself is a model file)."""
    import os
    import sys

    forget += ["rs_fhelper", "rs_fdeeper"]
    (here / "proj").mkdir()
    (here / "proj" / "rs_fdeeper.py").write_text(PARTS)
    (here / "proj" / "rs_fhelper.py").write_text("import rs_fdeeper\nHead = rs_fdeeper.Head\n")
    (here / "proj" / "flat.py").write_text(NET.replace("from .parts import Head", "from rs_fhelper import Head"))
    path = list(sys.path)
    first = load_model("python:proj/flat.py:build")
    assert sys.path == path
    assert first.info["model_modules"] == {
        "rs_fhelper": [str(here / "proj" / "rs_fhelper.py")],
        "rs_fdeeper": [str(here / "proj" / "rs_fdeeper.py")],
    }
    bundle = read_model_files(first.info["model_files"], modules=first.info["model_modules"])
    shutil.move(here / "proj", here / "gone" / "proj")
    for n in ("rs_fhelper", "rs_fdeeper"):
        del sys.modules[n]
    (here / "worker").mkdir()
    os.chdir(here / "worker")
    with placed(bundle):
        again = load_model("python:proj/flat.py:build")
    assert sys.path == path
    _same(first, again)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(first.module(x), again.module(x))


def test_a_missing_import_of_a_model_file_is_named(here):
    (here / "lonely.py").write_text("import rs_not_anywhere\ndef build():\n    return None\n")
    with pytest.raises(SpecError, match="'lonely.py' imports 'rs_not_anywhere', which is neither installed nor beside"):
        load_model("python:lonely.py:build")
    with pytest.raises(SpecError, match="cannot import module 'rs_no_such_module'"):
        load_model("python:rs_no_such_module:build")
