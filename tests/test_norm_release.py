"""The rule pass releases a merged batch norm's input once the merged node's rule is done.

``canonical.merge_batch_norms`` folds ``conv -> y -> batch_norm -> z`` into one node ``conv' -> z``: no node of
the merged graph reads or makes ``y`` any more (only the recompute of ``z`` does), so ``propagate._release``
never reached it and every such ``y`` stayed in memory to the end of the pass. ``_release`` now drops it with
the merged node (``node.meta["norm_input"]``), unless it is protected (wanted, kept, a seed or an output).

Checked here: when each rule runs, exactly the merged inputs of the nodes already done are released; the
relevance is the bits of the pass that releases nothing (``free=False``) and of ``keep_graph=True``; a kept
``y`` stays held.
"""

from __future__ import annotations

import pytest
import torch

import relprop
from model_zoo import resnet18_random_norms
from relprop.rules import named_composite


def _pass(composite: str, free: bool, spy: dict[int, set[int]] | None = None, keep_norm_input: bool = False):
    model = resnet18_random_norms(negative_scales=True)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 48, 48)
    comp = named_composite(composite)
    prepared = comp.prepare(relprop.trace(model, x))
    graph = prepared.graph
    merged = [n for n in graph.nodes if "norm_input" in n.meta]
    resolve = comp.resolver(prepared)

    def spying(node):
        rule = resolve(node)
        if rule is None or spy is None:
            return rule

        def run(ctx):  # what is held when this node's rule starts
            spy[node.index] = {m.index for m in merged if m.meta["norm_input"].data is not None}
            return rule(ctx)

        return run

    out = graph.output_values[0]
    seed = torch.zeros_like(out.tensor)
    seed[:, 1] = out.tensor[:, 1]
    keep = [merged[0].meta["norm_input"]] if keep_norm_input else []
    rel = relprop.propagate(prepared, spying, {out: seed}, graph.inputs, keep=keep, free=free)
    return rel[graph.inputs[0].index], merged


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus_flat", "gamma", "zplus"])
def test_merged_norm_input_released_after_its_node(composite):
    spy: dict[int, set[int]] = {}
    freed, merged = _pass(composite, True, spy)
    assert len(merged) == 20  # ResNet-18: every batch norm merges into its conv
    assert {m.index for m in merged} <= spy.keys()
    for k, held in spy.items():
        # nodes after k ran before it (reverse pass): their norm's input is gone; this node's and earlier ones' held
        assert held == {m.index for m in merged if m.index <= k}, k
    assert all(m.meta["norm_input"].data is None for m in merged)
    kept, _ = _pass(composite, False)
    assert torch.equal(freed, kept)


def test_kept_norm_input_stays_held():
    freed, merged = _pass("epsilon", True, keep_norm_input=True)
    assert merged[0].meta["norm_input"].data is not None  # protected: the caller asked for it
    assert all(m.meta["norm_input"].data is None for m in merged[1:])
    assert torch.equal(freed, _pass("epsilon", False)[0])


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus_flat", "gamma", "zplus"])
def test_explain_equals_kept_graph(composite):
    """``explain`` (releases) against ``keep_graph=True`` (releases nothing), ``layers=`` naming merged layers (by
    their norms: the merged node computes the norm's output; the convs' own outputs are refused, test_plan_norms)."""
    model = resnet18_random_norms(negative_scales=True)
    x = torch.randn(2, 3, 48, 48)
    layers = ["bn1", "layer1.0.bn2", "layer2.0.downsample.1"]
    a = relprop.explain(model, x, target=1, method="lrp", composite=composite, layers=layers)
    b = relprop.explain(model, x, target=1, method="lrp", composite=composite, layers=layers, keep_graph=True)
    assert torch.equal(a.attributions, b.attributions)
    for name in layers:
        assert torch.equal(a.layers[name], b.layers[name]) and a.layers[name].abs().sum() > 0
        assert torch.equal(a.activations[name], b.activations[name])
