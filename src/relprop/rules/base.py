"""What a rule is, what it sees, and the registry that classifies ATen ops into families.

A rule is a function ``rule(ctx) -> list[Tensor | None]``: given the relevance (or gradient) that
arrived at a node's outputs, it returns one tensor per node input (``None`` where nothing flows).
Every backward method (gradient, LRP variants, DeepLIFT, guided backprop...) is a rule set, i.e. a
mapping from nodes to such functions, propagated by :mod:`relprop.propagate` over one graph.

Ops are grouped into *families* (``conv``, ``dense``, ``sum``, ``product``, ``nonlinear``,
``softmax``, ``norm``, ``routing``, ``attention``, ``stop``, ``constant``) so that a rule set can
say "epsilon on every dense op" once instead of listing ATen overloads. Each rules module
registers its ops next to its rules with :func:`register_family`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..graph import Node, Value

Rule = Callable[["RuleContext"], Sequence["torch.Tensor | None"]]

#: packet name (``relu``, ``convolution``...) -> family name or ``classifier(node) -> family``.
_FAMILIES: dict[str, str | Callable[[Node], str | None]] = {}


def register_family(family: str | Callable[[Node], str | None], *packets: str) -> None:
    """Declare that the ATen op packets ``packets`` (in-place twins included) belong to ``family``."""
    for p in packets:
        _FAMILIES[p] = family


def family_of(node: Node) -> str | None:
    """The family of ``node`` (``None`` if no rules module knows the op)."""
    if "family" in node.meta:
        return node.meta["family"]
    region = node.region
    if region is not None and region.family is not None:
        node.meta["family"] = region.family
        return region.family
    fam = _FAMILIES.get(node.packet)
    if fam is None and node.packet.endswith("_"):
        fam = _FAMILIES.get(node.packet[:-1])
    if callable(fam):
        fam = fam(node)
    node.meta["family"] = fam
    return fam


def known_packets() -> list[str]:
    return sorted(_FAMILIES)


class NoRuleError(LookupError):
    """No rule is registered for an op the propagation has to pass through."""

    def __init__(self, node: Node, method: str):
        where = node.module or "<top level>"
        mtype = f" ({node.module_type.__name__})" if node.module_type is not None else ""
        super().__init__(
            f"no {method} rule for operation {node.op_name} in module '{where}'{mtype}. "
            f"Register one with relprop.register_rule('{node.packet}', rule, family=...) or pass "
            f"rules={{'{node.packet}': rule}} to explain(); to accept an approximation, pass "
            f"fallback='gradient' (routes relevance through the op's gradient and warns)."
        )
        self.node = node


@dataclass
class RuleContext:
    """Everything a rule may read about one node during the reverse pass."""

    node: Node
    #: Relevance (or gradient) arriving at each output; ``None`` where nothing arrived.
    relevance: list[torch.Tensor | None]
    #: For each input: does the caller want something to flow into it?
    needs: list[bool]
    options: dict[str, Any] = field(default_factory=dict)
    #: Scratch space for one rule call (e.g. modified weights shared by a rule's forward and VJP).
    memo: dict[Any, Any] = field(default_factory=dict)

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [v.tensor for v in self.node.inputs]

    @property
    def outputs(self) -> list[torch.Tensor | None]:
        return [None if v is None else v.tensor for v in self.node.outputs]

    @property
    def out(self) -> torch.Tensor:
        return self.node.outputs[0].tensor

    @property
    def rel(self) -> torch.Tensor:
        """Relevance at the first output (zeros if none arrived there)."""
        r = self.relevance[0]
        return r if r is not None else torch.zeros_like(self.out)

    def activation_inputs(self) -> list[int]:
        return [i for i in self.node.activation_inputs() if i not in self.node.meta.get("constant_operands", ())]

    def vjp(
        self,
        grads: Sequence[torch.Tensor | None],
        tensors: Sequence[torch.Tensor] | None = None,
        wrt: Sequence[int] | None = None,
    ) -> list[torch.Tensor | None]:
        """Vector-Jacobian product of the op (optionally re-run on other ``tensors``) w.r.t. inputs ``wrt``."""
        return vjp(self.node, grads, tensors, wrt if wrt is not None else [i for i, n in enumerate(self.needs) if n])


def _float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


#: Ops whose autograd formula is missing or wrong for our use: packet -> vjp(node, grads, tensors, wrt).
_VJP: dict[str, Callable[..., list]] = {}


def vjp_override(*packets: str):
    def deco(fn):
        for p in packets:
            _VJP[p] = fn
        return fn

    return deco


def vjp(
    node: Node, grads: Sequence[torch.Tensor | None], tensors: Sequence[torch.Tensor] | None, wrt: Sequence[int]
) -> list[torch.Tensor | None]:
    """Generic VJP: re-run the op under autograd on detached inputs and differentiate."""
    tensors = list(tensors) if tensors is not None else [v.tensor for v in node.inputs]
    result: list[torch.Tensor | None] = [None] * len(tensors)
    wrt = [i for i in wrt if _float(tensors[i])]
    if not wrt:
        return result
    region = node.region
    override = region.vjp if region is not None and region.vjp is not None else _VJP.get(node.packet)
    if override is not None:
        return override(node, grads, tensors, wrt)
    return _autograd_vjp(node, grads, tensors, wrt)


def _autograd_vjp(node: Node, grads, tensors: list, wrt: Sequence[int]) -> list[torch.Tensor | None]:
    result: list[torch.Tensor | None] = [None] * len(tensors)
    if not wrt:
        return result
    leaves = {}
    run_inputs = []
    for i, t in enumerate(tensors):
        if i in wrt and i not in leaves:
            # The same Value may appear twice (x * x): one leaf per position keeps both gradients.
            leaf = t.detach().requires_grad_(True)
            leaves[i] = leaf
            run_inputs.append(leaf)
        else:
            run_inputs.append(t.detach() if isinstance(t, torch.Tensor) else t)
    with torch.inference_mode(False), torch.enable_grad():
        out = node.run(run_inputs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
    if not pairs:
        for i in wrt:
            result[i] = torch.zeros_like(tensors[i])
        return result
    order = list(leaves)
    got = torch.autograd.grad(
        [o for o, _ in pairs], [leaves[i] for i in order], [g for _, g in pairs], allow_unused=True
    )
    for i, g in zip(order, got):
        result[i] = g if g is not None else torch.zeros_like(tensors[i])
    return result


@vjp_override("as_strided_scatter")
def _as_strided_scatter_vjp(node, grads, tensors, wrt):
    # PyTorch's formula w.r.t. ``self`` keeps the written window and drops the rest (pytorch#77128).
    g = grads[0]
    res: list = [None] * len(tensors)
    size, stride, offset = node.arg(2), node.arg(3), node.arg(4)
    if g is None:
        return [torch.zeros_like(t) if i in wrt else None for i, t in enumerate(tensors)]
    if 0 in wrt:
        res[0] = g.as_strided_scatter(torch.zeros_like(tensors[1]), size, stride, offset)
    if 1 in wrt:
        res[1] = g.as_strided(size, stride, offset).clone()
    return res


@vjp_override("copy")
def _copy_vjp(node, grads, tensors, wrt):
    """``copy(self, src)`` returns ``src`` broadcast into ``self``'s shape and dtype (no autograd formula)."""
    g = grads[0]
    res: list = [None] * len(tensors)
    if 0 in wrt:
        res[0] = torch.zeros_like(tensors[0])
    if 1 in wrt:
        src = tensors[1]
        res[1] = torch.zeros_like(src) if g is None else g.sum_to_size(src.shape).to(src.dtype)
    return res


@vjp_override("add", "sub")
def _add_vjp(node, grads, tensors, wrt):
    """``a +/- b``: the VJP is ``(g, +/-g)`` reduced to each operand's shape; no re-run needed."""
    if len(tensors) != 2 or len(node.args) != 2 or node.kwargs or not all(isinstance(a, Value) for a in node.args):
        return _autograd_vjp(node, grads, tensors, wrt)
    g = grads[0]
    res: list = [None] * 2
    for i in wrt:
        gi = g if (i == 0 or node.packet == "add") else -g
        res[i] = gi.sum_to_size(tensors[i].shape) if gi.shape != tensors[i].shape else gi
    return res


_SDPA = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


@vjp_override(*_SDPA)
def _sdpa_vjp(node, grads, tensors, wrt):
    """Fused attention kernels have no derivative for the mask: it gets none (as an attention mask should)."""
    res = _autograd_vjp(node, grads, tensors, [i for i in wrt if i < 3])
    for i in wrt:
        if i >= 3:
            res[i] = torch.zeros_like(tensors[i])
    return res
