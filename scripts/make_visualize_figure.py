"""Make docs/visualize.png: one LRP attribution drawn by relprop.visualize, Captum's visualize_image_attr
and Zennit's imgify, side by side (the README's "Pictures" section).

    python scripts/make_visualize_figure.py [--out docs/visualize.png]

Uses the shipped zoo model ``resnet_faces`` on a test image of ``zoo:faces`` (Olivetti faces, in
scikit-learn): nothing is downloaded. Needs matplotlib, captum and zennit (the test environment).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import relprop
from relprop import visualize as V
from relprop import zoo


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/visualize.png")
    ap.add_argument("--index", type=int, default=3, help="test image of zoo:faces")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from captum.attr import visualization as cviz
    from zennit.image import imgify, interval_norm_bounds, palette

    model = zoo.load_model("resnet_faces")
    data = zoo.load_dataset("faces", split="test")
    x = data.images[args.index : args.index + 1]
    raw = data.raw_images[args.index]
    with torch.no_grad():
        target = int(model(x).argmax(1))
    e = relprop.explain(model, x, target=target, method="lrp", composite="epsilon_plus_flat")
    a = e.attributions[0].detach()  # (C, H, W)
    heat = a.sum(0).numpy()

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.9), gridspec_kw={"wspace": 0.45})
    axes[0].imshow(raw.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("input (zoo:faces)")
    axes[0].axis("off")

    V.image(a, raw, method="overlay", sign="all", axes=[axes[1]])
    axes[1].set_title("relprop.visualize.image\n(overlay, sign='all')")

    attr_hwc = a.permute(1, 2, 0).numpy()
    img_hwc = np.repeat(raw.permute(1, 2, 0).numpy(), 3, axis=-1)
    cviz.visualize_image_attr(
        attr_hwc, img_hwc, method="blended_heat_map", sign="all", plt_fig_axis=(fig, axes[2]), use_pyplot=False,
        show_colorbar=True, title="Captum visualize_image_attr\n(blended_heat_map, sign='all')",
    )  # fmt: skip
    try:
        z = np.asarray(imgify(heat, symmetric=True, cmap="coldnhot").convert("RGB"))
    except TypeError:  # zennit 0.5.1's putpalette with numpy 2 / Pillow 13: the same steps by hand
        vmin, vmax = interval_norm_bounds(heat, symmetric=True, dim=(0, 1))
        idx = ((heat - vmin) / (vmax - vmin) * 255).clip(0, 255).astype(np.uint8)
        z = np.asarray(palette("coldnhot", 1.0)).reshape(-1, 3)[idx]
    axes[3].imshow(z)
    axes[3].set_title("Zennit imgify\n(symmetric, cmap='coldnhot')")
    axes[3].axis("off")
    fig.suptitle(f"The same LRP attribution (resnet_faces, class {target}) three ways", y=1.0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    return out


if __name__ == "__main__":
    main()
