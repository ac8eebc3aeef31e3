"""The recorded graph: module paths, leaves, in-place writes as new values, data recomputed on demand."""

import torch
import torch.nn as nn

import relprop


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(4, 2)
        self.register_buffer("offset", torch.ones(4))

    def forward(self, x):
        h = self.block(x).mean((2, 3))
        h = h + self.offset
        h[:, 1:].mul_(2.0)  # a partial in-place write on an intermediate
        return self.head(h)


def test_module_paths_and_leaves():
    model = Net().eval()
    g = relprop.trace(model, torch.randn(2, 3, 5, 5))
    conv = g.find(lambda n: n.packet == "convolution")
    assert [n.module for n in conv] == ["block.conv"] and conv[0].module_type is nn.Conv2d
    assert {"block.conv.weight", "head.weight", "head.bias"} <= set(g.params)
    assert any(v.kind == "buffer" and v.name == "offset" for v in g.values)
    assert [v.kind for v in g.inputs] == ["input"]
    assert g.module_types["block.bn"] is nn.BatchNorm2d


def test_inplace_write_is_a_new_value_and_old_data_is_recomputed():
    model = Net().eval()
    x = torch.randn(2, 3, 5, 5)
    g = relprop.trace(model, x)
    relu = g.find(lambda n: n.packet == "relu")[0]
    before, after = relu.inputs[0], relu.outputs[0]
    assert before is not after
    # The in-place ReLU overwrote the batch-norm output; the graph still gives the value it had.
    assert before.data is None
    expected = model.block.bn(model.block.conv(x))
    torch.testing.assert_close(before.tensor, expected.detach())
    assert (after.tensor >= 0).all()
    # The partial write is recorded as a scatter into the written storage.
    assert g.find(lambda n: n.packet == "as_strided_scatter")


def test_trace_leaves_model_untouched_and_works_under_no_grad():
    model = Net().train()
    model.head.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        g = relprop.trace(model, torch.randn(2, 3, 5, 5))
    assert len(g) > 5
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert not torch.nn.modules.module._global_forward_hooks


def test_coverage_table_names_rules():
    cov = relprop.coverage(Net().eval(), torch.randn(2, 3, 5, 5), composite="epsilon_plus_flat")
    assert cov.fraction == 1.0
    text = str(cov)
    assert "Flat()" in text and "aten.convolution.default" in text
