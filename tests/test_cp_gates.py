"""CP-LRP holds gates constant however the activation is written (LXT's cp_LRP gated MLP:
``act(stop_gradient(gate_proj(x))) * up_proj(x)``): T5 v1.1's gated-gelu ``gelu_new(x W0) * (x W1)``
with ``gelu_new`` written out as eight element-wise ops gets what the one-op gelu gets, and what the
same MLP with its gate values as a constant gets (the hand-written reference: all relevance through ``up``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import relprop


def gelu_new(x):  # transformers' NewGELUActivation, as T5 v1.1 and GPT-2 write it
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GatedMLP(nn.Module):
    def __init__(self, act: str, d: int = 8, h: int = 16):
        super().__init__()
        self.wi_0, self.wi_1, self.wo = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d)
        self.head = nn.Linear(d, 3)
        self.act = act

    def forward(self, x):
        g = self.wi_0(x)
        if self.act == "written_out":
            g = gelu_new(g)
        elif self.act == "one_op":
            g = nn.functional.gelu(g, approximate="tanh")
        else:  # "frozen": the reference, the gate a constant (its values for this input, held by the model)
            g = self.gate
        return self.head(self.wo(g * self.wi_1(x)) + x)


def _models():
    torch.manual_seed(0)
    a = GatedMLP("written_out").eval()
    b, c = GatedMLP("one_op").eval(), GatedMLP("frozen").eval()
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    return a, b, c


def _lrp(model, x, composite):
    return relprop.explain(model, x, target=1, method="lrp", composite=composite).attributions


def test_cp_lrp_holds_a_written_out_gate_constant():
    written, one_op, frozen = _models()
    x = torch.randn(5, 8)
    with torch.no_grad():
        frozen.gate = gelu_new(written.wi_0(x))
    torch.testing.assert_close(written(x), one_op(x), rtol=1e-5, atol=1e-6)  # the same function
    torch.testing.assert_close(written(x), frozen(x))
    got = _lrp(written, x, "cp_lrp")
    want = _lrp(frozen, x, "attnlrp")  # no attention: attnlrp is cp_lrp without constant gates
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, _lrp(one_op, x, "cp_lrp"), rtol=1e-5, atol=1e-6)
    # AttnLRP keeps the uniform product rule (the gate gets half): a different answer, as it should be.
    assert not torch.allclose(_lrp(written, x, "attnlrp"), got, rtol=1e-3, atol=1e-4)


def test_cp_lrp_holds_the_gate_of_t5_v1_1_constant():
    transformers = pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

    cfg = transformers.T5Config(d_model=8, d_ff=16, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    torch.manual_seed(0)
    ff = T5DenseGatedActDense(cfg).eval()

    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        gate = gelu_new(ff.wi_0(x))

    class Ref(nn.Module):  # the same weights, the gate a constant
        def forward(self, x):
            return ff.wo(gate * ff.wi_1(x))

    torch.testing.assert_close(ff(x), Ref().eval()(x))
    got = _lrp(ff, x, "cp_lrp")
    torch.testing.assert_close(got, _lrp(Ref().eval(), x, "attnlrp"), rtol=1e-5, atol=1e-6)
