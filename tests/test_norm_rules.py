"""Normalisation rules: a batch norm in training mode (batch statistics) under LRP."""

import warnings

import torch

import relprop


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 3, bias=False),
    ).double()
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)  # beta stays 0: no bias share, so LRP-0 must conserve
    return m.train()


def test_train_mode_batch_norm_lrp0_conserves_and_keeps_buffers():
    m = _model()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = relprop.explain(m, x, target=1, method="lrp", composite="lrp0")
    m.train()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the explained forward normalises by the batch's own statistics
    with torch.no_grad():
        y = torch.nn.functional.batch_norm(m[0](x), None, None, m[1].weight, m[1].bias, training=True, eps=m[1].eps)
        score = m[4](m[3](m[2](y)))[:, 1]
    assert torch.allclose(e.score, score, rtol=1e-10, atol=1e-12)
    total = e.attributions.sum(dim=(1, 2, 3))
    # centering couples the samples of a batch: relevance is conserved over the whole batch
    assert torch.allclose(total.sum(), score.sum(), rtol=1e-8, atol=1e-10)


def test_train_mode_batch_norm_rule_is_not_the_eval_rule():
    m = _model()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = relprop.explain(m, x, target=1, method="lrp", composite="lrp0").attributions
    m.eval()
    b = relprop.explain(m, x, target=1, method="lrp", composite="lrp0").attributions
    assert not torch.allclose(a, b)
