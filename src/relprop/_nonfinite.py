"""Find out why a reverse pass produced NaN or Inf, for the message of :class:`relprop.PropagationError`.

Checking every node's result during every pass would cost a full read of each relevance tensor; the
pass checks only what it returns. When that check fails, this module finds the cause (once, on the
failure path): it looks at the model's parameters and inputs, then at the forward activations, then
re-runs the reverse pass with a check after every rule, and names the first op whose rule turned
finite relevance into NaN/Inf, with what was special about it (exact zeros in the denominator, a
non-finite activation...). "Try a larger epsilon" is given only where it can help.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .graph import Graph, Node, Value, recompute


class _Found(Exception):
    def __init__(self, node: Node, rule: Any, relevance: list, result: list):
        super().__init__()
        self.node, self.rule, self.relevance, self.result = node, rule, relevance, result


def _bad(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all()


def _where(node: Node) -> str:
    return f"{node.op_name} (node #{node.index}) in {node.location}"


def _leaf_name(v: Value) -> str:
    name = v.name or f"%{v.index}"
    for prefix in ("param:", "buffer:"):
        name = name.removeprefix(prefix)
    if v.kind == "param":
        return f"the model's parameter '{name}'"
    if v.kind == "buffer":
        return f"the model's buffer '{name}'"
    if v.kind == "input":
        return f"the input {name}"
    return f"the constant {name} (a tensor the model closes over)"


def _restore(graph: Graph) -> None:
    """Recompute released forward data in graph order (each node's inputs are then present: no recursion)."""
    for node in graph.nodes:
        for v in node.outputs:
            if v is not None and v.data is None and v.producer is not None:
                recompute(v)
                break


def non_finite_message(graph: Graph, index: int, method: str, rerun: Callable[[Callable], Any]) -> str:
    """The message for non-finite ``method`` relevance at value ``%index``.

    ``rerun(hook)`` repeats the reverse pass (without the final check, without releasing data) calling
    ``hook(node, relevance, result, rule)`` after every rule.
    """
    head = f"non-finite {method} at value %{index}"
    for v in graph.values:
        if v.producer is None and v.data is not None and _bad(v.data):
            return (
                f"{head}: {_leaf_name(v)} already holds NaN or infinite values, so nothing computed from it is "
                "finite; check the model's weights (and buffers such as batch-norm statistics)"
            )
    try:
        _restore(graph)
    except Exception as err:  # diagnosis only: never hide the original problem behind another one
        return f"{head} (the forward data needed to find the cause could not be recomputed: {err})"
    # A non-finite forward value is the cause only if it reaches the output: -inf masked scores, log(0) in T5's
    # relative-position buckets are legitimate where a later softmax, clamp or min absorbs them.
    reaches_output = any(_bad(v.data) for v in graph.output_values if v.data is not None)
    for node in graph.nodes if reaches_output else ():
        for ov in node.outputs:
            if ov is not None and ov.data is not None and _bad(ov.data):
                return (
                    f"{head}: the forward pass itself produced non-finite values at {_where(node)}, so the "
                    "explanation cannot be finite (an overflow in float16/bfloat16? a log or division of 0 in "
                    "the model?); the inputs and parameters are finite"
                )

    def hook(node, relevance, result, rule):
        if any(_bad(r) for r in result):
            raise _Found(node, rule, relevance, result)

    try:
        rerun(hook)
    except _Found as found:
        return _rule_message(head, found, method)
    return (
        f"{head}: every rule's result was finite, so the relevance overflowed where several contributions "
        "were added up (values near the largest float); explain in float64, or with a larger epsilon"
    )


def _rule_message(head: str, found: _Found, method: str) -> str:
    node, rule = found.node, found.rule
    arriving = [r for r in found.relevance if r is not None]
    if any(_bad(r) for r in arriving):  # cannot happen at the first bad result, but say so if it does
        return f"{head}: non-finite relevance arrived at {_where(node)}"
    reasons = []
    inf_input = False
    for i, v in enumerate(node.inputs):
        if v.data is not None and v.data.is_floating_point() and torch.isinf(v.data).any():
            reasons.append(
                f"its input {i} holds +-inf at {int(torch.isinf(v.data).sum())} positions (the model's output is "
                "finite: a masked score or log(0) that a later op absorbs), where this rule is not defined"
            )
            inf_input = True
            break
    out = node.outputs[0].data if node.outputs and node.outputs[0] is not None else None
    # Only LRP's rules divide by the op's output; DeepLIFT's divide by the input's change from the reference.
    secant = isinstance(getattr(rule, "eps", None), float) and method == "deeplift"
    if secant:
        reasons.append(
            f"the rule divides by the change of the input from the reference, x - x0, wherever |x - x0| >= "
            f"eps={rule.eps!r}"
        )
    elif out is not None and (out.is_floating_point() or out.is_complex()) and arriving:
        r = arriving[0]
        if r.shape == out.shape:
            tiny = torch.finfo(out.dtype).tiny if out.is_floating_point() else 0.0
            small = out.abs() <= tiny
            if small.any():
                reached = int((small & (r != 0)).sum())
                reasons.append(
                    f"its output is exactly 0 at {int(small.sum())} positions ({reached} of them receive relevance): "
                    "a rule that divides by the output gets x/0 or 0/0 there"
                )
            elif r.abs().max() > 0:
                ratio = (r.abs() / out.abs().clamp_min(tiny)).max()
                if not torch.isfinite(ratio) or ratio > torch.finfo(out.dtype).max / 1e6:
                    reasons.append("its output is tiny where large relevance arrives (a division by ~0)")
    stab = [f"{k}={getattr(rule, k)!r}" for k in ("epsilon", "stabilizer") if isinstance(getattr(rule, k, None), float)]
    if inf_input:
        fix = (
            f"report it with the model (the rule {rule!r} should take its limit at +-inf), or choose another rule "
            f"for this op (rules={{'{node.packet}': ...}}), or mask with torch.finfo(dtype).min instead of -inf"
        )
    elif secant:
        fix = "give DeepLIFT a larger eps= (below it the rule takes the gradient at x instead of the secant)"
    elif reasons and stab:
        fix = (
            f"the rule's {', '.join(stab)} is too small for this op: give it a larger one (explain's epsilon=/stabilizer= "
            f"options, or rules={{'{node.packet}': ...}} for this op)"
        )
    elif reasons:
        fix = f"the rule has no stabiliser: choose another rule for this op (rules={{'{node.packet}': ...}})"
    else:
        fix = (
            f"the rule {rule!r} is not defined for these values; report it, or choose another rule for this op "
            f"(rules={{'{node.packet}': ...}})"
        )
        reasons.append("the inputs, weights and arriving relevance are all finite")
    return f"{head}: the {method} rule {rule!r} at {_where(node)} produced the first non-finite value: {'; '.join(reasons)}. Fix: {fix}"
