"""LRP cost vs a plain gradient (forward + backward) and vs Zennit, in one process.

    python bench/bench_lrp.py            # VGG-16 and ResNet-50, 224x224, batch 8
    python bench/bench_lrp.py --small    # batch 2, 112x112 (quick look)

Prints, per model: time (best of --repeat runs) and peak extra memory of each method as ratios
of the plain input gradient. Memory is the peak RSS increase of a forked child running the method
once (CPU tensors are not visible to tracemalloc), so all numbers come from the same process image.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch
import torchvision

import relprop


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb(fn) -> float:
    """Peak RSS increase (MiB) of running ``fn`` once, measured in a forked child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        base = _rss_mb()
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        os.write(w, f"{peak - base:.1f}".encode())
        os._exit(0)
    os.close(w)
    data = os.read(r, 64).decode()
    os.waitpid(pid, 0)
    return float(data) if data else float("nan")


def best_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="batch 2 at 112x112")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", default="vgg16,resnet50")
    ap.add_argument("--no-zennit", action="store_true")
    a = ap.parse_args()
    batch, size = (2, 112) if a.small else (8, 224)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}, {size}x{size}")
    for name in a.models.split(","):
        model = getattr(torchvision.models, name)().eval()
        x = torch.randn(batch, 3, size, size)
        target = 1

        def gradient():
            xx = x.clone().requires_grad_()
            out = model(xx)
            torch.autograd.grad(out[:, target].sum(), xx)

        runs = {
            "gradient (autograd)": gradient,
            "relprop gradient": lambda: relprop.explain(model, x, target=target, method="gradient"),
            "relprop epsilon": lambda: relprop.explain(model, x, target=target, method="lrp", composite="epsilon"),
            "relprop epsilon_plus_flat": lambda: relprop.explain(model, x, target=target, method="lrp",
                                                                 composite="epsilon_plus_flat"),
        }
        if not a.no_zennit:
            runs.update(_zennit_runs(model, x, target, name))
        base_t = base_m = None
        print(f"\n{name}")
        print(f"  {'method':32s} {'time s':>8s} {'x grad':>7s} {'peak MiB':>9s} {'x grad':>7s}")
        for label, fn in runs.items():
            t = best_time(fn, a.repeat)
            m = peak_mb(fn)
            if base_t is None:
                base_t, base_m = t, m
            print(f"  {label:32s} {t:8.3f} {t / base_t:7.2f} {m:9.1f} {m / base_m:7.2f}")


def _zennit_runs(model, x, target, name):
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat, LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    from zennit.types import Convolution

    canon = ResNetCanonizer if "resnet" in name else VGGCanonizer

    def run(make):
        def fn():
            with Gradient(model=model, composite=make()) as attributor:
                out = model(x)
                seed = torch.zeros_like(out)
                seed[:, target] = out[:, target]
                attributor(x, seed)
        return fn

    eps = lambda: LayerMapComposite(layer_map_base() + [(Convolution, Epsilon()), (torch.nn.Linear, Epsilon())],  # noqa
                                    canonizers=[canon()])
    return {"zennit epsilon": run(eps), "zennit EpsilonPlusFlat": run(lambda: EpsilonPlusFlat(canonizers=[canon()]))}


if __name__ == "__main__":
    main()
