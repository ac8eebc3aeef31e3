"""The non-finite diagnosis names the real cause: a ``-inf`` the model absorbs (masked scores, T5's ``log(0)``
in its relative-position buckets) is not "the forward pass produced non-finite values", and a DeepLIFT rule
(which divides by ``x - x0``) is not described as an LRP rule dividing by its output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprop


class MaskedSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        s = self.lin(x).masked_fill(torch.tensor([False, False, True, True]), float("-inf"))
        return self.out(torch.softmax(s, -1))


def test_absorbed_minus_inf_is_not_blamed_on_the_forward_pass():
    torch.manual_seed(0)
    m = MaskedSoftmax().eval()
    x = torch.randn(2, 4)
    assert torch.isfinite(m(x)).all()

    def naive(ctx):  # a softmax rule undefined at -inf: sum(x) * 0 is NaN in every row
        return [ctx.rel + ctx.inputs[0].sum(-1, keepdim=True) * 0]

    with pytest.raises(relprop.PropagationError) as err:
        relprop.explain(m, x, target=0, method="lrp", rules={"_softmax": naive})
    msg = str(err.value)
    assert "forward pass itself" not in msg
    assert "_softmax" in msg and "holds +-inf at 4 positions" in msg and "finfo(dtype).min" in msg

    # a -inf that reaches the output is still the forward pass's
    class LogOfZero(nn.Module):
        def forward(self, x):
            return m.out(torch.log(torch.relu(-m.lin(x).abs())))  # log(0) = -inf, then NaN in the output

    with pytest.raises(relprop.PropagationError, match=r"forward pass itself.*log"):
        relprop.explain(LogOfZero().eval(), x, target=0, method="lrp")


def test_deeplift_rule_is_described_as_dividing_by_x_minus_x0():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.randn(2, 3)
    with pytest.raises(relprop.PropagationError) as err:  # eps=0: the secant at x == x0 is 0/0
        relprop.explain(m, x, target=0, method="deeplift", baselines=x.clone(), eps=0)
    msg = str(err.value)
    assert "relu" in msg and "x - x0" in msg and "eps=0.0" in msg and "larger eps=" in msg
    assert "divides by the output" not in msg and "exactly 0" not in msg
