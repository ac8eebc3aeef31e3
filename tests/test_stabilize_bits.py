"""The epsilon denominator made with integer ops has the bits of ``copysign(eps, z) + z``.

``linear.stabilize`` takes ``z``'s sign bit with ``bitwise_and`` on an integer view and ors in the bits of
``|eps|`` (float32/float64) instead of calling ``copysign`` (``linear._stabilize_into``, chunked, keeps copysign:
checked here too). Compared bit for bit (integer
views: NaNs compare too) with the plain ``torch.copysign(eps, z) + z`` over special values (signed zeros and
infinities, NaNs with either sign bit, subnormals, the largest finite values), several ``eps`` (one that is
subnormal in float32, a negative one) and layouts (strided, transposed, broadcast, channels-last, several chunks).
"""

from __future__ import annotations

import pytest
import torch

from relprop.rules import linear

INT = {torch.float32: torch.int32, torch.float64: torch.int64}
EPS = [1e-6, 0.25, 1e-30, 1e-40, -0.25]


def _specials(dtype: torch.dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    vals = [0.0, -0.0, float("inf"), -float("inf"), fi.tiny, -fi.tiny, fi.tiny / 4, -fi.tiny / 4, fi.max, -fi.max]
    vals += [fi.smallest_normal * fi.eps, -fi.smallest_normal * fi.eps, 3e-7, -3e-7, 1e-6, -1e-6, -0.25, 1.0]
    t = torch.tensor(vals, dtype=dtype)
    nans = torch.full((4,), float("nan"), dtype=dtype)
    ni = nans.view(INT[dtype])
    sign = torch.tensor(-(2 ** (ni.element_size() * 8 - 1)), dtype=ni.dtype)
    ni[1] |= sign  # NaN with the sign bit set
    ni[2] |= 5  # a payload
    ni[3] |= sign | 7
    return torch.cat([t, nans])


def _data(dtype: torch.dtype, n: int) -> torch.Tensor:
    torch.manual_seed(0)
    z = torch.randn(n, dtype=dtype) * torch.logspace(-45, 5, n, dtype=torch.float64).to(dtype)
    s = _specials(dtype)
    pos = torch.randperm(n)[: 8 * s.numel()]
    z[pos] = s.repeat(8)
    return z


def _plain(z: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.copysign(torch.tensor(eps, dtype=z.dtype), z) + z


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(INT[a.dtype]), b.view(INT[b.dtype]))


def _layouts(dtype: torch.dtype):
    base = _data(dtype, 4 * 6 * 10 * 12)
    yield "contiguous", base
    yield "strided", base.view(24, 120)[:, ::3]
    yield "transposed", base.view(24, 120).t()
    yield "broadcast", base[:12].view(1, 12).expand(5, 12)
    yield "channels_last", base.view(4, 6, 10, 12).contiguous(memory_format=torch.channels_last)
    yield "specials", _specials(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", EPS)
def test_stabilize_bits(dtype, eps):
    assert linear._eps_bits(eps, dtype) is not None  # the integer path is the one tested
    for name, z in _layouts(dtype):
        got = linear.stabilize(z, eps)
        assert _same_bits(got, _plain(z, eps)), name
        assert got.stride() == torch.empty_like(z).stride(), name  # laid out as before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", EPS)
def test_stabilize_into_bits(dtype, eps):
    """In place, chunk by chunk (3 full chunks and a partial one), contiguous and channels-last."""
    z = _data(dtype, 3 * linear.CHUNK + 1000)
    want = _plain(z, eps)
    got = z.clone()
    assert linear._stabilize_into(got, eps)
    assert _same_bits(got, want)
    z4 = _data(dtype, 2 * 16 * 40 * 40).view(2, 16, 40, 40).contiguous(memory_format=torch.channels_last)
    want4, got4 = _plain(z4, eps), z4.clone()
    assert linear._stabilize_into(got4, eps)
    assert _same_bits(got4, want4) and got4.stride() == z4.stride()


def test_other_dtypes_keep_copysign():
    """bfloat16/float16 are made in float32 by stabilize; the integer path is for float32/float64 only."""
    assert linear._eps_bits(1e-6, torch.float16) is None and linear._eps_bits(1e-6, torch.bfloat16) is None
    assert linear._eps_bits(1e39, torch.float32) is None  # out of float32's range: copysign's rounding decides
    z = _data(torch.float32, 500).half()
    assert _same_bits(linear.stabilize(z, 0.25), _plain(z.float(), 0.25))
