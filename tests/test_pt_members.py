"""``.pt`` members of WebDataset shards are checked for ``weights_only`` when the shards are listed: a member
that needs more (a pickled object) anywhere in the shards fails at ``load_data``, naming it, before any work,
and without reading the members' tensor data (the check reads the pickle's small ``data.pkl`` record)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from relprop.specs import SpecError, load_data
from relprop.specs import sources as sources_mod


class Holder:
    """A pickled object: ``weights_only`` refuses it (its class would be imported and run)."""

    def __init__(self, a):
        self.a = a


def _pt(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _shards(root: Path, bad: int | None, n: int = 24, shards: int = 3, legacy: bool = False) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    per = n // shards
    for s in range(shards):
        with tarfile.open(root / f"s-{s:03d}.tar", "w") as tf:
            for k in range(s * per, (s + 1) * per):
                img = torch.from_numpy(rng.random((3, 8, 8), dtype=np.float32))
                obj = Holder(img) if k == bad else img
                if legacy:
                    buf = io.BytesIO()
                    torch.save(obj, buf, _use_new_zipfile_serialization=False)
                    b = buf.getvalue()
                else:
                    b = _pt(obj)
                for name, data in ((f"{k:04d}.pt", b), (f"{k:04d}.cls", str(k % 2).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return root


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_bad_pt_member_late_in_the_shards_fails_at_load_time(tmp_path, legacy):
    root = _shards(tmp_path / "d", bad=22, legacy=legacy)  # in the last shard, far from the first member
    with pytest.raises(
        SpecError, match=r"^s-002\.tar:0022\.pt holds more than tensors \(weights_only\).*--trust-pickle"
    ):
        load_data(str(root))
    data = load_data(str(root), trust_pickle=True)  # trusted: listed and read
    assert len(data) == 24 and isinstance(data.images[21], torch.Tensor)


def test_the_listing_check_reads_no_tensor_data_and_reads_agree(tmp_path, monkeypatch):
    root = _shards(tmp_path / "ok", bad=None)
    loads: list[int] = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(1) or real(*a, **k))
    data = load_data(str(root))
    assert loads == []  # nothing loaded at listing: the check is static
    rng = np.random.default_rng(0)
    first = torch.from_numpy(rng.random((3, 8, 8), dtype=np.float32))
    assert torch.equal(data.images[0], first) and len(loads) == 1


def test_a_truncated_pt_member_is_named_at_load_time(tmp_path):
    good = _pt(torch.zeros(3, 4, 4))
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tf:
        for name, b in (("a.pt", good), ("a.cls", b"0"), ("b.pt", good[: len(good) // 2]), ("b.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(b)
            tf.addfile(info, io.BytesIO(b))
    with pytest.raises(SpecError, match=r"^cannot read t\.tar:b\.pt: "):
        load_data(str(path))


def test_window_reads_a_member_in_place(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(bytes(range(100)))
    with open(f, "rb") as fh:
        w = io.BufferedReader(sources_mod._Window(fh, 10, 20))
        assert w.read(5) == bytes(range(10, 15))
        w.seek(-3, 2)
        assert w.read() == bytes(range(27, 30))
        w.seek(0)
        assert w.read() == bytes(range(10, 30))
