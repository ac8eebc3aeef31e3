"""Streamed data vs everything decoded in memory: time and peak memory of a full accuracy-style pass.

    python bench/bench_data.py                 # 3,000 RGB images of 128 px, 10 classes
    python bench/bench_data.py --n 500 --size 64   # quick look

Writes the images once as an image folder and as WebDataset tar shards, then runs each mode in a fresh
process (so that peak memory is its own): ``eager`` decodes every image into a list first (what
``load_data`` did before the sources were lazy) and then runs a small CNN over batches; the lazy modes
load the folder / the shards with ``relprop.specs.load_data`` and read batches through
``relprop.specs.sources.batches`` (a DataLoader, 0 or 2 worker processes). Also the cache key
(``Data.fingerprint``): decoded tensors (eager) vs stored bytes (lazy). Prints seconds and the peak RSS
above the process's RSS before loading (VmHWM - VmRSS), and both as ratios of ``eager``.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def write_data(root: Path, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    members = []
    for i in range(n):
        a = (rng.rand(size, size, 3) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        c = i % 10
        (root / "folder" / str(c)).mkdir(parents=True, exist_ok=True)
        (root / "folder" / str(c) / f"{i:06d}.png").write_bytes(buf.getvalue())
        members += [(f"{c}_{i:06d}.png", buf.getvalue()), (f"{c}_{i:06d}.cls", str(c).encode())]
    (root / "shards").mkdir()
    per = 1000
    for s in range(0, len(members), 2 * per):
        with tarfile.open(root / "shards" / f"s-{s // (2 * per):03d}.tar", "w") as tf:
            for name, b in members[s : s + 2 * per]:
                info = tarfile.TarInfo(name)
                info.size = len(b)
                tf.addfile(info, io.BytesIO(b))


def run_mode(mode: str, root: Path, batch: int) -> dict:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(  # small activations: the data, not the model, is what differs between modes
        nn.Conv2d(3, 16, 8, stride=8), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 10),
    ).eval()  # fmt: skip
    from relprop.specs import load_data, read_image
    from relprop.specs.sources import batches

    base = rss_kb("VmRSS")
    t0 = time.perf_counter()
    correct = 0
    with torch.no_grad():
        if mode == "eager":
            data = load_data(str(root / "folder"))
            files = sorted((root / "folder").rglob("*.png"))
            images = [read_image(f) for f in files]  # the former load_data: every image decoded up front
            t_fp = time.perf_counter()
            from relprop.specs.data import Data

            eager = Data(
                spec="x", name="x", kind="image", labels=data.labels, class_names=data.class_names, images=images
            )
            eager.fingerprint()
            t_fp = time.perf_counter() - t_fp
            for a in range(0, len(images), batch):
                x = torch.stack(images[a : a + batch])
                correct += int((model(x).argmax(-1) == data.labels[a : a + batch]).sum())
        else:
            kind, workers = mode.split("-")
            data = load_data(str(root / ("folder" if kind == "folder" else "shards")), loader_workers=int(workers))
            t_fp = time.perf_counter()
            data.fingerprint()
            t_fp = time.perf_counter() - t_fp
            for idx, items in batches(data, range(len(data)), batch):
                correct += int((model(torch.stack(items)).argmax(-1) == data.labels[idx]).sum())
    return {
        "mode": mode,
        "seconds": time.perf_counter() - t0,
        "fingerprint_seconds": t_fp,
        "peak_mb": (rss_kb("VmHWM") - base) / 1024,
        "correct": correct,
        "n": len(data),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, Path(args.root), args.batch)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data(root, args.n, args.size)
        rows = []
        for mode in ("eager", "folder-0", "folder-2", "tar-0"):
            out = subprocess.run(
                [sys.executable, __file__, "--mode", mode, "--root", str(root), "--batch", str(args.batch)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = rows[0]
    assert all(r["correct"] == ref["correct"] and r["n"] == ref["n"] for r in rows), rows
    print(f"{args.n} images of {args.size} px, batch {args.batch} (every mode: the same {ref['correct']} correct)")
    print(f"{'mode':<10}{'seconds':>9}{'x eager':>9}{'peak MB':>9}{'x eager':>9}{'key s':>8}{'x eager':>9}")
    for r in rows:
        print(
            f"{r['mode']:<10}{r['seconds']:>9.2f}{r['seconds'] / ref['seconds']:>9.2f}{r['peak_mb']:>9.0f}"
            f"{r['peak_mb'] / max(ref['peak_mb'], 1e-9):>9.2f}{r['fingerprint_seconds']:>8.2f}"
            f"{r['fingerprint_seconds'] / max(ref['fingerprint_seconds'], 1e-9):>9.2f}"
        )


if __name__ == "__main__":
    main()
