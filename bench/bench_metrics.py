"""Benchmark: relprop's perturbation metrics against the forward-pass floor and Quantus.

For each case, in one process with interleaved repeats (floor, relprop, Quantus; the next repeat
starts with the next tool):

* **floor**: the bare forward passes the metric needs: the same images, once clean and once per step,
  at the batch size given (``S + 1`` passes of the batch; no perturbation, no bookkeeping);
* **relprop**: ``relprop.metrics.region_perturbation`` (or ``pixel_flipping``) with the default
  ``batch_size=None`` (copies per forward pass measured in the call) and, as ``relprop@B``, with the
  batch size fixed to the inputs' batch;
* **quantus**: ``quantus.RegionPerturbation`` / ``PixelFlipping`` with the same settings (``batch_size`` B),
  skipped where Quantus is not installed (e.g. a GPU machine without it).

Prints medians of wall time and of the process' CPU time, and the least wall time (the least
disturbed run: other processes only add time; at 2 threads on a loaded machine the CPU time is
inflated too, by threads spinning at barriers while another is descheduled) and the ratios as
tables, plus relprop's measured chunk size (median over the repeats), the load average and the
largest difference from Quantus' scores.

    python bench/bench_metrics.py [--repeats 3] [--threads 2] [--device cpu|cuda] [--cases cnn,resnet50]

``--zoo-chunks 256,32,64``: instead, ``relprop compare``'s image metrics
(:func:`relprop.report.cell_metrics.image_perturbation`, default settings: 64 examples in explain batches of
``--batch-size``, 32 regions, 16 steps) on the zoo default's models at each copies-per-pass chunk given,
against the floor (the same number of copies forwarded ``--batch-size`` at a time, unperturbed), with the
largest difference of each chunk's values from the first chunk's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


def cnn() -> torch.nn.Module:
    """A 4-conv CNN for 64 px RGB images (about 25 M multiply-adds per image)."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    ).eval()


def resnet50() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


@dataclass
class Case:
    name: str
    make: Callable[[], torch.nn.Module]
    batch: int
    size: int
    kind: str  # "rp" (region perturbation) or "pf" (pixel flipping)
    kw: dict = field(default_factory=dict)
    classes: int = 10

    @property
    def steps(self) -> int:
        if self.kind == "rp":
            return min(self.kw["regions"], (self.size // self.kw["patch_size"]) ** 2)
        return -(-3 * self.size * self.size // self.kw["features_in_step"])


CASES = {
    "cnn": Case("4-conv CNN, 32 x 64 px, region perturbation (patch 8, 40 regions, MoRF, black)",
                cnn, 32, 64, "rp", dict(patch_size=8, regions=40)),
    "cnn-pf": Case("4-conv CNN, 32 x 32 px, pixel flipping (features_in_step 64, 48 steps, black)",
                   cnn, 32, 32, "pf", dict(features_in_step=64)),
    "resnet50": Case("ResNet-50, 4 x 64 px, region perturbation (patch 8, 20 regions, MoRF, black)",
                     resnet50, 4, 64, "rp", dict(patch_size=8, regions=20), classes=1000),
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="cnn,cnn-pf,resnet50", help=f"comma-separated, of {sorted(CASES)}")
    ap.add_argument("--zoo-chunks", default="", help="e.g. 256,32,64: compare's metrics on the zoo default")
    ap.add_argument("--batch-size", type=int, default=32, help="--zoo-chunks: compare's --batch-size")
    ap.add_argument("--zoo-models", default="", help="--zoo-chunks: comma-separated (default: zoo.DEFAULT_MODELS)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.zoo_chunks:
        names = [m for m in args.zoo_models.split(",") if m]
        return zoo_chunks([int(c) for c in args.zoo_chunks.split(",")], args.batch_size, args.repeats, names)
    from relprop import metrics as M

    try:
        import quantus
    except ImportError:
        quantus = None
    dev = torch.device(args.device)
    print(
        f"torch {torch.__version__}, quantus {getattr(quantus, '__version__', 'not installed')}, "
        f"threads {torch.get_num_threads()}, device {dev}"
        + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
        + f", {args.repeats} interleaved repeats, medians",
        flush=True,
    )
    rows: list = []
    for key in args.cases.split(","):
        case = CASES[key]
        model = case.make().to(dev)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(case.batch, 3, case.size, case.size, generator=g)
        a = torch.randn(case.batch, 1, case.size, case.size, generator=g)
        y = torch.arange(case.batch) % case.classes
        xd, ad = x.to(dev), a.to(dev)
        metric = M.region_perturbation if case.kind == "rp" else M.pixel_flipping

        def floor(case=case, model=model, xd=xd):
            with torch.no_grad():
                for _ in range(case.steps + 1):
                    model(xd)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        def ours(bs=None, case=case, model=model, xd=xd, ad=ad, y=y, metric=metric):
            return metric(model, xd, ad, y, baseline="black", batch_size=bs, **case.kw)

        tools: dict[str, Callable] = {"floor": floor, "relprop": ours, "relprop@B": lambda case=case: ours(case.batch)}
        if quantus is not None and dev.type == "cpu":
            q_kw = (
                dict(patch_size=case.kw["patch_size"], regions_evaluation=case.kw["regions"])
                if case.kind == "rp"
                else dict(features_in_step=case.kw["features_in_step"])
            )
            q_cls = quantus.RegionPerturbation if case.kind == "rp" else quantus.PixelFlipping

            def run_q(model=model, x=x, a=a, y=y, q_cls=q_cls, q_kw=q_kw, case=case):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m = q_cls(perturb_baseline="black", disable_warnings=True, **q_kw)
                    return np.asarray(
                        m(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy(), softmax=True,
                          batch_size=case.batch, device="cpu")
                    )  # fmt: skip

            tools["quantus"] = run_q
        times: dict[str, list[float]] = {k: [] for k in tools}
        cpu: dict[str, list[float]] = {k: [] for k in tools}
        out: dict[str, object] = {}
        ours()  # warm-up: first-call costs of the model and the libraries
        names = list(tools)
        loads, chunks = [], []
        for r in range(args.repeats):
            loads.append(round(os.getloadavg()[0], 1))
            for k in names[r % len(names) :] + names[: r % len(names)]:  # each tool first in turn
                fn = tools[k]
                t0, c0 = time.perf_counter(), time.process_time()
                out[k] = fn()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
                if k == "relprop":
                    chunks.append(out[k].batch_size)
        res = out["relprop"]
        diff = float("nan")
        if "quantus" in out:
            diff = float(np.abs(np.asarray(out["quantus"]) - res.scores.numpy()).max())
        print(f"{key}: {case.name}; {case.steps + 1} passes of {case.batch}")
        print(f"  1-min load average per repeat {loads}; relprop's measured chunk per repeat {chunks}")
        for what, runs in (("wall", times), ("CPU", cpu)):
            print(f"  {what} (s): " + "; ".join(f"{k} " + " ".join(f"{t:.2f}" for t in v) for k, v in runs.items()))
        sys.stdout.flush()
        rows.append((key, case, statistics.median(chunks), diff, times, cpu, loads, chunks))
    # medians, and the least disturbed run (the minimum: other processes only add time)
    stats = (
        ("median wall time", 4, statistics.median),
        ("median CPU time of the process", 5, statistics.median),
        ("least wall time", 4, min),
    )
    for title, col, stat in stats:
        print(f"\n{title}")
        head = f"{'case':10} {'floor s':>8} {'relprop s':>10} {'relprop@B s':>12} {'quantus s':>10} "
        head += f"{'relprop/floor':>14} {'relprop@B/floor':>16} {'quantus/floor':>14} {'quantus/relprop':>16} "
        head += f"{'chunk':>6} {'max|diff|':>10}"
        print(head)
        for row in rows:
            key, chunk, diff = row[0], row[2], row[3]
            med = {k: stat(v) for k, v in row[col].items()}
            q = med.get("quantus", float("nan"))
            print(
                f"{key:10} {med['floor']:8.2f} {med['relprop']:10.2f} {med['relprop@B']:12.2f} {q:10.2f} "
                f"{med['relprop'] / med['floor']:14.2f} {med['relprop@B'] / med['floor']:16.2f} "
                f"{q / med['floor']:14.2f} {q / med['relprop']:16.2f} {chunk:6.0f} {diff:10.1e}"
            )


class _Counting(torch.nn.Module):
    """The model, counting the examples it is run on (the copies a metric forwards)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.seen = inner, 0

    def forward(self, x):
        self.seen += int(x.shape[0])
        return self.inner(x)


def zoo_chunks(chunks: list[int], batch: int, repeats: int, names: list[str] | None = None) -> None:
    """compare's image metrics on the zoo default's models at each chunk (copies per forward pass)."""
    from relprop import zoo
    from relprop.report.cell_metrics import image_perturbation
    from relprop.report.compare import Settings

    s = Settings(batch_size=batch)
    data = zoo.load_dataset(zoo.DEFAULT_DATASET)
    n = s.samples
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}; compare's image metrics, {n} examples, "
        f"--batch-size {batch}, {s.regions} regions, {s.steps} steps; CPU time of the process, medians of "
        f"{repeats} interleaved repeats",
        flush=True,
    )
    table = []
    for name in names or zoo.DEFAULT_MODELS:
        model = _Counting(zoo.load_model(name))
        x = data.images[:n]
        with torch.no_grad():
            target = model(x).argmax(-1)
        attr = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        model.seen = 0
        ref = image_perturbation(model, x, attr, target, s, chunk=chunks[0])
        copies = model.seen
        xs = x[:batch]

        def floor(xs=xs, model=model, copies=copies):
            with torch.no_grad():
                for _ in range(-(-copies // xs.shape[0])):
                    model(xs)

        tools: dict[str, Callable] = {"floor": floor}
        for c in chunks:
            tools[f"chunk {c}"] = lambda c=c, model=model, x=x, attr=attr, target=target: image_perturbation(
                model, x, attr, target, s, chunk=c
            )
        cpu: dict[str, list[float]] = {k: [] for k in tools}
        diff: dict[str, float] = {}
        names = list(tools)
        for r in range(repeats):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                c0 = time.process_time()
                got = tools[k]()
                cpu[k].append(time.process_time() - c0)
                if got is not None:
                    diff[k] = max(
                        max(abs(a - b) for a, b in zip(got["per_example"][m], ref["per_example"][m]))
                        for m in ref["per_example"]
                    )
        med = {k: statistics.median(v) for k, v in cpu.items()}
        print(f"{name}: {copies} copies; " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()), flush=True)
        table.append((name, copies, med, diff))
    print(f"\nmedian CPU time (s) and ratio to the floor ({batch} copies per pass, unperturbed)")
    print(f"{'model':16} {'copies':>7} " + " ".join(f"{k:>18}" for k in table[0][2]))
    for name, copies, med, _ in table:
        cells = [f"{v:8.2f} ({v / med['floor']:5.2f}x)" for v in med.values()]
        print(f"{name:16} {copies:7d} " + " ".join(f"{c:>18}" for c in cells))
    print("\nlargest |difference| of a per-example value from the first chunk's")
    for name, _, _, diff in table:
        print(f"{name:16} " + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()))


if __name__ == "__main__":
    main()
