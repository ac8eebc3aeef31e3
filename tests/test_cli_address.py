"""``--engine ray --address`` where nothing listens: one line naming the address, in seconds, before any work
(``ray.init`` retried the GCS connection for over five minutes). The probe is one TCP connect
(:func:`relprop.specs.address.check_ray_address`); these tests need no Ray."""

from __future__ import annotations

import socket

import pytest

from relprop.cli import main
from relprop.specs import SpecError
from relprop.specs.address import CLIENT_PORT, check_ray_address, ray_host_port


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("address", "want"),
    [
        ("auto", None),
        ("local", None),
        ("10.0.0.5", None),  # no port: left to Ray
        ("10.0.0.5:6379", ("10.0.0.5", 6379)),
        ("ray://head.example:10002", ("head.example", 10002)),
        ("ray://head.example", ("head.example", CLIENT_PORT)),
        ("[::1]:6379", ("::1", 6379)),
    ],
)
def test_address_forms(address, want):
    assert ray_host_port(address) == want


@pytest.mark.parametrize("address", ["host:port", "host:0", "host:70000"])
def test_a_port_that_is_not_one_is_one_line(address):
    with pytest.raises(SpecError, match="is not a port") as e:
        ray_host_port(address)
    assert address in str(e.value) and "\n" not in str(e.value)


def test_nothing_listening_is_one_line_naming_the_address():
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(SpecError) as e:
        check_ray_address(address, timeout=2)
    msg = str(e.value)
    assert address in msg and "ray start --head" in msg and "\n" not in msg


def test_a_listening_address_passes_and_auto_is_not_probed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        check_ray_address(f"127.0.0.1:{s.getsockname()[1]}", timeout=2)
        check_ray_address(f"ray://127.0.0.1:{s.getsockname()[1]}", timeout=2)
    check_ray_address("auto")
    check_ray_address(None)


def test_cli_fails_before_any_work(tmp_path, capsys):
    address = f"127.0.0.1:{_closed_port()}"
    out = tmp_path / "r"
    argv = ["compare", "--engine", "ray", "--address", address, "--models", "zoo:resnet_digits", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relprop: error: Ray address") and address in err and len(err.splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())  # nothing computed or written


def test_cli_probes_ray_address_before_any_work_too(tmp_path, capsys, monkeypatch):
    """Without --address the engine joins RAY_ADDRESS (Ray's own variable): probed at the same point, before the
    models are checked (it was probed only by the engine, after "checking zoo:resnet_digits ...")."""
    from relprop.specs import models

    address = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    loaded = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loaded.append(a) or pytest.fail("a model was loaded"))
    out = tmp_path / "r"
    assert main(["compare", "--engine", "ray", "--models", "zoo:resnet_digits", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relprop: error: Ray address") and address in err and len(err.splitlines()) == 1, err
    assert not loaded and (not out.exists() or not any(out.iterdir()))


def test_run_compare_from_python_fails_in_seconds_too(tmp_path):
    """The Ray engine probes the address (given or RAY_ADDRESS) before ray.init, for Python callers too."""
    ray = pytest.importorskip("ray")
    from relprop.report import run_compare

    assert not ray.is_initialized()  # else the engine joins the running instance and never probes
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(SpecError, match=rf"^Ray address {address}: nothing answers"):
        run_compare(["zoo:resnet_digits"], "zoo:digits", ["saliency"], tmp_path / "r", engine="ray",
                    ray_options={"address": address})  # fmt: skip
    assert not ray.is_initialized()


def test_the_ray_engine_reports_failed_cells_with_the_one_record():
    """The failed-cell record is built by report.compare.failed_cell alone (the Ray engine had its own)."""
    from relprop.report import compare, distributed

    assert not hasattr(distributed, "_failed") and distributed.failed_cell is compare.failed_cell
