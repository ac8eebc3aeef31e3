"""The gradient rule set reproduces ``torch.autograd.grad`` on every zoo model and on tricky hand-written ones.

This is the oracle for the trace: if aliasing, in-place writes, reused modules or routing are
recorded wrongly, the propagated gradient differs from autograd's.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relprop
from model_zoo import ZOO, build

# ------------------------------------------------------------------------------------- helpers
# The structure helpers are relprop's own (not what these tests check).
from relprop.methods.core import _leaves, _rebuild  # noqa: E402


def _call(model, inputs):
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def _score(output, target) -> torch.Tensor:
    if callable(target) and not isinstance(target, torch.Tensor):
        return target(output)
    out = output if isinstance(output, torch.Tensor) else output.logits
    idx = torch.as_tensor(target).long().reshape(-1).expand(out.shape[0])
    onehot = torch.zeros_like(out)
    onehot.scatter_(-1, idx.view(-1, *[1] * (out.dim() - 1)).expand(*out.shape[:-1], 1), 1.0)
    return (onehot * out).flatten(1).sum(1)


SKIP = "skip"


def reference_gradient(model, inputs, target, constant: tuple[str, ...] = ()) -> list:
    """``torch.autograd.grad`` of the summed target score, one entry per tensor leaf of ``inputs``.

    Float leaves get their gradient; ``input_ids`` get the gradient at the token-embedding output
    summed over features (relprop's convention for integer inputs feeding an embedding); other
    integer leaves (masks) get ``None``: they must come back as zeros. Float dict entries named in
    ``constant`` are not differentiated (autograd cannot, e.g. an SDPA mask): ``SKIP``.
    """
    leaves = _leaves(inputs)
    const_ids = {id(v) for k, v in inputs.items() if k in constant} if isinstance(inputs, Mapping) else set()
    fresh = [
        t.detach().clone().requires_grad_(True) if t.is_floating_point() and id(t) not in const_ids else t
        for t in leaves
    ]
    # Non-leaf copies, so a forward that writes its inputs in place stays legal.
    args = _rebuild(inputs, iter([t.clone() if t.is_floating_point() else t for t in fresh]))
    embedded = []
    hook = None
    if any(not t.is_floating_point() for t in leaves) and hasattr(model, "get_input_embeddings"):

        def grab(module, args, out):
            out = out.detach().requires_grad_(True)  # the embedding table may be frozen
            embedded.append(out)
            return out

        hook = model.get_input_embeddings().register_forward_hook(grab)
    try:
        with torch.enable_grad():
            score = _score(_call(model, args), target)
    finally:
        if hook is not None:
            hook.remove()
    wrt = [t for t in fresh if t.requires_grad] + embedded
    grads = torch.autograd.grad(score.sum(), wrt, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
    floats = iter(grads[: len(wrt) - len(embedded)])
    emb = iter(grads[len(wrt) - len(embedded) :])
    out = []
    for t in leaves:
        if id(t) in const_ids:
            out.append(SKIP)
        elif t.is_floating_point():
            out.append(next(floats))
        elif isinstance(inputs, Mapping) and any(v is t for k, v in inputs.items() if k == "input_ids"):
            out.append(next(emb).sum(-1))
        else:
            out.append(None)
    return out


def _flags(model: nn.Module):
    return [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()]


def check_gradient(model, inputs, target, constant: tuple[str, ...] = (), **explain_kwargs) -> relprop.Explanation:
    before = _flags(model)
    params_before = [p.detach().clone() for p in model.parameters()]
    expected = reference_gradient(model, inputs, target, constant)
    assert _flags(model) == before
    explanation = relprop.explain(model, inputs, target=target, method="gradient", **explain_kwargs)
    assert _flags(model) == before, "explain changed requires_grad or training flags"
    for p, q in zip(model.parameters(), params_before):
        assert torch.equal(p.detach(), q), "explain changed a parameter"
    got = _leaves(explanation.attributions)
    leaves = _leaves(inputs)
    assert len(got) == len(leaves)
    for i, (g, e, x) in enumerate(zip(got, expected, leaves)):
        assert g.shape == x.shape, (i, g.shape, x.shape)
        if e is SKIP:
            continue
        if e is None:
            assert torch.count_nonzero(g) == 0, f"input {i}: integer mask got a non-zero attribution"
            continue
        scale = max(e.abs().max().item(), 1e-12)
        torch.testing.assert_close(
            g.to(e.dtype), e, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"input {i} (max |grad| {scale:.3g}): {m}"
        )
    return explanation


# ----------------------------------------------------------------------------------------- zoo
@pytest.mark.parametrize("name", ZOO)
def test_zoo_gradient_matches_autograd(name):
    _, model, inputs, target = build(name)
    # Freeze a third of the parameters: explain must leave every flag as it found it.
    for i, p in enumerate(model.parameters()):
        if i % 3 == 0:
            p.requires_grad_(False)
    check_gradient(model, inputs, target)


# -------------------------------------------------------------------------- hand-written models
class InplaceReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 4)
        )

    def forward(self, x):
        return self.net(x)


class ModuleTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = nn.Tanh()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.act(self.lin(self.act(self.lin(x)))))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 4)

    def forward(self, x, y):
        z = x + y
        z = torch.exp(0.3 * z) * y
        h = torch.cat([z, x], dim=1)  # (b, 16)
        h = h.view(h.shape[0], 2, 8).transpose(1, 2).reshape(h.shape[0], 16)
        h = h.clone()
        h[:, 0] = x[:, 1] * y[:, 2]  # slice assignment of a value depending on the inputs
        h[:, 3:5] = 0.0  # slice assignment of a constant: the gradient there must vanish
        return self.lin(h)


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.a.weight.requires_grad_(False)
        self.b.requires_grad_(False)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


class Detach(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.sigmoid(self.a(x))
        return self.b(h) + self.c(h.detach()) * h.detach().sum(1, keepdim=True)


class InplaceArith(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        h.add_(x)
        h.mul_(torch.tanh(x))
        h.add_(1.0)
        h.mul_(2.0)
        return self.b(h)


class InplaceOnView(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(12, 4)

    def forward(self, x):
        h = self.a(x)
        before = h.view(h.shape[0], 3, 4)  # alias read after the writes below: must see the new content
        v = h[:, 2:6]
        v.mul_(x[:, :4])
        v.add_(x[:, 4:])
        h[:, 8:].mul_(3.0)
        F.relu(h[:, :2], inplace=True)
        out = self.b(h) + before.sum(1)[:, :4] * 0.5
        return out


class InplaceOnInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)

    def forward(self, x):
        x.mul_(2.0)
        x[:, :2].add_(1.0)
        return self.a(x) * x[:, :4]


class MaskedFill(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)
        self.register_buffer("mask", torch.tensor([True, False, False, True, False, False, False, True]))

    def forward(self, x):
        h = self.a(x)
        h.masked_fill_(self.mask, 0.0)
        h.masked_fill_(x < -0.5, -1.0)  # data-dependent mask
        scores = h.masked_fill(self.mask, float("-inf")).softmax(-1)
        return self.b(h * scores)


def _hand(name):
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    if name == "functional":
        return Functional().eval(), (x, torch.randn(2, 8)), 2
    model = {
        "inplace_relu": InplaceReLU,
        "module_twice": ModuleTwice,
        "frozen": Frozen,
        "detach": Detach,
        "inplace_arith": InplaceArith,
        "inplace_on_view": InplaceOnView,
        "inplace_on_input": InplaceOnInput,
        "masked_fill": MaskedFill,
    }[name]()
    return model.eval(), x, 1


HAND = [
    "inplace_relu",
    "module_twice",
    "functional",
    "frozen",
    "detach",
    "inplace_arith",
    "inplace_on_view",
    "inplace_on_input",
    "masked_fill",
]


@pytest.mark.parametrize("name", HAND)
def test_hand_written_gradient_matches_autograd(name):
    model, inputs, target = _hand(name)
    check_gradient(model, inputs, target)


def test_frozen_flags_restored():
    model, x, target = _hand("frozen")
    check_gradient(model, x, target)
    assert not model.a.weight.requires_grad and model.a.bias.requires_grad
    assert not any(p.requires_grad for p in model.b.parameters())


def test_detach_stops_gradient():
    model, x, _ = _hand("detach")
    # Only the detached branch reaches output 0 of `c`: zero c's contribution by targeting through b only.
    with torch.no_grad():
        model.b.weight.zero_()
    e = check_gradient(model, x, 1)
    assert torch.count_nonzero(e.attributions) == 0


def test_explain_under_no_grad_caller():
    model, x, target = _hand("inplace_relu")
    expected = reference_gradient(model, x, target)[0]
    with torch.no_grad():
        e = relprop.explain(model, x, target=target)
        assert not torch.is_grad_enabled()
    scale = expected.abs().max().item()
    torch.testing.assert_close(e.attributions, expected, rtol=1e-4, atol=1e-4 * scale)


def test_explain_under_inference_mode_caller():
    model, x, target = _hand("module_twice")
    expected = reference_gradient(model, x, target)[0]
    with torch.inference_mode():
        e = relprop.explain(model, x, target=target)
    scale = expected.abs().max().item()
    torch.testing.assert_close(e.attributions, expected, rtol=1e-4, atol=1e-4 * scale)


def test_training_flags_restored():
    model, x, target = _hand("module_twice")
    model.train()
    model.head.eval()
    check_gradient(model, x, target)
    assert model.training and model.lin.training and not model.head.training


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_float_attention_mask(attn):
    """Float masks are legal Hugging Face inputs; they get attributions but must not break SDPA."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    cfg._attn_implementation = attn
    model = BertForSequenceClassification(cfg).eval()
    emb = model.get_input_embeddings()(torch.randint(0, 50, (2, 5))).detach()
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0.0
    check_gradient(model, {"inputs_embeds": emb, "attention_mask": mask}, 1, constant=("attention_mask",))
