"""Rules that modify weights (z+, alpha-beta, gamma, flat, w^2) on conv/dense ops whose weights outweigh
their activations build the modified weights one block of output channels at a time (``linear.shares``),
and never build a whole merged batch-norm weight.

Proven against plain computations, in float64:

* blocks vs the whole op (the path used when weights are small): equal to rounding (1e-12), with blocks
  that do not divide the channels evenly;
* the whole op with merged weights built block-free (``MergedScale.merged_weight``) vs the merged weight
  the merge builds: equal bits;
* z+ on a conv -> BN and on a linear -> BN1d written out by hand (clamped merged weights, autograd for
  ``J^T``): equal to 1e-12;
* no modified copy larger than a block is made, and no whole merged weight is built;
* the rule's scratch (modified weights) is freed when the rule returns, not left to the garbage collector;
* z+/alpha-beta know from the graph that a ReLU's output has no negative part (same bits as looking).
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import relprop
from relprop import canonical
from relprop.rules import linear


class _Wide(nn.Module):
    """Weights much larger than the activations (as in ResNet-50's last stage), each linear op followed by a
    norm; channel counts that blocks do not divide evenly; a signed input to the second conv (no ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 37, 3, padding=1)
        self.b1 = nn.BatchNorm2d(37)
        self.c2 = nn.Conv2d(37, 53, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(53)
        self.c3 = nn.Conv2d(53, 41, 1)  # unmerged (no norm): the model's weight, blocked
        self.fc1 = nn.Linear(41, 67)
        self.b3 = nn.BatchNorm1d(67)
        self.fc2 = nn.Linear(67, 5)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = self.b2(self.c2(h))  # signed: the negative-input terms of z+/alpha-beta/gamma are live
        h = torch.relu(self.c3(h)).mean((2, 3))
        return self.fc2(torch.relu(self.b3(self.fc1(h))))


def _wide():
    torch.manual_seed(0)
    m = _Wide().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.3, 2.0)
                mod.weight.uniform_(-1.5, 1.5)  # negative factors: z+ of a merged weight is not z+ of W
                mod.bias.normal_(0, 0.3)
    return m.double(), torch.randn(2, 3, 3, 3, dtype=torch.float64), torch.tensor([1, 4])


COMPOSITES = ["zplus", "alpha_beta", "gamma", "flat", "wsquare", "epsilon_plus_flat", "epsilon_gamma_box"]


def _explain(m, x, t, composite):
    return relprop.explain(m, x, target=t, method="lrp", composite=composite).attributions


def _block_counts(monkeypatch) -> list[int]:
    counts: list[int] = []
    blocks = linear._Params.blocks

    def spy(self, x):
        b = blocks(self, x)
        counts.append(len(b))
        return b

    monkeypatch.setattr(linear._Params, "blocks", spy)
    return counts


@pytest.mark.parametrize("composite", COMPOSITES)
def test_blocks_equal_the_whole_op(monkeypatch, composite):
    m, x, t = _wide()
    counts = _block_counts(monkeypatch)
    monkeypatch.setattr(linear, "MIN_BLOCK_BYTES", 0)  # blocks as small as the activations
    blocked = _explain(m, x, t, composite)
    assert max(counts) >= 3  # several blocks, on the convs and the dense op
    monkeypatch.setattr(linear._Params, "blocks", lambda self, x: [])
    whole = _explain(m, x, t, composite)
    assert whole.abs().max() > 0
    assert (blocked - whole).abs().max() <= 1e-12 * whole.abs().max()


@pytest.mark.parametrize("composite", ["zplus", "alpha_beta", "gamma", "flat", "wsquare"])
def test_block_free_merge_equals_the_merged_weights(monkeypatch, composite):
    """Without blocks: the merged weight made from the model's weight (``MergedScale``) gives the bits of the
    merged weight the merge builds (``merged_scale`` -> None: the plain path, every merged weight built)."""
    m, x, t = _wide()
    built: list[str] = []
    call = canonical._MergeBatchNorm.__call__

    def counting(self, *a):
        built.append(self.kind)
        return call(self, *a)

    monkeypatch.setattr(canonical._MergeBatchNorm, "__call__", counting)
    monkeypatch.setattr(linear._Params, "blocks", lambda self, x: [])
    fast = _explain(m, x, t, composite)
    assert built == []  # never the whole merged weight
    monkeypatch.setattr(linear, "merged_scale", lambda node: None)
    plain = _explain(m, x, t, composite)
    assert sorted(built) == ["conv", "conv", "dense"]
    assert torch.equal(fast, plain)


def _merged(conv: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
    return conv.weight * scale.view(shape), (b - bn.running_mean) * scale + bn.bias


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_zplus_on_a_merged_norm_equals_the_hand_written_rule(monkeypatch, kind):
    """z+ written out: R_x = x+ J^T_{W+}(s) + x- J^T_{W-}(s), s = R / (z+ + eps sign), z+ = x+ W+ + b+ + x- W-,
    with W, b the merged weight and bias; the output relevance is the one logit (flatten/select route it)."""
    torch.manual_seed(1)
    if kind == "conv":
        lin, bn, x = nn.Conv2d(4, 29, 3, padding=1), nn.BatchNorm2d(29), torch.randn(2, 4, 2, 2)
        op = lambda x_, w, b: nn.functional.conv2d(x_, w, b, padding=1)  # noqa: E731
    else:
        lin, bn, x = nn.Linear(6, 29), nn.BatchNorm1d(29), torch.randn(2, 6)
        op = nn.functional.linear
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.3, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.normal_(0, 0.3)
    m = nn.Sequential(lin, bn, nn.Flatten()).eval().double()
    x = x.double()
    t = torch.tensor([5, 17])
    monkeypatch.setattr(linear, "MIN_BLOCK_BYTES", 0)
    counts = _block_counts(monkeypatch)
    got = _explain(m, x, t, "zplus")
    assert max(counts) >= 3
    with torch.no_grad():
        w, b = _merged(lin, bn)
    xp, xn = x.clamp(min=0).requires_grad_(), x.clamp(max=0).requires_grad_()
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    z = op(xp, wp, b.clamp(min=0)) + op(xn, wn, None)
    rel = torch.zeros_like(z.flatten(1))
    with torch.no_grad():
        out = m(x)
        rel[torch.arange(2), t] = out[torch.arange(2), t]
    rel = rel.view_as(z)
    s = rel / (z + 1e-6 * torch.where(z >= 0, 1.0, -1.0)).detach()
    gp, gn = torch.autograd.grad((z * s).sum(), [xp, xn])
    want = xp.detach() * gp + xn.detach() * gn
    assert want.abs().max() > 0
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def test_no_modified_copy_larger_than_a_block(monkeypatch):
    m, x, t = _wide()
    sizes: list[int] = []
    pos = linear._pos

    def spy(w):
        sizes.append(w.numel())
        return pos(w)

    monkeypatch.setattr(linear, "_pos", spy)
    monkeypatch.setattr(linear, "MIN_BLOCK_BYTES", 0)
    _explain(m, x, t, "zplus")
    biggest = max(p.numel() for p in m.parameters())
    assert sizes and max(sizes) < biggest / 2  # blocks of the (merged) weights, never a whole one


def test_rule_scratch_is_freed_when_the_rule_returns():
    """The per-rule memo holds the modified weights; a reference cycle through it would keep them until the
    garbage collector ran (it did: ResNet-50's z+ held every layer's clamped weights, ~100 MB)."""
    m, x, t = _wide()
    gc.collect()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        _explain(m, x, t, "epsilon_alpha2_beta1")
        gc.collect()
        leaked = [o for o in gc.garbage if isinstance(o, (linear._Params, relprop.rules.base.RuleContext))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert leaked == []


def test_nonnegative_inputs_known_from_the_graph(monkeypatch):
    """z+/alpha-beta skip their negative-input terms where the input has no negative value; the graph shows
    it after a ReLU (through pooling, means, views) without a pass over the values: the same bits."""
    m, x, t = _wide()
    seen: list[tuple[str, bool]] = []
    known = linear.nonnegative

    def spy(v):
        k = known(v)
        assert not (k and bool((v.tensor < 0).any()))  # never claims it for a value with a negative entry
        seen.append((v.producer.packet if v.producer is not None else "input", k))
        return k

    monkeypatch.setattr(linear, "nonnegative", spy)
    fast = _explain(m, x, t, "alpha_beta")
    # fc2 <- relu; fc1 <- t(mean(relu)) seen through views; c3 <- BN output (signed); c2 <- relu; c1 <- input
    assert [k for _, k in seen] == [True, True, False, True, False], seen
    monkeypatch.setattr(linear, "nonnegative", lambda v: False)
    assert torch.equal(fast, _explain(m, x, t, "alpha_beta"))
