"""Batch norms merged into the preceding conv/dense op under half precision (bfloat16/float16 models).

The merge ``W * gamma / sqrt(var + eps)`` is computed in float32 and the merged weight and bias stay float32,
like the rest of the half-precision LRP rule pass (``tests/test_dtype.py``): rounded to the model's dtype, the
merged weights no longer matched the outputs the rules divide by, and relevance leaked (about 6e-3 relative
error in bfloat16 against the float64 rule pass on the recorded values; 1e-7 now).

Oracle: the same rules in float64 on the values the half-precision forward recorded (``test_dtype._oracle``).
The model has no in-place writes: a value an in-place op overwrote is recomputed, in float64 by the oracle but
in the model's dtype by relprop (as the forward computed it), so the oracle is not exact there.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprop
from relprop import canonical
from relprop.rules.composites import resolve_composite
from relprop.trace import record
from test_dtype import CONSERVE, HALVES, TIGHT, _oracle, _rel_err


class _BnNet(nn.Module):
    """conv -> BN -> ReLU, grouped conv -> BN (residual), linear -> BN1d -> linear: every kind of merge."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 16, bias=bias)
        self.b3 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 5, bias=bias)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(self.b2(self.c2(h))) + h
        h = nn.functional.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.fc2(torch.relu(self.b3(self.fc1(h))))


def _net(bias: bool = True, shift: bool = True) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Norms with negative factors too; ``shift=False``: zero mean and beta, so a bias-free net stays bias-free."""
    torch.manual_seed(0)
    m = _BnNet(bias).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_var.uniform_(0.3, 2.0)
                mod.weight.uniform_(-1.5, 1.5)
                if shift:
                    mod.running_mean.normal_(0, 0.5)
                    mod.bias.normal_(0, 0.3)
                else:
                    mod.running_mean.zero_()
                    mod.bias.zero_()
    return m, torch.randn(3, 3, 8, 8), torch.tensor([0, 3, 1])


COMPOSITES = ["epsilon", "lrp0", "epsilon_plus_flat", "epsilon_gamma_box", "zplus", "alpha_beta"]


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("composite", COMPOSITES)
def test_half_lrp_with_merged_batch_norms_equals_float64_rule_pass(composite, dtype):
    m, x, target = _net()
    m, x = m.to(dtype), x.to(dtype)
    got = relprop.explain(m, x, target=target, method="lrp", composite=composite).attributions
    ref = _oracle(m, x, target, composite).attributions
    assert got.dtype == torch.float32 and ref.abs().max() > 0
    assert _rel_err(got, ref) < TIGHT, _rel_err(got, ref)


def test_merged_weights_of_a_half_model_are_float32():
    m, x, _ = _net()
    m, x = m.to(torch.bfloat16), x.to(torch.bfloat16)
    graph = resolve_composite("zplus", {}).prepare(record(m, (x,), {})).graph
    merged = [n for n in graph.nodes if "merged_batch_norm" in n.meta]
    assert len(merged) == 3
    for node in merged:
        ms = canonical.merged_scale(node)
        assert ms is not None
        assert ms.merged_weight().dtype == ms.merged_bias().dtype == ms.factor.dtype == torch.float32
        w = node.inputs[ms.weight_pos]
        assert w.dtype == torch.float32  # the Value says what recomputing it gives
        assert w.tensor.dtype == torch.float32
        # and equals the float64 merge of the same (rounded) parameters to float32 accuracy
        args = [a.tensor.double() if isinstance(a, relprop.graph.Value) else a for a in w.producer.args]
        w64, b64 = w.producer.op(*args)
        assert torch.allclose(w.tensor.double(), w64, rtol=1e-6, atol=0)
        assert torch.allclose(node.inputs[ms.bias_pos].tensor.double(), b64, rtol=1e-6, atol=1e-7)


def test_half_merge_would_be_caught(monkeypatch):
    """The oracle check has teeth: merging in bfloat16 (the behaviour before) fails it."""
    m, x, target = _net()
    m, x = m.to(torch.bfloat16), x.to(torch.bfloat16)
    ref = _oracle(m, x, target, "epsilon").attributions
    scale = canonical._MergeBatchNorm.scale
    monkeypatch.setattr(canonical._MergeBatchNorm, "scale", lambda self, g, var: scale(self, g, var).to(var.dtype))
    got = relprop.explain(m, x, target=target, method="lrp", composite="epsilon").attributions
    assert _rel_err(got, ref) > 10 * TIGHT


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_half_lrp0_with_merged_batch_norms_conserves(dtype):
    """LRP-0 on a bias-free net (norms without shift) conserves the logit in exact arithmetic; in half
    precision as tightly as the float32 rule pass allows (test_dtype.CONSERVE), and the sum is the float64
    rule pass's."""
    m, x, target = _net(bias=False, shift=False)
    m, x = m.to(dtype), x.to(dtype)
    got = relprop.explain(m, x, target=target, method="lrp", composite="lrp0")
    total = got.attributions.double().sum((1, 2, 3))
    score = got.score.double()
    gap = ((total - score).abs() / score.abs()).max().item()
    assert gap < CONSERVE * torch.finfo(dtype).eps, (total, score)
    ref = _oracle(m, x, target, "lrp0").attributions.sum((1, 2, 3))
    assert _rel_err(total, ref) < TIGHT
