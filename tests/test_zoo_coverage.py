"""Every op of every zoo model gets a rule, and the *right* rule, under the LRP composites.

"Has a rule" is relprop's own bookkeeping; what a wrong classification would break is checked against
an independent oracle: the PyTorch module each op ran in. An op recorded inside ``nn.Conv2d`` must get
the composite's conv rule, inside ``nn.Linear`` (or GPT-2's ``Conv1D``) its dense rule, inside an
activation module (``nn.GELU``, ``nn.SiLU``, Hugging Face's ``NewGELUActivation``...) the identity rule,
inside ``nn.MaxPool2d`` routing, inside an average pool the proportional rule, inside a norm module the
norm rule; softmax gets the softmax rule, a product of two activations (attention scores) the uniform
product rule. Ops off every input-to-output path carry no relevance and are not checked.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import pytest
import torch
from torch import nn

import relprop
from model_zoo import ZOO, build

DENSE_MODULES = (nn.Linear,)
DENSE_MODULE_NAMES = {"Conv1D"}  # transformers' GPT-2 projection (x @ W + b)
DENSE_PACKETS = {"addmm", "mm", "bmm", "matmul", "linear", "baddbmm", "addmv", "mv"}
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid)
ACTIVATION_MODULE_NAMES = {
    "GELUActivation",
    "NewGELUActivation",
    "FastGELUActivation",
    "QuickGELUActivation",
    "SiLUActivation",
    "GELUTanh",
    "PytorchGELUTanh",
    "ClippedGELUActivation",
    "AccurateGELUActivation",
}
AVGPOOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
SOFTMAX_PACKETS = {"_softmax", "softmax", "_safe_softmax"}

#: composite -> (conv/dense rule, proportional rule) as the composite's rules print themselves.
EXPECTED = {
    "epsilon": ("Epsilon(epsilon=1e-06)", "Proportional(stabilizer=1e-06)"),
    "attnlrp": ("Epsilon(epsilon=0.0)", "Proportional(stabilizer=0.0)"),
}

#: Activations written as several element-wise ops (GPT-2/T5/Pix2Struct ``NewGELUActivation``, CLIP's
#: ``QuickGELUActivation``) must get the identity rule as one element-wise region (issue 8 finding 1): before
#: the region pass their inner multiply/add got product/sum rules, which this test reports.


@functools.lru_cache(maxsize=2)
def _graph(name):
    _, model, inputs, _ = build(name)
    if isinstance(inputs, Mapping):
        return relprop.trace(model, **inputs)
    return relprop.trace(model, inputs)


def _is(node, classes, names=frozenset()) -> bool:
    t = node.module_type
    return t is not None and (issubclass(t, classes) or t.__name__ in names)


def expected_rule(node, composite: str) -> str | tuple[str, ...] | None:
    """The rule (or accepted rule prefixes) the module oracle demands for ``node``; None: no demand."""
    linear, proportional = EXPECTED[composite]
    acts = [i for i in node.activation_inputs() if node.inputs[i].is_float]
    if node.packet == "convolution" and _is(node, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return linear
    if node.packet in DENSE_PACKETS and len(acts) == 1 and _is(node, DENSE_MODULES, DENSE_MODULE_NAMES):
        return linear
    if node.packet in DENSE_PACKETS and len(acts) >= 2:
        return ("Uniform(",)
    if node.packet in SOFTMAX_PACKETS:
        return "SoftmaxRule()"
    if _is(node, ACTIVATION_MODULES, ACTIVATION_MODULE_NAMES):
        return "Identity()"
    if _is(node, MAXPOOL_MODULES) and node.packet.startswith("max_pool"):
        return "Route()"
    if _is(node, AVGPOOL_MODULES) and ("avg_pool" in node.packet or node.packet == "mean"):
        return proportional
    if _is(node, (nn.BatchNorm2d, nn.BatchNorm1d)) and "batch_norm" in node.packet:
        return ("Norm(", "ConstantScale(")
    if _is(node, (nn.LayerNorm, nn.GroupNorm)) and "norm" in node.packet:
        return ("Norm(", "ConstantScale(")
    return None


def _reaches_output(graph) -> set[int]:
    """Indices of the nodes some output value depends on (walking producers back from the outputs)."""
    seen: set[int] = set()
    stack = [v.producer for v in graph.output_values if v is not None and v.producer is not None]
    while stack:
        node = stack.pop()
        if node.index in seen:
            continue
        seen.add(node.index)
        stack.extend(v.producer for v in node.inputs if v.producer is not None)
    return seen


@pytest.mark.parametrize("composite", list(EXPECTED))
@pytest.mark.parametrize("name", ZOO)
def test_zoo_rules_match_module_oracle(name, composite):
    comp = relprop.named_composite(composite)
    prepared = comp.prepare(_graph(name))
    graph = prepared.graph
    unsupported, wrong, checked = set(), set(), 0
    useful = _reaches_output(graph)
    for node in graph.nodes:
        if not any(v.is_activation and v.is_float for v in node.inputs) or node.index not in useful:
            continue  # off every input-to-output path (e.g. autograd's detach of a saved value): no relevance
        rule = comp.rule_for(prepared, node)
        if rule is None:
            unsupported.add(f"{node.op_name} in '{node.module}'")
            continue
        want = expected_rule(node, composite)
        if want is None:
            continue
        checked += 1
        got = repr(rule)
        ok = got.startswith(want) if isinstance(want, tuple) else got == want
        if not ok:
            wrong.add(
                f"{node.op_name} in '{node.module}' ({node.module_type.__name__ if node.module_type else '-'})"
                f": {got}, expected {want}"
            )
    assert not unsupported, f"{name}/{composite}: no rule for {sorted(unsupported)}"
    assert checked > 0, f"{name}: the oracle recognised no op (module types not recorded?)"
    assert not wrong, f"{name}/{composite}: wrong rules:\n  " + "\n  ".join(sorted(wrong))


def test_oracle_recognises_the_families():
    """The oracle itself: a small model hits every branch and each demand is what the composite gives."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
        nn.Softmax(-1),
    ).eval()
    comp = relprop.named_composite("epsilon")
    graph = comp.prepare(relprop.trace(model, torch.randn(2, 3, 8, 8))).graph
    demands = {n.packet: expected_rule(n, "epsilon") for n in graph.nodes}
    assert demands["convolution"] == "Epsilon(epsilon=1e-06)"
    assert demands["addmm"] == "Epsilon(epsilon=1e-06)"
    assert demands["relu"] == demands["gelu"] == "Identity()"
    assert demands["_softmax"] == "SoftmaxRule()"
    assert any(p.startswith("max_pool") and d == "Route()" for p, d in demands.items())
    assert "_adaptive_avg_pool2d" in demands or "mean" in demands
