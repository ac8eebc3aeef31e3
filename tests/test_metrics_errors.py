"""Bad input raises ValueError naming the argument."""

import pytest
import torch

from relprop import metrics as M


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    x = torch.rand(2, 3, 8, 8)
    a = torch.randn(2, 3, 8, 8)
    return model, x, a


def test_attribution_shape_mismatch(setup):
    model, x, _ = setup
    with pytest.raises(ValueError, match="attributions.*shape"):
        M.region_perturbation(model, x, torch.randn(2, 3, 8, 7), [0, 1], patch_size=4)
    with pytest.raises(ValueError, match="attributions"):
        M.pixel_flipping(model, x, torch.randn(3, 3, 8, 8), [0, 1])
    with pytest.raises(ValueError, match="attributions"):
        M.conservation(model, x, torch.randn(2, 2, 8, 8), 0)


def test_channel_reduced_attributions_are_accepted(setup):
    model, x, a = setup
    r1 = M.region_perturbation(model, x, a.sum(1), [0, 1], patch_size=4)
    r2 = M.region_perturbation(model, x, a.sum(1, keepdim=True), [0, 1], patch_size=4)
    torch.testing.assert_close(r1.scores, r2.scores)


def test_targets_out_of_range(setup):
    model, x, a = setup
    with pytest.raises(ValueError, match=r"target.*\[0, 3\]"):
        M.region_perturbation(model, x, a, [0, 4], patch_size=4)
    with pytest.raises(ValueError, match="target"):
        M.pixel_flipping(model, x, a, -1, features_in_step=64)
    with pytest.raises(ValueError, match="target.*one class index per sample"):
        M.abpc(model, x, a, [0, 1, 2], patch_size=4)
    with pytest.raises(ValueError, match="target"):
        M.conservation(model, x, a, 7)
    with pytest.raises(ValueError, match="target"):
        M.model_parameter_randomisation(model, x, lambda m, xx, t: xx, 9)


def test_nan_attributions(setup):
    model, x, a = setup
    bad = a.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="attributions.*NaN"):
        M.region_perturbation(model, x, bad, [0, 1], patch_size=4)
    with pytest.raises(ValueError, match="attributions.*NaN"):
        M.sparseness(bad)
    with pytest.raises(ValueError, match="explain_fn.*NaN"):
        M.class_sensitivity(model, x, lambda m, xx, t: torch.full_like(xx, float("nan")))


def test_patch_size_not_dividing(setup):
    model, x, a = setup
    with pytest.raises(ValueError, match="patch_size=3 must divide"):
        M.region_perturbation(model, x, a, [0, 1], patch_size=3)
    with pytest.raises(ValueError, match="patch_size"):
        M.perturbation_curve(model, x, a, [0, 1], patch_size=5)
    # explicit opt-in to Quantus-style padding works
    assert M.region_perturbation(model, x, a, [0, 1], patch_size=3, pad=True).scores.shape == (2, 9)


def test_integer_inputs(setup):
    model, x, a = setup
    xi = (x * 255).to(torch.uint8)
    with pytest.raises(ValueError, match="inputs must be a floating-point"):
        M.region_perturbation(model, xi, a, [0, 1], patch_size=4)
    with pytest.raises(ValueError, match="inputs must be a floating-point"):
        M.pixel_flipping(model, xi.numpy(), a.numpy(), [0, 1])


def test_other_bad_arguments(setup):
    model, x, a = setup
    with pytest.raises(ValueError, match="order"):
        M.region_perturbation(model, x, a, [0, 1], order="best", patch_size=4)
    with pytest.raises(ValueError, match="baseline"):
        M.region_perturbation(model, x, a, [0, 1], baseline="purple", patch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        M.pixel_flipping(model, x, a, [0, 1], batch_size=0)
    with pytest.raises(ValueError, match="inputs must be images"):
        M.region_perturbation(model, x.flatten(1), a.flatten(1), [0, 1])
    with pytest.raises(ValueError, match="similarity"):
        M.class_sensitivity(model, x, lambda m, xx, t: xx, similarity="kendall")
    with pytest.raises(ValueError, match="layers"):
        M.model_parameter_randomisation(model, x, lambda m, xx, t: xx, layers=["nope"])
    with pytest.raises(ValueError, match="baseline must broadcast"):
        M.perturbation_curve(model, x, a, [0, 1], baseline=torch.zeros(5))


def test_spearman_ties_and_identity():
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0], [0.0, 0.0, 0.0, 1.0]])
    # average ranks: [1, 2.5, 2.5, 4] and [2, 2, 2, 4]
    torch.testing.assert_close(
        M.rankdata(a), torch.tensor([[1.0, 2.5, 2.5, 4.0], [2.0, 2.0, 2.0, 4.0]], dtype=torch.float64)
    )
    x = torch.randn(3, 50)
    assert torch.all(M.spearman(x, x) == 1.0)
    assert torch.all(M.spearman(x, -x) == -1.0)
    # monotone transform keeps Spearman at 1
    assert torch.all(M.spearman(x, x.exp()) == 1.0)
