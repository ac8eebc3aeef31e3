"""``--engine ray`` with model code that exists only in a driver-only folder: a ``python:MODULE:FUNCTION``
package and the class module of a trusted whole-model pickle, in the test's own folder, which the workers
(run in an empty working directory, tests/test_ray_engine.py's cluster) cannot import. The driver ships the
source with the model's bundle; the results.json numbers and per-example rows equal the single-process
engine's (no tolerance: the single-process run uses the workers' thread count, one). With
``ship_models=False`` (``--model-files shared``) the workers import as they find, and here fail, which shows
they could not see the folder; the workers leave no copies behind."""

import functools
import sys

import pytest
import torch

from relprop.specs import load_model
from test_model_files import write_package
from test_ray_engine import cluster, data, methods, shipped_equals_local  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.mark.filterwarnings("ignore::relprop.specs.errors.TrustPickleWarning")
def test_python_modules_the_workers_cannot_import(cluster, tmp_path, monkeypatch, data, methods):  # noqa: F811
    write_package(tmp_path, "rs_ray_a")  # python:MODULE:FUNCTION
    write_package(tmp_path / "pickled", "rs_ray_b")  # the class module of a pickle, next to the file
    sys.path.insert(0, str(tmp_path / "pickled"))
    try:
        from rs_ray_b.nets import build

        torch.save(build(), tmp_path / "pickled" / "whole.pt")
    finally:
        sys.path.remove(str(tmp_path / "pickled"))
        for n in [n for n in sys.modules if n.partition(".")[0] == "rs_ray_b"]:
            del sys.modules[n]
    monkeypatch.chdir(tmp_path)
    models = ["python:rs_ray_a.nets:build", "pickled/whole.pt"]
    kw = dict(models=models, load=functools.partial(load_model, trust_pickle=True))
    try:
        shared = shipped_equals_local(data, methods, tmp_path, **kw)
        assert shared["status"] == "incomplete"
        assert all("cannot import module 'rs_ray_a.nets'" in p for p in shared["problems"]), shared["problems"]
    finally:
        for n in [n for n in sys.modules if n.partition(".")[0] in ("rs_ray_a", "rs_ray_b")]:
            del sys.modules[n]
