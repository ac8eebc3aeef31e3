"""Property-based tests: random programs over the ATen ops relprop knows (tests/fuzz_programs.py).

Properties, each against an oracle that relprop does not compute itself:

* ``gradient`` equals ``torch.autograd.grad`` on every program (linear/conv/matmul/bmm, element-wise
  functions, reductions, views, in-place and metadata-only in-place ops, indexing and scatter,
  cat/stack/split, softmax, norms);
* LRP-0 on bias-free ReLU programs (linear, conv, ReLU, max/avg-pool, sums of branches, views, in-place
  and metadata-only in-place ops, indexing, writes, routing ops, cat/stack/split: all positively
  homogeneous) equals gradient x input element by element, so it conserves the target logit (Euler's
  theorem); AttnLRP and CP-LRP reduce to LRP-0 there;
* every named composite gives finite relevance or refuses with one of relprop's error classes, never a
  raw internal error.

CI runs the derandomised ``relprop-ci`` profile (tests/conftest.py): the same examples every run.
``RELPROP_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py -k "not can_draw"`` runs a long randomised
search (about 30 min on 2 cores); a failure prints the minimal program, to be kept in
tests/test_fuzz_regressions.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import Phase, assume, find, given, settings
from hypothesis import strategies as st

import relprop
from fuzz_programs import (
    CLASSES,
    KEYS,
    KNOWN_FAILING,
    RELPROP_ERRORS,
    Program,
    example_input,
    op_key,
    programs,
    valid_under_autograd,
)
from relprop.rules.composites import NAMES

pytestmark = pytest.mark.fuzz

_LONG = bool(os.environ.get("RELPROP_FUZZ_EXAMPLES"))


def _examples(ci: int):
    """CI example count for this property; the long run uses the profile's (RELPROP_FUZZ_EXAMPLES)."""
    return settings() if _LONG else settings(max_examples=ci)


def _autograd(model, x, target):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    (g,) = torch.autograd.grad(out[:, target].sum(), x, allow_unused=True)
    return out.detach(), (torch.zeros_like(x) if g is None else g)


def check_gradient(steps, in_shape, target: int) -> None:
    model = Program(steps, in_shape)
    x = example_input(in_shape)
    out, ref = _autograd(model, x, target)
    e = relprop.explain(model, x, target=target, method="gradient")
    scale = max(ref.abs().max().item(), 1e-12)
    torch.testing.assert_close(e.attributions, ref, rtol=1e-7, atol=1e-9 * scale)
    torch.testing.assert_close(e.score, out[:, target], rtol=1e-12, atol=0.0)


def check_lrp0(steps, in_shape, target: int) -> None:
    model = Program(steps, in_shape)
    x = example_input(in_shape)
    out, grad = _autograd(model, x, target)
    ref = x * grad
    scale = max(ref.abs().max().item(), out.abs().max().item(), 1e-12)
    for composite in ("lrp0", "attnlrp", "cp_lrp"):
        r = relprop.explain(model, x, target=target, method="lrp", composite=composite).attributions
        torch.testing.assert_close(r, ref, rtol=1e-6, atol=1e-8 * scale, msg=lambda m: f"{composite}: {m}")
        # Summed over the batch: a program may mix samples (t_ on a batch-by-batch value), relprop
        # explains the sum of the per-sample target logits.
        torch.testing.assert_close(
            r.sum(), out[:, target].sum(), rtol=1e-6, atol=1e-8 * scale, msg=lambda m: f"{composite} conservation: {m}"
        )


def check_composites(steps, in_shape, target: int, names=NAMES) -> dict[str, str]:
    """Every composite: finite relevance, or a relprop error. Returns what each did (for reports)."""
    model = Program(steps, in_shape)
    x = example_input(in_shape)
    seen = {}
    for name in names:
        try:
            r = relprop.explain(model, x, target=target, method="lrp", composite=name).attributions
        except RELPROP_ERRORS as e:
            # A rule that returned a wrongly shaped tensor is relprop's own bug, not a refusal.
            assert "relevance of shape" not in str(e), f"{name}: internal error {e}"
            seen[name] = f"refused: {type(e).__name__}"
            continue
        assert torch.isfinite(r).all(), f"{name}: non-finite relevance {r}"
        seen[name] = "ok"
    return seen


@pytest.mark.slow
@_examples(250)
@given(prog=programs(), target=st.integers(0, CLASSES - 1))
def test_gradient_equals_autograd(prog, target):
    steps, in_shape = prog
    assume(valid_under_autograd(steps, in_shape))
    check_gradient(steps, in_shape, target)


@pytest.mark.slow
@_examples(250)
@given(prog=programs(relu_net=True), target=st.integers(0, CLASSES - 1))
def test_lrp0_is_gradient_times_input_on_relu_nets(prog, target):
    steps, in_shape = prog
    assume(valid_under_autograd(steps, in_shape))
    check_lrp0(steps, in_shape, target)


@pytest.mark.slow
@_examples(100)
@given(prog=programs(max_steps=6), target=st.integers(0, CLASSES - 1))
def test_every_composite_is_finite_or_refuses(prog, target):
    steps, in_shape = prog
    assume(valid_under_autograd(steps, in_shape))
    check_composites(steps, in_shape, target)


@pytest.mark.parametrize("key", sorted(set(KEYS) - set(KNOWN_FAILING)))
def test_generator_can_draw(key):
    """Each op variant the generator declares can really be drawn (an option that never fits any shape
    would silently drop the op from every property above): search for a program that contains it."""
    helpers = {"relu", "linear", "view.unsqueeze", "view.flatten", "conv"}
    find(
        programs(keys=frozenset(helpers | {key}), max_steps=4),
        lambda prog: key in {op_key(s) for s in prog[0]},
        settings=settings(max_examples=300, derandomize=True, database=None, phases=[Phase.generate]),
    )
