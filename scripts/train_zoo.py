#!/usr/bin/env python
"""Train the embedded default zoo and write src/relprop/zoo/weights/NAME.{safetensors,json}.

    python scripts/train_zoo.py              # train every model (about a minute on 2 CPU cores)
    python scripts/train_zoo.py vit_digits   # train only the named models

Everything is deterministic on CPU: fixed seeds (torch.manual_seed per model, a seeded generator
for the batch order), ``torch.use_deterministic_algorithms(True)``, the datasets' fixed
train/test split (``relprop.zoo.data.SPLIT_SEED``). The accuracy written to the JSON file is
recomputed from the *saved* weights via ``relprop.zoo.load_model`` + ``relprop.zoo.evaluate``,
exactly as tests/test_zoo.py does.

The ``chest_xray`` model is a demo only: 16 images are too few for a held-out split, so it is
trained and evaluated on all 16 (its JSON says ``eval_split: "all"``, ``test_accuracy: null``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from relprop import zoo  # noqa: E402
from relprop.zoo.models import build  # noqa: E402

SEED = 0

# name: (architecture, arch_kwargs, family, dataset, epochs, batch_size, optimizer settings)
SPECS: dict[str, dict] = {
    "resnet_digits": dict(
        architecture="SmallResNet",
        family="ResNet",
        arch_kwargs=dict(in_channels=1, num_classes=10, widths=[16, 32, 64]),
        dataset="digits",
        epochs=8,
        batch_size=64,
        optimizer=dict(name="AdamW", lr=3e-3, weight_decay=1e-4),
    ),
    "vgg_digits": dict(
        architecture="SmallVGG",
        family="VGG",
        arch_kwargs=dict(in_channels=1, num_classes=10, widths=[16, 32, 64], image_size=32, hidden=64),
        dataset="digits",
        epochs=10,
        batch_size=64,
        optimizer=dict(name="AdamW", lr=2e-3, weight_decay=1e-4),
    ),
    "densenet_digits": dict(
        architecture="SmallDenseNet",
        family="DenseNet",
        arch_kwargs=dict(in_channels=1, num_classes=10, growth=12, block_layers=[3, 3, 3], stem=16),
        dataset="digits",
        epochs=8,
        batch_size=64,
        optimizer=dict(name="AdamW", lr=3e-3, weight_decay=1e-4),
    ),
    "vit_digits": dict(
        architecture="SmallViT",
        family="ViT",
        arch_kwargs=dict(
            in_channels=1, num_classes=10, image_size=32, patch=4, dim=64, depth=3, heads=4, mlp_ratio=2.0
        ),
        dataset="digits",
        epochs=25,
        batch_size=64,
        optimizer=dict(name="AdamW", lr=1e-3, weight_decay=5e-2),
    ),
    "resnet_faces": dict(
        architecture="SmallResNet",
        family="ResNet",
        arch_kwargs=dict(in_channels=1, num_classes=2, widths=[16, 32, 64]),
        dataset="faces",
        epochs=15,
        batch_size=32,
        optimizer=dict(name="AdamW", lr=2e-3, weight_decay=1e-4),
    ),
    "vgg_faces": dict(
        architecture="SmallVGG",
        family="VGG",
        arch_kwargs=dict(in_channels=1, num_classes=2, widths=[16, 32, 64], image_size=32, hidden=64),
        dataset="faces",
        epochs=25,
        batch_size=32,
        optimizer=dict(name="AdamW", lr=1e-3, weight_decay=1e-4),
    ),
    "vgg_xray": dict(
        architecture="SmallVGG",
        family="VGG",
        arch_kwargs=dict(in_channels=1, num_classes=2, widths=[8, 16, 32], image_size=64, hidden=32),
        dataset="chest_xray",
        epochs=60,
        batch_size=8,
        optimizer=dict(name="AdamW", lr=2e-3, weight_decay=1e-4),
    ),
}


def train_one(name: str, spec: dict, out_dir: Path) -> dict:
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    held_out = spec["dataset"] != "chest_xray"
    train = zoo.load_dataset(spec["dataset"], "train")
    evald = zoo.load_dataset(spec["dataset"], "test" if held_out else "all")
    model = build(spec["architecture"], **spec["arch_kwargs"])
    opt_cfg = spec["optimizer"]
    opt = torch.optim.AdamW(model.parameters(), lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"])
    steps = spec["epochs"] * ((len(train) + spec["batch_size"] - 1) // spec["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt_cfg["lr"], total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.perf_counter()
    for epoch in range(spec["epochs"]):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        total = 0.0
        for i in range(0, len(train), spec["batch_size"]):
            idx = perm[i : i + spec["batch_size"]]
            x, y = train.images[idx], train.labels[idx]
            if held_out:  # light augmentation: random shift by up to 2 pixels
                dx, dy = (torch.randint(-2, 3, (2,), generator=gen)).tolist()
                x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
    seconds = time.perf_counter() - t0
    model.eval()
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / f"{name}.safetensors"), metadata={"name": name})

    info = {
        "name": name,
        "family": spec["family"],
        "architecture": spec["architecture"],
        "arch_kwargs": spec["arch_kwargs"],
        "dataset": spec["dataset"],
        "input_shape": list(train.input_shape),
        "num_classes": len(train.class_names),
        "class_names": train.class_names,
        "normalization": {
            "mean": train.mean,
            "std": train.std,
            "note": "inputs = (raw_pixels_in_[0,1] - mean) / std; Dataset.images are already normalised",
        },
        "seed": SEED,
        "split_seed": zoo.data.SPLIT_SEED,
        "epochs": spec["epochs"],
        "batch_size": spec["batch_size"],
        "optimizer": dict(
            opt_cfg,
            scheduler="OneCycleLR(pct_start=0.2)",
            loss="cross_entropy",
            augmentation="random roll by up to 2 px" if held_out else "none",
        ),
        "train_size": len(train),
        "eval_split": evald.split,
        "eval_size": len(evald),
        "num_params": sum(p.numel() for p in model.parameters()),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "training_seconds_2cpu": round(seconds, 1),
        "final_train_loss": round(total / len(train), 5),
        "command": f"python scripts/train_zoo.py {name}",
        "notes": ""
        if held_out
        else (
            "Demo model: 16 images are too few to hold any out; trained and evaluated "
            "on all 16, so 'accuracy' is TRAINING accuracy, not a generalisation estimate."
        ),
    }
    (out_dir / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    zoo._info.cache_clear()
    reloaded = zoo.load_model(name)
    info["accuracy"] = zoo.evaluate(reloaded, evald)
    info["train_accuracy"] = zoo.evaluate(reloaded, train)
    info["test_accuracy"] = info["accuracy"] if held_out else None
    (out_dir / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    zoo._info.cache_clear()
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"models to train (default: all of {', '.join(SPECS)})")
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "relprop" / "zoo" / "weights")
    args = ap.parse_args(argv)
    names = args.names or list(SPECS)
    for n in names:
        if n not in SPECS:
            raise SystemExit(f"unknown model {n!r}; choose from {', '.join(SPECS)}")
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    for n in names:
        info = train_one(n, SPECS[n], args.out)
        size = (args.out / f"{n}.safetensors").stat().st_size
        print(
            f"{n:16s} {info['family']:9s} params={info['num_params']:7d} size={size / 1024:6.1f} KiB "
            f"{info['eval_split']}_acc={info['accuracy']:.4f} train_acc={info['train_accuracy']:.4f} "
            f"time={info['training_seconds_2cpu']:.1f}s",
            flush=True,
        )
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
