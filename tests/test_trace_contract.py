"""The tracer's contract with the caller: one training-mode warning, dict inputs as in explain, and a
model left untouched (buffers' version counters included)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import relprop


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Dropout(0.2), nn.Linear(6, 3)).train()


def _training_warnings(fn):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in got if "training mode" in str(w.message)]


@pytest.mark.parametrize(
    "method, options",
    [("gradient", {}), ("lrp", {"composite": "epsilon"}), ("integrated_gradients", {"n_steps": 8})],
)
def test_one_training_mode_warning_per_call(method, options):
    model, x = _bn_net(), torch.randn(4, 6)
    # integrated gradients: 8 steps in internal batches of 32 rows are several recordings, one warning.
    msgs = _training_warnings(
        lambda: (
            relprop.explain(model, x, target=0, method=method, internal_batch_size=8, **options)
            if method == "integrated_gradients"
            else relprop.explain(model, x, target=0, method=method, **options)
        )
    )
    assert len(msgs) == 1, msgs
    assert "model.eval()" in msgs[0] and "'1'" in msgs[0] and "'2'" in msgs[0]  # names the batch norm and dropout
    assert _training_warnings(lambda: relprop.explain(model.eval(), x, target=0, method=method, **options)) == []


def test_trace_warns_once_and_says_what_it_records():
    (msg,) = _training_warnings(lambda: relprop.trace(_bn_net(), torch.randn(4, 6)))
    assert "dropout masks" in msg and "running statistics are left unchanged" in msg


def test_trace_takes_a_dict_as_keyword_arguments_like_explain():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, scale=None):
            return self.fc(x) * scale

    model = KW().eval()
    d = {"x": torch.randn(2, 3), "scale": torch.rand(2, 1) + 0.5}
    graph = relprop.trace(model, d)
    torch.testing.assert_close(graph.output, model(**d))
    assert len(graph.inputs) == 2
    assert graph.input_spec[1].keys() == d.keys()
    e = relprop.explain(model, d, target=1, method="gradient")
    assert set(e.attributions) == {"x", "scale"}


def test_trace_refuses_a_dict_for_a_model_taking_one_dict_argument():
    class Batch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, batch):
            return self.fc(batch["x"])

    model = Batch().eval()
    d = {"x": torch.randn(2, 3)}
    with pytest.raises(TypeError, match=r"keyword arguments.*relprop\.trace\(model, batch=inputs\)"):
        relprop.trace(model, d)
    torch.testing.assert_close(relprop.trace(model, batch=d).output, model(d))  # the way to pass one dict


def test_training_mode_trace_leaves_buffers_untouched():
    model, x = _bn_net(), torch.randn(4, 6)
    bn = model[1]
    before = {k: (v.clone(), v._version) for k, v in model.state_dict(keep_vars=True).items()}
    with pytest.warns(UserWarning, match="training mode"):
        relprop.explain(model, x, target=0, method="lrp", composite="epsilon")
    for k, v in model.state_dict(keep_vars=True).items():
        assert torch.equal(v, before[k][0]), f"{k} was written"
        # The one write the forward makes in Python (``num_batches_tracked.add_(1)``) goes to a private copy,
        # but autograd counts it on the buffer before the recorder sees it (no private setter undoes that:
        # relprop.plan tells such bumps from edits by the content). Every other counter is untouched.
        bumps = 1 if k.endswith("num_batches_tracked") else 0
        assert v._version == before[k][1] + bumps, f"{k}: version counter"
    assert int(bn.num_batches_tracked) == 0
    # A backward of the user's own train step through a buffer saved before the explanation still runs.
    out = model(x).sum()
    with pytest.warns(UserWarning, match="training mode"):
        relprop.trace(model, x)
    out.backward()
    assert int(bn.num_batches_tracked) == 1  # the user's own forward counts, the trace does not


def test_plan_in_training_mode_replays_instead_of_recording_again():
    model, x = _bn_net(), torch.randn(4, 6)
    model[2].p = 0.0  # no random op: a recording in training mode can be replayed
    p = relprop.plan(model, x, method="gradient", target=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = relprop.explain(model, x, target=0).attributions
    for _ in range(2):
        msgs = _training_warnings(lambda: torch.testing.assert_close(p.explain(x).attributions, want))
        assert len(msgs) == 1 and msgs[0].startswith("relprop: the model is in training mode"), msgs  # the same one
    assert p.rerecords == 0 and p.replays == 2, p.last_reason
