"""Benchmark: relprop.metrics pixel flipping / region perturbation vs Quantus.

Same model, same 64 images, same attributions and settings, one process.
Prints wall times, the speed-up ratio and the max difference of the curves.

    python bench/bench_metrics.py [--repeats 3] [--batch-size 1024]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 8 * 8, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    ).eval()


def make_data(n: int = 64):
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images[:n], dtype=torch.float32)[:, None] / 16.0
        x = x.repeat_interleave(4, 2).repeat_interleave(4, 3)  # 8x8 -> 32x32
        y = torch.tensor(d.target[:n])
    except ImportError:  # pragma: no cover
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, 1, 32, 32, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def best_of(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024)
    args = ap.parse_args()

    import quantus
    from relprop import metrics as M

    model = make_model()
    x, y = make_data(64)
    # input x gradient attributions
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).gather(1, y[:, None]).sum(), xg)
    a = (g * x).detach()
    xn, yn, an = x.numpy(), y.numpy(), a.numpy()
    print(f"torch {torch.__version__}, quantus {quantus.__version__}, threads {torch.get_num_threads()}, "
          f"inputs {tuple(x.shape)}")

    cases = [
        (
            "pixel flipping (features_in_step=16, 64 steps, black)",
            lambda: quantus.PixelFlipping(features_in_step=16, perturb_baseline="black", disable_warnings=True),
            lambda: M.pixel_flipping(model, x, a, y, features_in_step=16, baseline="black", batch_size=args.batch_size).scores.numpy(),
        ),
        (
            "region perturbation (patch 4, 64 regions, black, MoRF)",
            lambda: quantus.RegionPerturbation(patch_size=4, regions_evaluation=64, perturb_baseline="black", disable_warnings=True),
            lambda: M.region_perturbation(model, x, a, y, patch_size=4, regions=64, baseline="black", batch_size=args.batch_size).scores.numpy(),
        ),
    ]
    for name, make_q, ours in cases:
        def run_quantus():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return np.asarray(make_q()(model=model, x_batch=xn, y_batch=yn, a_batch=an, softmax=True, batch_size=64))

        tq, q = best_of(run_quantus, args.repeats)
        tr, r = best_of(ours, args.repeats)
        print(f"{name}:\n  quantus {tq * 1e3:8.1f} ms   relprop {tr * 1e3:8.1f} ms   "
              f"speed-up {tq / tr:5.1f}x   max |diff| {np.abs(q - r).max():.2e}")


if __name__ == "__main__":
    main()
