"""compare's image metrics forward a fixed number of perturbed copies at a time (``chunk``, default
``IMAGE_COPIES``, recorded in the results): the values are the metrics' own at that chunk size, bit for
bit, and another chunk size changes them by float rounding only."""

import torch
from torch import nn

from relprop import metrics
from relprop.report.cell_metrics import IMAGE_COPIES, image_perturbation
from relprop.report.compare import Settings


class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, x):
        self.sizes.append(int(x.shape[0]))
        return self.inner(x)


def test_image_metrics_run_chunk_copies_per_pass_and_equal_the_metrics_at_that_size():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)
    )
    model = Counting(net.eval())
    x = torch.rand(7, 3, 16, 16)
    attr = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        target = net(x).argmax(1)
    s = Settings(batch_size=3, regions=6, steps=5, patch_grid=4)
    default = image_perturbation(net, x, attr, target, s)
    assert default["perturbation"]["copies_per_pass"] == IMAGE_COPIES
    res = image_perturbation(model, x, attr, target, s, chunk=3)
    assert res["perturbation"]["copies_per_pass"] == 3
    assert max(model.sizes) == 3 and model.sizes.count(3) > 10  # never more than 3 copies at once
    want = {"abpc": [], "insertion": [], "deletion": []}
    for i in range(0, 7, 3):  # the plain computation: the metrics per explain batch at batch_size 3
        r = slice(i, i + 3)
        kw = dict(patch_size=4, pad=True, batch_size=3)
        ab = metrics.abpc(net, x[r], attr[r], target[r], regions=6, baseline="black", **kw)
        idl = metrics.insertion_deletion(
            net, x[r], attr[r], target[r], steps=5, deletion_baseline="black", insertion_baseline="blur", **kw
        )
        want["abpc"] += ab.per_step.tolist()
        want["insertion"] += idl.insertion_auc.tolist()
        want["deletion"] += idl.deletion_auc.tolist()
    for k, v in want.items():
        assert res["per_example"][k] == v, k  # bit for bit
    for k in want:
        a, b = torch.tensor(res["per_example"][k]), torch.tensor(default["per_example"][k])
        assert torch.allclose(a, b, rtol=0, atol=1e-6), k
