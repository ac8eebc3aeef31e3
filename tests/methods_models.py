"""Small models shared by the methods tests (a residual CNN and a tiny ViT)."""

import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.b1 = nn.BatchNorm2d(c)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.r2 = nn.ReLU()

    def forward(self, x):
        return self.r2(self.c2(self.r1(self.b1(self.c1(x)))) + x)


class ResCNN(nn.Module):
    """conv -> maxpool -> conv -> ReLU -> residual block -> GAP -> linear (every ReLU its own module).

    The max pool does not sit next to a ReLU: Captum's DeepLift hooks break there (its own convergence
    delta is not zero), see ``test_captum_deeplift_maxpool_after_relu_is_wrong``.
    """

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.block = Block(8)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.gap(self.block(self.relu(self.conv(self.pool(self.stem(x)))))).flatten(1))


def res_cnn():
    torch.manual_seed(0)
    m = ResCNN().eval()
    with torch.no_grad():
        m.block.b1.running_mean.normal_(0, 0.1)
        m.block.b1.running_var.uniform_(0.5, 1.5)
    x = torch.randn(3, 3, 16, 16)
    return m, x, torch.tensor([0, 3, 1]), torch.randn(3, 3, 16, 16) * 0.1


def vit():
    import timm

    torch.manual_seed(0)
    m = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    return m, x, torch.tensor([1, 4]), torch.randn(2, 3, 32, 32) * 0.1


class TokenModel(nn.Module):
    """Token ids -> embedding -> (masked) tanh mean -> linear: the smallest token model."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.lin = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None].to(h.dtype)
        return self.lin(torch.tanh(h).mean(1))
