"""Perturbation metrics: equality with Quantus, and properties of the curves."""

import warnings

import numpy as np
import pytest
import torch

from relprop import metrics as M


def _model(seed=0, in_ch=3, classes=10):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_ch, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 16, classes),
    ).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 12, 12, generator=g)
    a = torch.randn(5, 1, 12, 12, generator=g)
    y = np.array([0, 3, 5, 7, 9])
    return _model(), x, a, y


quantus = pytest.importorskip("quantus")


def _quantus_region(model, x, y, a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = quantus.RegionPerturbation(disable_warnings=True, **kw)
        return np.asarray(
            m(model=model, x_batch=x.numpy(), y_batch=y, a_batch=a.numpy(), softmax=kw.pop("softmax", True))
        )


@pytest.mark.parametrize("order", ["morf", "lerf"])
@pytest.mark.parametrize("baseline", ["black", "mean", 0.0])
@pytest.mark.parametrize("patch_size,pad", [(3, False), (5, True)])
def test_region_perturbation_equals_quantus(data, order, baseline, patch_size, pad):
    model, x, a, y = data
    q = _quantus_region(
        model, x, y, a, patch_size=patch_size, order=order, regions_evaluation=10, perturb_baseline=baseline
    )
    r = M.region_perturbation(
        model, x, a, y, order=order, patch_size=patch_size, regions=10, baseline=baseline, pad=pad, batch_size=17
    )
    n_patches = ((12 + patch_size - 1) // patch_size) ** 2
    assert r.scores.shape == q.shape == (5, min(10, n_patches))
    np.testing.assert_allclose(r.scores.numpy(), q, atol=1e-5, rtol=0)
    q_auc = np.trapezoid(q, dx=1, axis=1)
    np.testing.assert_allclose(r.auc.numpy(), q_auc, atol=1e-5, rtol=0)
    assert r.mean_auc == pytest.approx(float(np.mean(q_auc)), abs=1e-5)


def test_region_perturbation_logits_equal_quantus(data):
    model, x, a, y = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = quantus.RegionPerturbation(patch_size=4, regions_evaluation=9, disable_warnings=True)
        q = np.asarray(m(model=model, x_batch=x.numpy(), y_batch=y, a_batch=a.numpy(), softmax=False))
    r = M.region_perturbation(model, x, a, y, patch_size=4, regions=100, softmax=False)
    assert r.scores.shape == (5, 9)  # capped at the number of patches
    np.testing.assert_allclose(r.scores.numpy(), q, atol=1e-5, rtol=0)


@pytest.mark.parametrize("order", ["morf", "lerf"])
@pytest.mark.parametrize("fis", [1, 4])
def test_pixel_flipping_equals_quantus(order, fis):
    model = _model(2)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 6, 6, generator=g)
    # channel-1 attributions are broadcast over channels: lots of exact ties
    a = torch.randn(3, 1, 6, 6, generator=g)
    x[:, :, :2] = 0.0  # a "background" equal to the black baseline: those steps change nothing
    y = np.array([1, 2, 3])
    # Quantus PixelFlipping is MoRF only: LeRF == MoRF of the negated map.
    qa = a if order == "morf" else -a
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = quantus.PixelFlipping(features_in_step=fis, perturb_baseline="black", disable_warnings=True)
        q = np.asarray(m(model=model, x_batch=x.numpy(), y_batch=y, a_batch=qa.numpy()))
    r = M.pixel_flipping(model, x, a, y, order=order, features_in_step=fis, baseline="black", batch_size=50)
    assert r.scores.shape == q.shape == (3, 3 * 36 // fis)
    np.testing.assert_allclose(r.scores.numpy(), q, atol=1e-5, rtol=0)
    np.testing.assert_allclose(r.auc.numpy(), np.trapezoid(q, dx=1, axis=1), atol=1e-5, rtol=0)


def test_abpc_sign_and_definition(data):
    model, x, a, y = data
    res = M.abpc(model, x, a, y, patch_size=3, regions=16)
    # area(LeRF score curve) - area(MoRF score curve), computed from the curves themselves
    area = lambda r: np.trapezoid(r.score_curve[:, 1:].numpy(), dx=1, axis=1)
    np.testing.assert_allclose(res.scores.numpy(), area(res.lerf) - area(res.morf), atol=1e-9)
    assert res.value == pytest.approx(float(res.scores.mean()))
    # swapping the ranking (negated map) swaps MoRF and LeRF, so ABPC flips sign
    neg = M.abpc(model, x, -a, y, patch_size=3, regions=16)
    np.testing.assert_allclose(neg.scores.numpy(), -res.scores.numpy(), atol=1e-6)


def _naive_curve(model, x, a, t, patch, order, fill):
    """Loop-based reference: rank patches by summed attribution, replace cumulatively."""
    b, c, h, w = x.shape
    nh, nw = h // patch, w // patch
    out = []
    for i in range(b):
        sums = a[i].sum(0).reshape(nh, patch, nw, patch).sum((1, 3)).reshape(-1).double()
        idx = torch.argsort(-sums if order == "morf" else sums, stable=True)
        xi = x[i].clone()
        row = [torch.softmax(model(xi[None]), 1)[0, t[i]].item()]
        for u in idx.tolist():
            r, cc = divmod(u, nw)
            xi[:, r * patch : (r + 1) * patch, cc * patch : (cc + 1) * patch] = fill[i][
                :, r * patch : (r + 1) * patch, cc * patch : (cc + 1) * patch
            ]
            row.append(torch.softmax(model(xi[None]), 1)[0, t[i]].item())
        out.append(row)
    return np.array(out)


@pytest.mark.parametrize("baseline", ["zero", "blur", "noise", "callable"])
def test_perturbation_curve_matches_naive_loop(data, baseline):
    model, x, a, y = data
    a3 = a.expand_as(x) + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    bl = (lambda z: z.flip(-1)) if baseline == "callable" else baseline
    res = M.perturbation_curve(model, x, a3, y, order="lerf", patch_size=4, baseline=bl, batch_size=7)
    if baseline == "zero":
        fill = torch.zeros_like(x)
    elif baseline == "callable":
        fill = x.flip(-1)
    elif baseline == "blur":  # an independent blur: scipy, replicate edges, radius ceil(3 sigma), sigma 2
        from scipy.ndimage import gaussian_filter

        fill = torch.from_numpy(gaussian_filter(x.double().numpy(), sigma=(0, 0, 2, 2), mode="nearest", truncate=3.0))
        fill = fill.to(x.dtype)
    else:  # noise: the documented draw, per-sample mean + std * N(0, 1) from a generator seeded with `seed`
        xf = x.reshape(5, -1)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(xf.shape, generator=g, dtype=torch.float64).to(x.dtype)
        fill = (xf.mean(1, keepdim=True) + xf.std(1, keepdim=True) * noise).reshape(x.shape)
    with torch.no_grad():
        ref = _naive_curve(model, x, a3, torch.as_tensor(y), 4, "lerf", fill)
    np.testing.assert_allclose(res.prob.numpy(), ref, atol=1e-5)
    assert res.prob.shape == (5, 10)
    np.testing.assert_allclose(res.fractions.numpy(), np.arange(10) / 9)
    with torch.no_grad():
        clean = torch.softmax(model(x), 1)[torch.arange(5), torch.as_tensor(y)]
    np.testing.assert_allclose(res.prob[:, 0].numpy(), clean.numpy(), atol=1e-6)
    assert res.accuracy.shape == (10,)
    assert float(res.accuracy[0]) == pytest.approx(float((model(x).argmax(1) == torch.as_tensor(y)).float().mean()))


def test_curve_steps_accuracy_and_batch_size_invariance(data):
    model, x, a, _ = data
    r1 = M.perturbation_curve(model, x, a, steps=4, patch_size=2, batch_size=3)
    r2 = M.perturbation_curve(model, x.numpy(), a.numpy(), steps=4, patch_size=2, batch_size=1000, progress=True)
    assert r1.logit.shape == (5, 5)
    torch.testing.assert_close(r1.logit, r2.logit, atol=1e-5, rtol=0)
    # default target is the predicted class -> accuracy starts at 1
    assert float(r1.accuracy[0]) == 1.0
    # after all patches are zeroed every sample sees the same all-zero image
    with torch.no_grad():
        z = model(torch.zeros(1, 3, 12, 12))[0]
    torch.testing.assert_close(r1.logit[:, -1], z[r1.target].double(), atol=1e-5, rtol=0)
    assert r1.auc("prob").shape == (5,)


def test_insertion_deletion_endpoints(data):
    model, x, a, y = data
    res = M.insertion_deletion(model, x, a, y, patch_size=3, insertion_baseline="zero")
    with torch.no_grad():
        clean = torch.softmax(model(x), 1)[torch.arange(5), torch.as_tensor(y)].double()
        zero = torch.softmax(model(torch.zeros(1, 3, 12, 12)), 1)[0, torch.as_tensor(y)].double()
    torch.testing.assert_close(res.deletion[:, 0], clean, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.deletion[:, -1], zero, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.insertion[:, 0], zero, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.insertion[:, -1], clean, atol=1e-6, rtol=0)
    assert res.insertion_auc.shape == res.deletion_auc.shape == (5,)


def test_plots_return_axes(data):
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    model, x, a, y = data
    res = M.abpc(model, x, a, y, patch_size=3, regions=5)
    assert res.plot() is not None
    assert res.morf.plot() is not None
    curve = M.perturbation_curve(model, x, a, y, patch_size=3)
    assert curve.plot(kind="accuracy") is not None
    assert M.insertion_deletion(model, x, a, y, patch_size=6).plot() is not None
    plt.close("all")
