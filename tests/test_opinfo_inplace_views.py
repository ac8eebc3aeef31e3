"""Every in-place variant and view op in PyTorch's own OpInfo database, recorded and differentiated.

For each op and its first float64 sample inputs, a program writes the op into (or views) a copy of the
explained input and reads both the written tensor and the op's result; relprop's gradient must equal
``torch.autograd.grad`` of the same program. Cases autograd itself cannot differentiate are skipped;
a few ops raise a clear ``TraceError`` instead of a silently different answer (listed below, each
with why). In-place ops without a derivative (``logical_and_`` on floats) keep the written tensor's old
derivative in autograd: relprop records them as a "straight_through" region with the identity VJP.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import relprop
from relprop.trace import TraceError

pytest.importorskip("expecttest")  # torch.testing._internal imports it
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

aten = torch.ops.aten
SAMPLES = 2

#: Ops relprop refuses with a TraceError naming the op (never a wrong gradient).
RAISES = {
    # rrelu in training mode draws its noise and has a derivative through it.
    "nn.functional.rrelu": "random operation",
    # polygamma_(self, n) vs polygamma(n, self): no functional twin with the same argument order.
    "polygamma": "no functional counterpart",
}
#: Ops expected to fail (none: fmod/remainder moved from the "stop" family to "nonlinear", their
#: derivative w.r.t. self is 1).
XFAIL: set[str] = set()


def _is_view(op) -> bool:
    packet = getattr(aten, op.aten_name or op.name, None)
    if packet is None or not hasattr(packet, "overloads"):
        return False
    for name in packet.overloads():
        rets = getattr(packet, name)._schema.returns
        if rets and rets[0].alias_info is not None and not rets[0].alias_info.is_write:
            return True
    return False


def _cases():
    cases = []
    for op in op_db:
        modes = (["inplace"] if op.inplace_variant is not None else []) + (["view"] if _is_view(op) else [])
        if not modes or torch.float64 not in op.supported_dtypes("cpu"):
            continue
        for mode in modes:
            ident = f"{mode}-{op.name}" + (f".{op.variant_test_name}" if op.variant_test_name else "")
            marks = (
                [pytest.mark.xfail(reason="gradient rule of the stop family", strict=True)]
                if (mode == "inplace" and op.name in XFAIL)
                else []
            )
            cases.append(pytest.param(op, mode, id=ident, marks=marks))
    return cases


def _program(op, mode, sample):
    args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in sample.args]
    kwargs = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in sample.kwargs.items()}

    def model(xb):
        y = xb[0] * 1.0  # a non-leaf activation the op may write
        if mode == "inplace":
            outs = [y, op.inplace_variant(y, *args, **kwargs)]
        else:
            res = op.op(y, *args, **kwargs)
            res = list(res) if isinstance(res, (tuple, list)) else [res]
            outs = [y] + [t for t in res if isinstance(t, torch.Tensor) and t.is_floating_point()]
        total = 0.0
        for i, t in enumerate(outs):
            w = torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=t.dtype)
            total = total + (t * w).sum()
        return total.reshape(1, 1)

    return model


@pytest.mark.parametrize(("op", "mode"), _cases())
def test_gradient_equals_autograd(op, mode):
    checked = 0
    for k, sample in enumerate(op.sample_inputs("cpu", torch.float64, requires_grad=False)):
        if checked >= SAMPLES:
            break
        if getattr(sample, "broadcasts_input", False) or not isinstance(sample.input, torch.Tensor):
            continue
        model = _program(op, mode, sample)
        x = sample.input.detach().clone()[None]
        xr = x.clone().requires_grad_(True)
        torch.manual_seed(0)  # random ops (dropout variants) draw the same values in both runs
        try:
            ref = torch.autograd.grad(model(xr).sum(), xr, allow_unused=True)[0]
        except RuntimeError:
            continue  # autograd cannot differentiate this program: nothing to compare with
        checked += 1
        ref = torch.zeros_like(x) if ref is None else ref
        if mode == "inplace" and op.name in RAISES:
            torch.manual_seed(0)
            with pytest.raises(TraceError, match=RAISES[op.name]):
                relprop.explain(model, x, target=0, method="gradient")
            continue
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = relprop.explain(model, x, target=0, method="gradient").attributions
        torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9, msg=lambda m: f"sample {k}: {m}")
