"""Small architectures of the default zoo, built only from standard PyTorch modules/ops.

Each is a miniature of a well-known family, so that explanation methods can be compared across
structurally different networks:

* :class:`SmallResNet`   conv/BN/ReLU stem, basic residual blocks (residual ``add``, 1x1
                         projection shortcuts), adaptive average pooling, linear head.
* :class:`SmallVGG`      stacks of conv/ReLU + max pooling, flatten, linear/ReLU/linear.
* :class:`SmallDenseNet` dense blocks (BN-ReLU-conv, feature ``cat``), transitions with 1x1 conv
                         and average pooling, adaptive average pooling, linear head.
* :class:`SmallViT`      conv patch embedding, cls token (``cat``), learned position embedding,
                         pre-norm transformer blocks (LayerNorm, multi-head self-attention written
                         with ``matmul``/``softmax``, GELU MLP), cls-token head.

No in-place ops, no fused attention kernels, no dropout at inference.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        w0 = widths[0]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
        layers, cin = [], w0
        for i, w in enumerate(widths):
            layers.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


class SmallVGG(nn.Module):
    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64), image_size: int = 32, hidden: int = 64
    ):
        super().__init__()
        feats, cin = [], in_channels
        for w in widths:
            feats += [nn.Conv2d(cin, w, 3, 1, 1), nn.ReLU(), nn.Conv2d(w, w, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*feats)
        side = image_size // 2 ** len(widths)
        self.pool = nn.AdaptiveAvgPool2d(min(side, 4))
        side = min(side, 4)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * side * side, hidden),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(self.relu(self.bn(x)))], dim=1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(self.relu(self.bn(x))))


class SmallDenseNet(nn.Module):
    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, growth: int = 12, block_layers=(3, 3, 3), stem: int = 16
    ):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)]
        c = stem
        for i, n in enumerate(block_layers):
            for _ in range(n):
                mods.append(DenseLayer(c, growth))
                c += growth
            if i < len(block_layers) - 1:
                mods.append(Transition(c, c // 2))
                c //= 2
        mods += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*mods)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.features(x))))


class Attention(nn.Module):
    """Multi-head self-attention with explicit matmul/softmax (traceable, no fused kernels)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (b, heads, n, head_dim)
        attn = self.softmax(torch.matmul(q, k.permute(0, 1, 3, 2)) * self.scale)
        out = torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(b, n, d)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 32,
        patch: int = 4,
        dim: int = 64,
        depth: int = 3,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        n = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)  # (b, dim, h, w)
        b, _d = x.shape[0], x.shape[1]
        x = x.flatten(2).permute(0, 2, 1)  # (b, n, dim)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "SmallResNet": SmallResNet,
    "SmallVGG": SmallVGG,
    "SmallDenseNet": SmallDenseNet,
    "SmallViT": SmallViT,
}


def build(architecture: str, **kwargs) -> nn.Module:
    """Instantiate an architecture by class name with keyword arguments (from the JSON metadata)."""
    if architecture not in ARCHITECTURES:
        import difflib

        close = difflib.get_close_matches(architecture, list(ARCHITECTURES), n=1, cutoff=0.0)
        raise ValueError(
            f"Unknown architecture {architecture!r}. Available: {', '.join(ARCHITECTURES)}."
            + (f" Did you mean {close[0]!r}?" if close else "")
        )
    return ARCHITECTURES[architecture](**kwargs)
