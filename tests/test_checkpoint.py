"""Activation checkpointing (``torch.utils.checkpoint``) is the identity wrapper around its function:
relprop records the function's ops as if there were no checkpoint, in both reentrant modes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import relprop


class Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return x + self.drop(torch.relu(self.fc(x)))


class Net(nn.Module):
    def __init__(self, mode: bool | None = None, d: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, 3)
        self.mode = mode  # None: no checkpoint; True/False: use_reentrant

    def forward(self, x):
        for b in self.blocks:
            x = b(x) if self.mode is None else checkpoint(b, x, use_reentrant=self.mode)
        return self.head(x)


def _pair(mode: bool):
    torch.manual_seed(0)
    plain = Net(None).eval()
    ck = copy.deepcopy(plain)
    ck.mode = mode
    return plain, ck


def _autograd(model, x, target):
    x = x.clone().requires_grad_(True)
    model(x)[:, target].sum().backward()  # (reentrant checkpoint refuses torch.autograd.grad)
    model.zero_grad()
    return x.grad


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_model_explained_as_without_checkpoint(reentrant):
    plain, ck = _pair(reentrant)
    x = torch.randn(4, 8)
    grad = relprop.explain(ck, x, target=1, method="gradient").attributions
    torch.testing.assert_close(grad, _autograd(plain, x, 1))
    torch.testing.assert_close(grad, _autograd(ck, x, 1))
    want = relprop.explain(plain, x, target=1, method="lrp", composite="epsilon").attributions
    got = relprop.explain(ck, x, target=1, method="lrp", composite="epsilon").attributions
    assert torch.equal(got, want)
    # No region stands for the checkpoint: its ops are recorded in grad mode.
    graph = relprop.trace(ck, x)
    assert not [n for n in graph.nodes if n.packet == "CheckpointFunction"]


def test_reentrant_checkpoint_records_the_grad_mode_kernels():
    """Under its no-grad forward a TransformerEncoderLayer takes a fused inference-only kernel; the
    re-run with grad enabled records the ops of the ordinary forward."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()

    class Wrapped(nn.Module):
        def __init__(self, mode):
            super().__init__()
            self.layer, self.head, self.mode = layer, nn.Linear(8, 3), mode

        def forward(self, x):
            h = self.layer(x) if self.mode is None else checkpoint(self.layer, x, use_reentrant=True)
            return self.head(h.mean(1))

    torch.manual_seed(1)
    plain = Wrapped(None).eval()
    ck = Wrapped(True).eval()
    ck.head = plain.head
    x = torch.randn(2, 5, 8)
    got = relprop.explain(ck, x, target=0, method="gradient").attributions
    torch.testing.assert_close(got, _autograd(plain, x, 0), rtol=1e-4, atol=1e-5)
    a = relprop.explain(ck, x, target=0, method="lrp", composite="epsilon").attributions
    b = relprop.explain(plain, x, target=0, method="lrp", composite="epsilon").attributions
    torch.testing.assert_close(a, b)


def test_reentrant_checkpoint_in_training_mode_records_the_drawn_masks():
    """Dropout inside the checkpoint: the re-run restores the RNG state (preserve_rng_state), so the
    recorded masks are those of the forward that ran."""
    plain, ck = _pair(True)
    plain.train()
    ck.train()
    x = torch.randn(6, 8)
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="training mode"):
        got = relprop.explain(ck, x, target=2, method="gradient")
    torch.manual_seed(5)
    torch.testing.assert_close(got.attributions, _autograd(ck, x, 2))
    torch.manual_seed(5)
    torch.testing.assert_close(got.output, plain(x))  # the same masks as the same model without checkpoint


def test_reentrant_checkpoint_without_preserved_rng_is_refused():
    class Random(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = Block(), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(checkpoint(self.block, x, use_reentrant=True, preserve_rng_state=False))

    model = Random().train()
    with pytest.warns(UserWarning, match="training mode"), pytest.raises(relprop.TraceError, match="checkpoint"):
        relprop.trace(model, torch.randn(64, 8))


def test_unknown_custom_function_is_still_a_region():
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(Double.apply(x))

    m = M().eval()
    x = torch.randn(3, 4)
    graph = relprop.trace(m, x)
    assert [n.packet for n in graph.nodes if n.region is not None] == ["Double"]
    grad = relprop.explain(m, x, target=0, method="gradient").attributions
    torch.testing.assert_close(grad, _autograd(m, x, 0))
