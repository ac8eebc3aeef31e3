"""Token perturbation on the shared engine: curves equal a naive copy-by-copy loop, and ABPC is the
same formula as for images (one definition)."""

import numpy as np
import pytest
import torch

from relprop import metrics as M
from relprop.metrics._engine import area_between


class BagOfTokens(torch.nn.Module):
    """logits = sum of per-token class weights over unmasked positions: easy to reason about."""

    def __init__(self, vocab=20, classes=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(vocab, classes, generator=g))

    def forward(self, ids, mask):
        return (self.w[ids] * mask[..., None]).sum(1)


def naive(model, ids, mask, attr, target, content, fill, steps, order, insertion):
    fr = np.linspace(0, 1, steps + 1)
    out = np.zeros((ids.shape[0], steps + 1))
    for b in range(ids.shape[0]):
        pos = torch.nonzero(content[b]).reshape(-1)
        ranked = pos[torch.argsort(attr[b, pos], descending=order == "morf", stable=True)]
        for j, f in enumerate(fr):
            k = int(round(f * len(ranked)))
            row = ids[b].clone()
            if insertion:
                row[ranked[k:]] = fill
            else:
                row[ranked[:k]] = fill
            with torch.no_grad():
                p = torch.softmax(model(row[None], mask[b : b + 1]), -1)[0, target[b]]
            out[b, j] = float(p)
    return out


def test_token_curves_match_a_naive_loop_and_abpc_has_one_formula():
    torch.manual_seed(0)
    model = BagOfTokens()
    ids = torch.randint(3, 20, (5, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding
    mask[3, 4:] = 0
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True  # [CLS]-like: never replaced
    ids[:, 0] = 1
    attr = torch.randn(ids.shape)
    target = torch.tensor([0, 1, 2, 0, 1])
    content = mask.bool() & ~special
    res = M.token_perturbation(
        model, ids, attr, target, fill_id=2, attention_mask=mask, exclude=special, steps=4, batch_size=7
    )
    for name, order, ins in (("morf", "morf", False), ("lerf", "lerf", False), ("insertion", "morf", True)):
        want = naive(model, ids, mask, attr, target, content, 2, 4, order, ins)
        np.testing.assert_allclose(getattr(res, name).numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)
    # ABPC: trapezoid of (LeRF - MoRF) over steps 1..S, dx = 1, exactly the image formula
    gap = (res.lerf - res.morf).numpy()[:, 1:]
    np.testing.assert_allclose(res.abpc.scores.numpy(), np.trapezoid(gap, axis=1), rtol=1e-12)
    idl = res.insertion_deletion
    np.testing.assert_allclose(
        idl.deletion_auc.numpy(), np.trapezoid(res.morf.numpy(), np.linspace(0, 1, 5), axis=1), rtol=1e-12
    )


def test_image_abpc_is_the_same_area_between_function():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(2 * 64, 3))
    x = torch.rand(4, 1, 8, 8)
    a = torch.randn(4, 1, 8, 8)
    r = M.abpc(model, x, a, patch_size=2, regions=6)
    np.testing.assert_allclose(r.scores.numpy(), (r.morf.auc - r.lerf.auc).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        r.scores.numpy(), area_between(r.morf.score_curve, r.lerf.score_curve).numpy(), rtol=1e-12
    )
    # per step: the mean gap over the 5 intervals between steps 1..6
    np.testing.assert_allclose(r.per_step.numpy(), r.scores.numpy() / 5, rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_token_and_image_metrics_on_a_cuda_model_equal_the_cpu_numbers():
    torch.manual_seed(0)
    model = BagOfTokens()
    ids = torch.randint(3, 20, (4, 7))
    mask = torch.ones_like(ids)
    attr = torch.randn(ids.shape)
    cpu = M.token_perturbation(model, ids, attr, fill_id=2, attention_mask=mask, steps=3)
    gpu = M.token_perturbation(model.cuda(), ids.cuda(), attr, fill_id=2, attention_mask=mask.cuda(), steps=3)
    torch.testing.assert_close(gpu.morf, cpu.morf, rtol=1e-5, atol=1e-6)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(128, 3))
    x, a = torch.rand(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    r_cpu = M.abpc(net, x, a, patch_size=2, regions=5)
    r_gpu = M.abpc(net.cuda(), x.cuda(), a.cuda(), patch_size=2, regions=5)
    torch.testing.assert_close(r_gpu.scores, r_cpu.scores, rtol=1e-4, atol=1e-5)
