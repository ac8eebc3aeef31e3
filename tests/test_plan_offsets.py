"""relprop.plan and storage offsets: batches sliced from one tensor (``X[i:i + 2]``) replay and give
relprop.explain's bits, unless the recording holds an op that reads absolute storage offsets
(``as_strided``), where a batch at another offset records again and says so."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprop
from methods_models import res_cnn, vit
from relprop.plan import _reads_offsets


def _equal(a: relprop.Explanation, b: relprop.Explanation) -> None:
    for x, y in zip(a.tensors(), b.tensors(), strict=True):
        assert torch.equal(x, y), (x - y).abs().max().item()
    assert torch.equal(a.output, b.output) and torch.equal(a.score, b.score)


@pytest.mark.parametrize("make", [res_cnn, vit], ids=["resnet_bn", "vit"])
def test_slices_of_one_tensor_replay_bit_for_bit(make):
    m, x, _, _ = make()
    X = torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    p = relprop.plan(m, X[:2], target=1)
    for i in range(0, 8, 2):
        b = X[i : i + 2]
        assert b.storage_offset() == i * X.stride(0)
        _equal(p.explain(b), relprop.explain(m, b, target=1, method="lrp"))
    assert p.rerecords == 0 and p.replays == 4, p.last_reason
    # a contiguous copy (offset 0, own storage) replays too
    _equal(p.explain(X[6:].clone()), relprop.explain(m, X[6:].clone(), target=1, method="lrp"))
    assert p.rerecords == 0 and p.replays == 5


class _Strided(nn.Module):
    """Reads its input through ``as_strided`` with an absolute storage offset (0): at another offset of
    the same storage the op reads other memory."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x):
        return self.lin(x.as_strided((2, 8), (x.stride(0), 1), 0))


def test_as_strided_with_absolute_offset_still_records_and_says_why():
    torch.manual_seed(0)
    m = _Strided().eval()
    X = torch.randn(6, 8)
    p = relprop.plan(m, X[:2], target=1)
    assert _reads_offsets(p._template.graph)
    b = X[2:4]
    got = p.explain(b)
    assert p.rerecords == 1 and p.last_reason == "changed: input 0: storage offset 0 -> 16"
    _equal(got, relprop.explain(m, b, target=1, method="lrp"))
    # A replay of the offset-0 recording on the slice itself would read X[0:2] through the absolute offset
    # (the recorder runs the forward on a copy of a floating input, at offset 0: rows 2-3).
    assert not torch.equal(got.output, m(X[:2]).detach())
    p.explain(X[2:4])
    assert p.rerecords == 1 and p.replays == 1


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, a, b):
        return self.lin(a * b)


def test_inputs_sharing_a_storage_are_part_of_the_signature():
    torch.manual_seed(0)
    m = _Two().eval()
    x = torch.randn(2, 4)
    p = relprop.plan(m, (x, x), target=1)
    y = torch.randn(2, 4)
    _equal(p.explain((x, y)), relprop.explain(m, (x, y), target=1, method="lrp"))
    assert p.rerecords == 1
    assert p.last_reason == "changed: inputs sharing a storage: [0, 0] -> [0, 1] (first input on each one)"


def test_reason_names_every_changed_field():
    torch.manual_seed(0)
    m = _Two().eval()
    p = relprop.plan(m, (torch.randn(2, 4), torch.randn(2, 4)), target=1)
    p.explain((torch.randn(2, 4), torch.randn(4, 2).t()))
    assert p.last_reason == "changed: input 1: strides (4, 1) -> (1, 2)"
    p.explain((torch.randn(3, 4), torch.randn(4, 3).t()))
    assert (
        p.last_reason
        == "changed: input 0: shape (2, 4) -> (3, 4), input 1: shape (2, 4) -> (3, 4), input 1: strides (1, 2) -> (1, 3)"
    )
