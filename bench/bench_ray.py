"""Overhead of ``relprop compare --engine ray`` over the single-process engine on the same work.

Runs the same comparison three ways, side by side in one process: the single-process engine with
``W`` torch threads (``W`` = --workers), the Ray engine with ``W`` workers of one thread each, and both
with one thread/one worker (the pure overhead: same compute, plus Ray's scheduling, pickling, actor start
and model load per worker, Parquet shards and the assembly). Ray's start-up (``ray.init``) is timed
separately: a cluster that is already up does not pay it. Compares the results.json numbers (timings aside):
identical at one thread/one worker; with two threads against one-thread workers torch's CPU kernels may
round some values differently (README states the tolerance), so the table prints the largest relative
difference. Prints a table: the median wall time of ``--repeat`` runs per mode, the modes interleaved
(ray, local, ray, local, ...) so that a change in the machine's load hits both, and the load average;
and the CPU time of the run: this process and every process under it (Ray's GCS, raylet and workers; read
from ``/proc`` every 0.1 s, so Linux only, and a worker's last 0.1 s before it is killed may be missed),
which a loaded machine disturbs far less than the wall clock.

``--folder``: the digits as an image folder of PNGs (streamed data, read on access) instead of the
in-memory zoo tensors, so the Ray engine ships each shard's PNG bytes to its workers
(:func:`relprop.specs.sources.pack_items`) and the workers decode them; the single-process engine decodes
the same files.

    python bench/bench_ray.py                          # 2 zoo models x 2 methods x 16 examples
    python bench/bench_ray.py --folder --repeat 3      # the same on a PNG folder, 3 interleaved runs per mode
    python bench/bench_ray.py --text --repeat 3        # a random-init 2-layer BERT on a CSV of 64 texts
    python bench/bench_ray.py --zoo-default --no-single   # the zoo default (4 models, 4 methods, 64 examples)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

SKIP = {"seconds", "created", "metric_seconds", "explain_seconds_per_sample", "explain_seconds"}
SKIP |= {"environment", "engine", "reused"}


def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if k not in SKIP}
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o


def differences(x, y, path: str = "") -> list[str]:
    """Paths where two stripped results differ (for the report when they are not identical)."""
    if type(x) is not type(y):
        return [f"{path}: {x!r} != {y!r}"]
    if isinstance(x, dict):
        out = [f"{path}/{k}: only in one" for k in set(x) ^ set(y)]
        for k in x.keys() & y.keys():
            out += differences(x[k], y[k], f"{path}/{k}")
        return out
    if isinstance(x, list) and len(x) == len(y):
        return [d for i, (u, v) in enumerate(zip(x, y)) for d in differences(u, v, f"{path}[{i}]")]
    return [] if x == y else [f"{path}: {x!r} != {y!r}"]


def max_relative(x, y) -> float:
    """Largest |x - y| / max(|x|, 1e-12) over the numbers both results hold at the same place."""
    if isinstance(x, dict) and isinstance(y, dict):
        return max([max_relative(x[k], y[k]) for k in x.keys() & y.keys()] or [0.0])
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return max([max_relative(u, v) for u, v in zip(x, y)] or [0.0])
    if isinstance(x, float) and isinstance(y, float):
        return abs(x - y) / max(abs(x), 1e-12)
    return 0.0 if x == y else float("inf")


class TreeCpu:
    """CPU seconds (user + system) used by this process and its descendants between start() and stop():
    ``/proc/PID/stat`` of the tree polled every 0.1 s, each process counted from its value at start (0 for
    processes started later) to the last value seen."""

    def __init__(self):
        import threading

        self.tick = os.sysconf("SC_CLK_TCK")
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}

    def _tree(self) -> dict[int, float]:
        parent: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as fh:
                    f = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(d)] = int(f[1])
            cpu[int(d)] = (int(f[11]) + int(f[12])) / self.tick
        mine, todo = {os.getpid()}, [os.getpid()]
        children: dict[int, list[int]] = {}
        for pid, pp in parent.items():
            children.setdefault(pp, []).append(pid)
        while todo:
            for c in children.get(todo.pop(), []):
                if c not in mine:
                    mine.add(c)
                    todo.append(c)
        return {pid: cpu[pid] for pid in mine if pid in cpu}

    def _poll(self) -> None:
        while not self.stop_event.wait(0.1):
            self.last.update(self._tree())

    def start(self) -> TreeCpu:
        self.first = self._tree()
        self.last = dict(self.first)
        self.thread.start()
        return self

    def stop(self) -> float:
        self.stop_event.set()
        self.thread.join()
        self.last.update(self._tree())
        return sum(v - self.first.get(pid, 0.0) for pid, v in self.last.items())


def text_case(root: Path) -> tuple[list[str], object]:
    """A random-init 2-layer BERT (hidden 32, vocabulary of 12 words, classes negative/positive) saved as a
    Hugging Face folder, and a CSV of 64 texts of 2-24 words (read lazily, shipped to Ray's workers)."""
    import numpy as np
    import transformers

    from relprop.specs import load_data

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "plot", "very", "not"]
    folder = root / "bert"
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizer.from_pretrained(str(folder)).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=2,
                                  id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})  # fmt: skip
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
    rng = np.random.RandomState(0)
    rows = [(" ".join(rng.choice(words[5:], rng.randint(2, 25))), ["negative", "positive"][k % 2]) for k in range(64)]
    (root / "texts.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    return [f"hf:{folder}"], load_data(str(root / "texts.csv"))


def main() -> None:
    from relprop import zoo
    from relprop.cli import default_methods
    from relprop.report import Settings, run_compare
    from relprop.specs import load_data, parse_methods

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--zoo-default", action="store_true", help="the zoo default models, methods and settings")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-single", action="store_true", help="skip the 1-worker / 1-thread pair")
    p.add_argument("--folder", action="store_true", help="the digits as a PNG folder (streamed, shipped as bytes)")
    p.add_argument("--repeat", type=int, default=1, help="runs per mode, interleaved; the table shows medians")
    p.add_argument("--text", action="store_true", help="a random-init BERT on a CSV of texts (read lazily)")
    a = p.parse_args()
    if a.zoo_default:
        models = [f"zoo:{m}" for m in zoo.DEFAULT_MODELS]
        methods = parse_methods(None, default_methods())
        settings = Settings()
    else:
        models = ["zoo:resnet_digits", "zoo:vgg_digits"]
        methods = parse_methods("lrp,gradient", [])
        settings = Settings(samples=a.samples, batch_size=a.batch_size, sensitivity_samples=8, randomisation_samples=4)
    data = load_data(f"zoo:{zoo.DEFAULT_DATASET}")
    root = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    if a.text:
        models, data = text_case(root)
    if a.folder:
        from PIL import Image

        for i in range(len(data)):
            d = root / "pngs" / data.class_names[int(data.labels[i])]
            d.mkdir(parents=True, exist_ok=True)
            im = (data.images[i][0].numpy() * 255).round().astype("uint8")
            Image.fromarray(im, "L").save(d / f"{i:04d}.png")
        data = load_data(str(root / "pngs"))

    def run(name: str, threads: int, **kw) -> tuple[float, float, dict]:
        torch.set_num_threads(threads)
        out = root / name
        meter = TreeCpu().start()
        t0 = time.perf_counter()
        res = run_compare(models, data, methods, out, settings, progress=False, use_cache=False, command="bench",
                          log=lambda _: None, **kw)  # fmt: skip
        wall = time.perf_counter() - t0
        cpu = meter.stop()
        assert res["status"] == "complete", res.get("problems")
        return wall, cpu, strip(json.loads((out / "results.json").read_text()))

    import ray

    rows = []
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    ray.init(num_cpus=a.workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    t_init = time.perf_counter() - t0
    try:
        for w in sorted({a.workers} if a.no_single else {1, a.workers}):
            times: dict[str, list[float]] = {"ray": [], "local": [], "ray cpu": [], "local cpu": []}
            for k in range(max(1, a.repeat)):
                # Ray first: its workers check that they run the driver's relprop source (hashed once per process)
                t_ray, c_ray, r_ray = run(f"ray{w}_{k}", 1, engine="ray", ray_options={"workers": w})
                t_local, c_local, r_local = run(f"local{w}_{k}", w)
                for key, v in (("ray", t_ray), ("local", t_local), ("ray cpu", c_ray), ("local cpu", c_local)):
                    times[key].append(v)
                print(f"workers {w}, run {k}: ray {t_ray:.1f} s ({c_ray:.1f} s CPU), local {t_local:.1f} s "
                      f"({c_local:.1f} s CPU), load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
                diffs = differences(r_local, r_ray)
                for d in diffs[:10]:
                    print("differs:", d[:300])
                if diffs:
                    print(f"{len(diffs)} values differ; largest relative difference {max_relative(r_local, r_ray):.2e}")
            rel = max_relative(r_local, r_ray) if r_local != r_ray else 0.0
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((w, med["local"], med["ray"], med["local cpu"], med["ray cpu"], rel))
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    cells = len(models) * len(methods)
    print(
        f"\n{len(models)} models x {len(methods)} methods = {cells} cells, {min(settings.samples, len(data))} "
        f"examples each, batch {settings.batch_size}; torch {torch.__version__}, ray {ray.__version__}, "
        f"{os.cpu_count()} CPUs; ray.init {t_init:.1f} s (not included below); data {data.spec}"
        f"{' (PNG files, shipped to the workers as bytes)' if a.folder else ' (texts read lazily, shipped)' if a.text else ' (in memory)'}; median of "
        f"{max(1, a.repeat)} interleaved run(s) per mode; load average {load0[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    print(
        f"| {'workers':>7} | {'local (s)':>9} | {'ray (s)':>7} | {'ray / local':>11} | {'local CPU (s)':>13} | "
        f"{'ray CPU (s)':>11} | {'CPU ray / local':>15} | numbers vs local        |"
    )
    print(f"|{'-' * 9}|{'-' * 11}|{'-' * 9}|{'-' * 13}|{'-' * 15}|{'-' * 13}|{'-' * 17}|{'-' * 25}|")
    for w, tl, tr, cl, cr, rel in rows:
        same = "identical" if rel == 0 else f"{rel:.1e} relative at most"
        print(
            f"| {w:>7} | {tl:>9.1f} | {tr:>7.1f} | {tr / tl:>10.2f}x | {cl:>13.1f} | {cr:>11.1f} | "
            f"{cr / cl:>14.2f}x | {same:<23} |"
        )
    print(
        "local: one process with `workers` torch threads; ray: `workers` actors of one thread each; CPU: this "
        "process and every process under it (Ray's daemons and workers included)"
    )


if __name__ == "__main__":
    main()
