"""LRP-0's quotient ``R / stab(z, 0)`` without the boolean mask when no ``|z|`` is below the smallest normal number.

``linear.ratio(rel, z, 0)`` on CPU divides by ``z`` itself when one reduction says every ``|z| >= finfo.tiny``
(``linear._all_normal``, or ``_all_normal_by_chunks`` for a scratch ``z``) and takes the masked path of
``stabilize`` otherwise. Compared bit for bit (NaN payloads included) with the computation it replaces, on
special values in ``z`` and ``rel`` and in four dtypes, and on whole models (AttnLRP on a Qwen2 decoder, LRP-0
sums on a network whose outputs are exactly 0 in places) with the reduction switched off.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprop
from model_zoo import qwen2
from relprop.rules import linear

_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT[t.dtype])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes, strides and bits (NaN included)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(_bits(a), _bits(b))


def _reference(rel: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The quotient as :func:`linear.ratio` made it for ``eps = 0`` before the fast path (its code, inlined)."""
    if z.dtype in (torch.bfloat16, torch.float16):
        z = z.float()
    d = z.abs()
    inf = torch.full((), float("inf"), dtype=z.dtype)
    d = torch.where(d < torch.finfo(z.dtype).tiny, inf, z, out=d)
    if linear.writable(d, rel, d):
        return torch.div(rel, d, out=d)
    return rel / d


def _specials(dtype: torch.dtype) -> list[float]:
    f = torch.finfo(dtype)
    sub = f.tiny / 4 if dtype != torch.float16 else 2.0**-20  # a subnormal of the dtype
    below = torch.nextafter(torch.tensor(f.tiny, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    return [0.0, -0.0, sub, -sub, f.tiny, -f.tiny, float(below), float("inf"), -float("inf"), float("nan"), f.max, 1.5]


def _spy(monkeypatch) -> dict[str, int]:
    seen = {"fast": 0, "masked": 0}
    whole, chunks = linear._all_normal, linear._all_normal_by_chunks

    def count(f):
        def w(t):
            ok = f(t)
            seen["fast" if ok else "masked"] += 1
            return ok

        return w

    monkeypatch.setattr(linear, "_all_normal", count(whole))
    monkeypatch.setattr(linear, "_all_normal_by_chunks", count(chunks))
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_quotient_equals_masked_division_bit_for_bit(monkeypatch, dtype):
    seen = _spy(monkeypatch)
    g = torch.Generator().manual_seed(0)
    n = 3 * linear.CHUNK + 11  # several chunks for the scratch check
    normal = (torch.randn(n, generator=g, dtype=torch.float64) + 3.0).to(dtype)  # |z| well above tiny
    normal[::2] *= -1
    specials = _specials(dtype)
    rel_specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, 2.0], dtype=torch.float64)
    rdt = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    cases = [normal] + [torch.cat([normal[:100], torch.tensor([v], dtype=dtype), normal[100:]]) for v in specials]
    for z in cases:
        rel = torch.randn(z.shape, generator=g, dtype=torch.float64).to(rdt)
        rel[: len(rel_specials)] = rel_specials.to(rdt)
        held = z.clone()
        want = _reference(rel, z)
        got = linear.ratio(rel, z, 0.0)
        assert _same(got, want), (dtype, z[100])
        assert torch.equal(_bits(z), _bits(held))  # the recorded output is never written into
        # a scratch z (a released output's recomputation): the quotient in its own memory, same bits
        s = z.clone()
        got = linear.ratio(rel, s, 0.0, scratch=True)
        assert _same(got, want)
        if dtype in (torch.float32, torch.float64) and z is normal:
            assert got.data_ptr() == s.data_ptr()
    # Layouts and broadcasting: 2-D z, a row of relevance broadcast to it, a transposed z, a channels-last z,
    # and a relevance larger than z (not writable: a new tensor, as before).
    z2 = normal[: 64 * 48].view(64, 48)
    for z, rel in [
        (z2, torch.randn(1, 48, generator=g, dtype=torch.float64).to(rdt)),
        (z2.t(), torch.randn(48, 64, generator=g, dtype=torch.float64).to(rdt)),
        (z2[:1], torch.randn(64, 48, generator=g, dtype=torch.float64).to(rdt)),
        (
            normal[: 2 * 3 * 8 * 8].view(2, 3, 8, 8).contiguous(memory_format=torch.channels_last),
            torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64).to(rdt),
        ),
    ]:
        for zz in (z, torch.where(torch.arange(z.numel()).view(z.shape) == 5, torch.zeros((), dtype=dtype), z)):
            want = _reference(rel, zz)
            assert _same(linear.ratio(rel, zz, 0.0), want)
            assert _same(linear.ratio(rel, zz.clone(), 0.0, scratch=True), _reference(rel, zz.clone()))
    assert seen["fast"] >= 5 and seen["masked"] >= len(specials), seen


def test_eps_zero_under_autograd_and_empty():
    z = torch.tensor([0.0, 1e-45, 2.0, -3.0], requires_grad=True)
    rel = torch.ones(4)
    got = linear.ratio(rel, z, 0.0)
    assert got.requires_grad and torch.equal(got.detach(), torch.tensor([0.0, 0.0, 0.5, -1.0 / 3]))
    e = torch.empty(0, 3)
    assert linear.ratio(torch.empty(0, 3), e, 0.0).shape == (0, 3)
    assert not linear._all_normal(e) and not linear._all_normal_by_chunks(e)


def _plain(monkeypatch):
    """The masked path everywhere (as before the fast path)."""
    monkeypatch.setattr(linear, "_all_normal", lambda a: False)
    monkeypatch.setattr(linear, "_all_normal_by_chunks", lambda z: False)


def test_attnlrp_decoder_equal_bits_to_the_masked_path(monkeypatch):
    torch.manual_seed(0)
    model = qwen2().eval()
    ids = [torch.randint(0, 50, (2, 12)) for _ in range(3)]

    def target(out):
        return out.logits[:, -1, 7]

    opts = {"target": target, "method": "lrp", "composite": "attnlrp"}
    layers = ["model.layers.0", "model.layers.1.mlp"]
    p = relprop.plan(model, {"input_ids": ids[0]}, **opts)
    seen = _spy(monkeypatch)
    fast = [relprop.explain(model, {"input_ids": ids[0]}, layers=layers, **opts)]
    fast += [p.explain({"input_ids": x}, layers=layers) for x in ids[1:]]
    assert seen["fast"] >= 20, seen  # every linear, residual sum and norm of the two layers
    with monkeypatch.context() as mp:
        _plain(mp)
        plain = [relprop.explain(model, {"input_ids": x}, layers=layers, **opts) for x in ids]
    for a, b in zip(fast, plain):
        assert a.attributions.keys() == b.attributions.keys() == {"input_ids"}
        r = a.attributions["input_ids"]
        assert torch.equal(r, b.attributions["input_ids"]) and r.abs().sum() > 0
        for name in layers:
            assert torch.equal(a.layers[name], b.layers[name])


class _Zeros(nn.Module):
    """Linear layers whose outputs are exactly 0 in places (a zero weight row, relu), summed: LRP-0 absorbs there."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.c = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 3)
        with torch.no_grad():
            self.a.weight[2].zero_()
            self.a.bias[2] = 0.0
            self.b.weight[2].zero_()
            self.b.bias[2] = 0.0

    def forward(self, x):
        return self.c(torch.relu(self.a(x)) + self.b(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_outputs_take_the_masked_path_with_equal_bits(monkeypatch, dtype):
    m = _Zeros().to(dtype).eval()
    x = torch.randn(4, 6, dtype=dtype)
    seen = _spy(monkeypatch)
    for comp in ("epsilon", "attnlrp"):
        kw = {"method": "lrp", "composite": comp}
        kw.update({"epsilon": 0.0} if comp == "epsilon" else {})
        fast = relprop.explain(m, x, target=1, **kw)
        with monkeypatch.context() as mp:
            _plain(mp)
            plain = relprop.explain(m, x, target=1, **kw)
        assert torch.equal(fast.attributions, plain.attributions) and torch.isfinite(fast.attributions).all()
    assert seen["fast"] >= 1 and seen["masked"] >= 2, seen


def test_product_shares_written_into_their_own_gradients(monkeypatch):
    """``contributions`` writes a product's first share into that operand's gradient (a new tensor of the VJP): equal
    bits to the new product; a sum's operands (whose VJP hands the quotient itself to each) never."""
    torch.manual_seed(0)
    model = qwen2().eval()
    ids = [torch.randint(0, 50, (2, 12)) for _ in range(2)]

    def target(out):
        return out.logits[:, -1, 7]

    opts = {"target": target, "method": "lrp", "composite": "attnlrp"}
    seen: dict[str, int] = {}
    own = linear._own_gradient

    def spy(g, x, others):
        ok = own(g, x, others)
        seen[str(ok)] = seen.get(str(ok), 0) + 1
        assert not (ok and any(t is g for t in others))
        return ok

    monkeypatch.setattr(linear, "_own_gradient", spy)
    p = relprop.plan(model, {"input_ids": ids[0]}, **opts)
    fast = [p.explain({"input_ids": x}, layers=["model.layers.1.mlp"]) for x in ids]
    assert seen.get("True", 0) >= 2 * 4 and seen.get("False", 0) >= 1, seen  # A @ v and gate * up per layer; sums
    with monkeypatch.context() as mp:
        mp.setattr(linear, "_own_gradient", lambda g, x, others: False)
        plain = [relprop.explain(model, {"input_ids": x}, layers=["model.layers.1.mlp"], **opts) for x in ids]
    for a, b in zip(fast, plain):
        assert torch.equal(a.attributions["input_ids"], b.attributions["input_ids"])
        assert torch.equal(a.layers["model.layers.1.mlp"], b.layers["model.layers.1.mlp"])
