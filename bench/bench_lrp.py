"""LRP cost vs a plain gradient (forward + backward) and vs Zennit, in one process.

    python bench/bench_lrp.py            # VGG-16 and ResNet-50, 224x224, batch 8
    python bench/bench_lrp.py --small    # batch 2, 112x112 (quick look)
    python bench/bench_lrp.py --models resnet50 --batch 4 --size 160 --threads 2 --repeat 7   # issue 10's case

Time: median and best of --repeat rounds; each round runs every method once, in turn, so load from
other processes on a shared machine hits all methods alike.
    python bench/bench_lrp.py --device cuda --no-zennit   # on a GPU (bench/gpu.sh)

Prints, per model: time (best of --repeat runs) and peak extra memory of each method as ratios
of the plain input gradient, all in one process. Memory is the peak increase of malloc'd memory while
the method runs once, from glibc's allocator statistics (CPU tensors are not visible to tracemalloc).

    python bench/bench_lrp.py --models resnet50 --batch 4 --size 160 --threads 1 --no-zennit --fresh 5

--fresh N: memory measured in N fresh processes per method, methods alternated run after run (no
method inherits another's heap), medians: the peak RSS increase while the method runs once (the
process's high-water mark reset just before, /proc/self/clear_refs), and the peak malloc'd increase
of a second run. glibc's malloc raises its mmap threshold as large blocks are freed, after which freed
heap memory stays resident: the peak RSS then exceeds what is allocated (by 35 MiB for the gradient and
50 MiB for LRP here). --mmap-threshold BYTES runs the fresh processes with that fixed threshold
(MALLOC_MMAP_THRESHOLD_, e.g. glibc's initial 131072), where peak RSS tracks the allocated peak.
"relprop epsilon, replayed plan" makes its plan (one recording) before the high-water mark is reset: with glibc's
default malloc the replay reuses the heap that recording left resident, so its RSS increase understates what it
holds; read its malloc column, or run with --mmap-threshold. --methods REGEX: only the methods whose label matches.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torchvision

import relprop


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def _in_use_mb() -> float:
    """Bytes currently allocated through malloc (heap + mmapped blocks): where CPU tensors live."""
    m = _libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20


def peak_mb(fn) -> float:
    """Peak increase (MiB) of malloc'd memory while ``fn`` runs, sampled by a watcher thread.

    RSS would hide reuse of memory freed by earlier runs; torch kernels release the GIL, so a
    Python thread polling glibc's ``mallinfo2`` sees the peak.
    """
    import gc
    import threading

    gc.collect()
    base = _in_use_mb()
    peak = [base]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _in_use_mb())
            time.sleep(0.0005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], _in_use_mb()) - base


def interleaved_times(runs: dict, repeat: int, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds per run of each function: ``repeat`` rounds, each running every function once, in turn."""
    for fn in runs.values():  # warm-up (allocator, oneDNN primitives)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for label, fn in runs.items():
            t = clock()
            fn()
            times[label].append(clock() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="batch 2 at 112x112")
    ap.add_argument("--batch", type=int, help="batch size (default 8, --small 2)")
    ap.add_argument("--size", type=int, help="image size (default 224, --small 112)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", default="vgg16,resnet50")
    ap.add_argument("--no-zennit", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (memory: the CUDA allocator's peak there)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine; use with "
        "OMP_NUM_THREADS=1, where it equals the compute time)",
    )
    ap.add_argument("--fresh", type=int, default=0, help="memory only: N fresh processes per method (see above)")
    ap.add_argument("--mmap-threshold", type=int, help="--fresh: glibc's MALLOC_MMAP_THRESHOLD_ for the processes")
    ap.add_argument("--methods", help="only the methods whose label matches this regular expression (re.search)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one fresh process of --fresh
    a = ap.parse_args()
    if a.child:
        _child(a, a.child)
        return
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    batch, size = (2, 112) if a.small else (8, 224)
    batch, size = a.batch or batch, a.size or size
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = torch.device(a.device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}, {size}x{size}, {a.clock} clock"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    )
    for name in a.models.split(","):
        model = getattr(torchvision.models, name)().eval().to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        runs = _runs(model, x, name, zennit=not a.no_zennit)
        if a.methods:  # the baseline (first) always kept
            runs = {k: f for i, (k, f) in enumerate(runs.items()) if i == 0 or re.search(a.methods, k)}
        if a.fresh:
            _fresh(a, name, list(runs), batch, size)
            continue
        if device.type == "cuda":  # time the queued kernels too; memory from the CUDA allocator
            runs = {k: _synced(fn, device) for k, fn in runs.items()}
        times = interleaved_times(runs, a.repeat, clock)
        base = next(iter(runs))
        base_t, base_b = statistics.median(times[base]), min(times[base])
        base_m = None
        print(f"\n{name} (median and best of {a.repeat} interleaved rounds)")
        print(
            f"  {'method':32s} {'median s':>9s} {'x grad':>7s} {'best s':>7s} {'x grad':>7s} {'peak MiB':>9s} {'x grad':>7s}"
        )
        for label, fn in runs.items():
            t, b = statistics.median(times[label]), min(times[label])
            m = peak_mb(fn) if device.type != "cuda" else _cuda_peak_mb(fn, device)
            base_m = base_m or m
            print(f"  {label:32s} {t:9.3f} {t / base_t:7.2f} {b:7.3f} {b / base_b:7.2f} {m:9.1f} {m / base_m:7.2f}")


class _Replayed:
    """``plan.explain(x)`` of a ``relprop.plan`` made on the first call (or by :meth:`prepare`): the replay's
    time and memory, not the recording's (the plan holds the recording's structure, not its activations)."""

    def __init__(self, model, x, target) -> None:
        self.model, self.x, self.target, self.plan = model, x, target, None

    def prepare(self) -> None:
        if self.plan is None:
            self.plan = relprop.plan(self.model, self.x, target=self.target, method="lrp", composite="epsilon")

    def __call__(self) -> None:
        self.prepare()
        self.plan.explain(self.x)
        assert self.plan.rerecords == 0, self.plan.last_reason


def _runs(model, x, name: str, zennit: bool) -> dict:
    """The methods compared, by label; the first is the baseline."""
    target = 1

    def gradient():
        xx = x.clone().requires_grad_()
        out = model(xx)
        torch.autograd.grad(out[:, target].sum(), xx)

    runs = {
        "gradient (autograd)": gradient,
        "relprop gradient": lambda: relprop.explain(model, x, target=target, method="gradient"),
        "relprop epsilon": lambda: relprop.explain(model, x, target=target, method="lrp", composite="epsilon"),
        "relprop epsilon_plus_flat": lambda: relprop.explain(
            model, x, target=target, method="lrp", composite="epsilon_plus_flat"
        ),
        "relprop epsilon, replayed plan": _Replayed(model, x, target),
    }
    if zennit:
        runs.update(_zennit_runs(model, x, target, name))
    return runs


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _child(a, label: str) -> None:
    """One fresh process, one method: prints {"rss": peak RSS increase of the first run, "malloc": ...}."""
    import gc

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    name = a.models.split(",")[0]
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(a.batch, 3, a.size, a.size)
    fn = _runs(model, x, name, zennit=label.startswith("zennit"))[label]
    # Imports and one-time set-up (lazy modules, kernel caches) on a tiny input, so they are not counted
    _runs(model, torch.randn(1, 3, 32, 32), name, zennit=label.startswith("zennit"))[label]()
    getattr(fn, "prepare", lambda: None)()  # a plan's recording is made before, not counted
    gc.collect()
    base = _rss_mib()
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    fn()
    rss = _hwm_mib() - base
    print(json.dumps({"rss": rss, "malloc": peak_mb(fn)}))


def _fresh(a, name: str, labels: list[str], batch: int, size: int) -> None:
    """Memory of each method in ``a.fresh`` fresh processes, methods alternated; medians and ratios."""
    res: dict[str, list[dict]] = {k: [] for k in labels}
    for _ in range(a.fresh):
        for label in labels:
            cmd = [sys.executable, __file__, "--child", label, "--models", name, f"--batch={batch}", f"--size={size}"]
            cmd += [f"--threads={a.threads}"] if a.threads else []
            env = dict(os.environ)
            if a.mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            res[label].append(json.loads(out.strip().splitlines()[-1]))
    glibc = f"MALLOC_MMAP_THRESHOLD_={a.mmap_threshold}" if a.mmap_threshold else "glibc's default malloc"
    print(f"\n{name}: memory in {a.fresh} fresh processes per method, alternated (medians), {glibc}")
    print(f"  {'method':32s} {'peak RSS MiB':>12s} {'x grad':>7s} {'peak malloc MiB':>15s} {'x grad':>7s}")
    base = labels[0]
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("rss", "malloc")} for k, v in res.items()}
    for label in labels:
        r, m = med[label]["rss"], med[label]["malloc"]
        each = ", ".join(f"{v['rss']:.0f}" for v in res[label])
        print(
            f"  {label:32s} {r:12.1f} {r / med[base]['rss']:7.2f} {m:15.1f} {m / med[base]['malloc']:7.2f}"
            f"   (RSS runs: {each})"
        )


def _synced(fn, device):
    def run():
        fn()
        torch.cuda.synchronize(device)

    return run


def _cuda_peak_mb(fn, device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


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

    eps = lambda: LayerMapComposite(
        layer_map_base() + [(Convolution, Epsilon()), (torch.nn.Linear, Epsilon())],  # noqa
        canonizers=[canon()],
    )
    return {"zennit epsilon": run(eps), "zennit EpsilonPlusFlat": run(lambda: EpsilonPlusFlat(canonizers=[canon()]))}


if __name__ == "__main__":
    main()
