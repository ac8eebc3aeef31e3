"""relprop vs Captum, same process, same model and inputs: integrated gradients (50 steps), DeepLIFT, occlusion
on a torchvision ResNet-50 (random weights).

    python bench/bench_methods.py            # batch 2, 224x224
    python bench/bench_methods.py --small    # batch 1, 112x112

Captum's DeepLift needs every ReLU to be its own module, used once (torchvision's Bottleneck calls
``self.relu`` three times, which Captum rejects), so both libraries get a copy with separate ReLU modules;
relprop gives the same numbers on the stock model too (reported as a check).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn as nn

warnings.filterwarnings("ignore")


class SeparateReLUBottleneck(nn.Module):
    def __init__(self, b):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3 = (
            b.conv1,
            b.bn1,
            b.conv2,
            b.bn2,
            b.conv3,
            b.bn3,
        )
        self.downsample = b.downsample
        self.relu1, self.relu2, self.relu3 = nn.ReLU(inplace=True), nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


def separate_relus(model):
    for lname in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, lname)
        for i, b in enumerate(layer):
            layer[i] = SeparateReLUBottleneck(b)
    return model


def timeit_pair(ours, ref, repeat):
    """Best-of-``repeat`` times, the two runs interleaved so that load changes hit both alike."""
    a, c = ours(), ref()  # warm-up
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for k, fn in enumerate((ours, ref)):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best[0], best[1], a, c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="batch 1, 112x112")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import torchvision
    from captum import attr as C

    import relprop
    from relprop import captum as R

    batch, size = (1, 112) if args.small else (2, 224)
    torch.manual_seed(0)
    stock = torchvision.models.resnet50().eval()
    model = separate_relus(torchvision.models.resnet50().eval())
    model.load_state_dict(stock.state_dict())
    x = torch.randn(batch, 3, size, size)
    base = torch.zeros_like(x)
    t = torch.arange(batch) % 1000
    win, stride = (3, size // 7, size // 7), (3, size // 14, size // 14)
    cases = [
        (
            "integrated_gradients (50 steps)",
            lambda: R.IntegratedGradients(model).attribute(x, base, target=t, n_steps=50),
            lambda: C.IntegratedGradients(model).attribute(x, base, target=t, n_steps=50),
        ),
        (
            "deeplift",
            lambda: R.DeepLift(model).attribute(x, base, target=t),
            lambda: C.DeepLift(model).attribute(x, base, target=t),
        ),
        (
            "occlusion (ppe=16)",
            lambda: R.Occlusion(model).attribute(x, win, strides=stride, target=t, perturbations_per_eval=16),
            lambda: C.Occlusion(model).attribute(x, win, strides=stride, target=t, perturbations_per_eval=16),
        ),
        (
            "occlusion (Captum default ppe=1)",
            lambda: R.Occlusion(model).attribute(x, win, strides=stride, target=t, perturbations_per_eval=1),
            lambda: C.Occlusion(model).attribute(x, win, strides=stride, target=t),
        ),
    ]
    print(f"ResNet-50, batch {batch}, {size}x{size}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'method':36s} {'relprop s':>10s} {'captum s':>10s} {'ratio':>7s} {'max rel diff':>13s}")
    for name, ours, ref in cases:
        t_ours, t_ref, a, c = timeit_pair(ours, ref, args.repeat)
        diff = float((a - c).abs().max() / c.abs().max().clamp_min(1e-30))
        print(f"{name:36s} {t_ours:10.3f} {t_ref:10.3f} {t_ours / t_ref:7.2f} {diff:13.2e}", flush=True)
    a = relprop.explain(stock, x, target=t, method="deeplift", baselines=base).attributions
    b = R.DeepLift(model).attribute(x, base, target=t)
    print(
        f"check: relprop DeepLIFT on the stock model (reused ReLUs) vs separate ReLUs: max abs diff "
        f"{float((a - b).abs().max()):.2e}"
    )


if __name__ == "__main__":
    main()
