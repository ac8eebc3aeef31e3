"""``Placed`` (the report's and CLI's --device/--dtype wrapper) is transparent to names: a recorded graph's
module scopes and parameter names, ``layers=``/``params=`` names and error locations are those of the user's
model called directly, not ``inner.``-prefixed."""

from __future__ import annotations

import pytest
import torch

import relprop
from relprop.report.device import Placed


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 5),
    ).eval()


def _names(expl) -> tuple[list[str], list[str]]:
    graph = expl.graph
    return sorted({n.module for n in graph.nodes}), sorted(graph.params)


def test_placed_graph_names_are_the_inner_models():
    x = torch.rand(2, 3, 6, 6)
    plain = _cnn()
    placed = Placed(_cnn().double(), torch.device("cpu"), torch.float64)
    ref = relprop.explain(plain.double(), x.double(), target=1, keep_graph=True, layers=["2"], params=True)
    got = relprop.explain(placed, x, target=1, keep_graph=True, layers=["2"], params=True)
    modules, params = _names(got)
    ref_modules, ref_params = _names(ref)
    # the same names; the one addition is the entry cast, recorded at the top level ('') where the call starts
    assert params == ref_params and modules == sorted({"", *ref_modules})
    assert {n.packet for n in got.graph.nodes if n.module == ""} == {"_to_copy"}
    assert not any(n.startswith("inner") for n in modules + params)
    assert set(got.layers) == {"2"} and set(got.params) == set(ref.params)
    assert torch.equal(got.layers["2"], ref.layers["2"])
    assert torch.equal(got.attributions, ref.attributions.float())  # the entry cast is exact here (f32 -> f64)
    assert dict(placed.named_parameters()).keys() == dict(plain.named_parameters()).keys()
    assert placed.get_submodule("4") is placed.inner[4] and placed.get_parameter("4.weight") is placed.inner[4].weight
    # state_dict keeps Module's keys and round-trips
    placed.load_state_dict(placed.state_dict())


def test_old_prefixed_names_are_unknown_and_warnings_name_the_users_modules():
    placed = Placed(_cnn().double(), torch.device("cpu"), torch.float64)
    with pytest.raises(ValueError, match=r"^layers: no module named 'inner\.2' ran in the forward pass"):
        relprop.explain(placed, torch.rand(2, 3, 6, 6), target=1, layers=["inner.2"])
    placed.train()
    with pytest.warns(UserWarning, match=r"training mode \(6 modules, e\.g\. '1'\)") as rec:
        relprop.explain(placed, torch.rand(2, 3, 6, 6), target=1)
    assert not any("inner" in str(w.message) for w in rec)


def test_a_plan_of_a_placed_model_replays_what_explain_gives():
    placed = Placed(_cnn().double(), torch.device("cpu"), torch.float64)
    x = torch.rand(2, 3, 6, 6)
    p = relprop.plan(placed, x, target=1)
    first = p.explain(x).attributions
    again = p.explain(x + 0.5).attributions
    assert p.replays >= 1 and p.rerecords == 0
    assert torch.equal(first, relprop.explain(placed, x, target=1, method="lrp").attributions)
    assert torch.equal(again, relprop.explain(placed, x + 0.5, target=1, method="lrp").attributions)
