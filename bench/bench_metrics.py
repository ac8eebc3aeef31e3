"""Benchmark: relprop.metrics pixel flipping / region perturbation vs Quantus.

Same model, same 64 images, same attributions and settings, one process.
Prints wall times, the speed-up ratio and the max difference of the curves.

    python bench/bench_metrics.py [--repeats 3] [--batch-size 64] [--threads N]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch


def make_small_model() -> torch.nn.Module:
    """The digits CNN of the tests (8x8 inputs)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    ).eval()


def make_model() -> torch.nn.Module:
    """A LeNet-sized CNN for 32x32 inputs."""
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


def make_data(n: int = 64, upscale: int = 4):
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images[:n], dtype=torch.float32)[:, None] / 16.0
        x = x.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)  # 8x8 -> 32x32
        y = torch.tensor(d.target[:n])
    except ImportError:  # pragma: no cover
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, 1, 8 * upscale, 8 * upscale, generator=g)
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
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both tools (0: torch default)")
    args = ap.parse_args()

    import quantus

    from relprop import metrics as M

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, quantus {quantus.__version__}, threads {torch.get_num_threads()}")
    for label, model, upscale, cases in [
        (
            "digits 8x8, test CNN",
            make_small_model(),
            1,
            [
                ("pixel flipping (features_in_step=1, 64 steps, black)", "pf", dict(features_in_step=1)),
                ("region perturbation (patch 2, 16 regions, black, MoRF)", "rp", dict(patch_size=2, regions=16)),
            ],
        ),
        (
            "digits upscaled to 32x32, LeNet-sized CNN",
            make_model(),
            4,
            [
                ("pixel flipping (features_in_step=16, 64 steps, black)", "pf", dict(features_in_step=16)),
                ("region perturbation (patch 4, 64 regions, black, MoRF)", "rp", dict(patch_size=4, regions=64)),
            ],
        ),
    ]:
        x, y = make_data(64, upscale)
        # input x gradient attributions
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xg).gather(1, y[:, None]).sum(), xg)
        a = (g * x).detach()
        xn, yn, an = x.numpy(), y.numpy(), a.numpy()
        print(f"\n== {label}: 64 images {tuple(x.shape[1:])}, input x gradient maps ==")
        for name, kind, kw in cases:
            if kind == "pf":
                make_q = lambda kw=kw: quantus.PixelFlipping(
                    features_in_step=kw["features_in_step"], perturb_baseline="black", disable_warnings=True
                )
                ours = lambda kw=kw: M.pixel_flipping(
                    model, x, a, y, baseline="black", batch_size=args.batch_size, **kw
                ).scores.numpy()
            else:
                make_q = lambda kw=kw: quantus.RegionPerturbation(
                    patch_size=kw["patch_size"],
                    regions_evaluation=kw["regions"],
                    perturb_baseline="black",
                    disable_warnings=True,
                )
                ours = lambda kw=kw: M.region_perturbation(
                    model, x, a, y, baseline="black", batch_size=args.batch_size, **kw
                ).scores.numpy()

            def run_quantus(make_q=make_q):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return np.asarray(
                        make_q()(model=model, x_batch=xn, y_batch=yn, a_batch=an, softmax=True, batch_size=64)
                    )

            def floor(n_copies=None):
                # forward passes alone on as many copies (clean + one per step), same batch size
                copies = x.repeat(n_copies // len(x), 1, 1, 1)
                with torch.no_grad():
                    for i in range(0, len(copies), args.batch_size):
                        model(copies[i : i + args.batch_size])

            tq, q = best_of(run_quantus, args.repeats)
            tr, r = best_of(ours, args.repeats)
            tf, _ = best_of(lambda: floor(len(x) * (q.shape[1] + 1)), args.repeats)
            print(
                f"{name}:\n  quantus {tq * 1e3:8.1f} ms   relprop {tr * 1e3:8.1f} ms   "
                f"speed-up {tq / tr:5.1f}x   max |diff| {np.abs(q - r).max():.2e}\n"
                f"  (model forward alone on the {len(x) * (q.shape[1] + 1)} copies: {tf * 1e3:.1f} ms)"
            )


if __name__ == "__main__":
    main()
