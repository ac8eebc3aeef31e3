"""relprop.plan: a replayed recording gives relprop.explain's answer, and records again whenever the
batch or the model differs in a way the plan can see (shape, train/eval, parameter edits, values read
back into Python, data-dependent shapes, random draws)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprop
from methods_models import res_cnn
from relprop.plan import PlanMismatch


def _same(a: relprop.Explanation, b: relprop.Explanation, tol: float = 1e-6) -> None:
    for x, y in zip(a.tensors(), b.tensors()):
        assert x.shape == y.shape and x.dtype == y.dtype
        scale = max(1.0, y.abs().max().item())
        assert (x - y).abs().max().item() <= tol * scale, (x - y).abs().max().item()
    torch.testing.assert_close(a.output, b.output, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.score, b.score, rtol=0, atol=1e-6)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def _run(model, batches, target, **options):
    p = relprop.plan(model, batches[0], target=target, **options)
    for b in batches:
        got = p.explain(b)
        want = relprop.explain(model, b, target=target, **options)
        _same(got, want)
    assert p.records == 1 and p.rerecords == 0, p.last_reason
    assert p.replays == len(batches)
    return p


# ------------------------------------------------------------------------ equals relprop.explain
@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus_flat"])
def test_cnn_matches_explain(composite):
    m = _cnn()
    _run(m, [torch.randn(2, 3, 12, 12) for _ in range(3)], 2, method="lrp", composite=composite)


def test_residual_matches_explain_per_sample_targets():
    m, x, target, _ = res_cnn()
    _run(m, [x, torch.randn_like(x), torch.randn_like(x)], target, method="lrp", composite="epsilon_plus")


def test_gradient_through_a_plan_equals_autograd():
    m, x, target, _ = res_cnn()
    p = relprop.plan(m, x, method="gradient", target=target)
    for _ in range(3):
        b = torch.randn_like(x)
        got = p.explain(b).attributions
        xx = b.clone().requires_grad_()
        out = m(xx)
        (want,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xx)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert p.replays == 3 and p.rerecords == 0


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    cfg._attn_implementation = "eager"
    return BertForSequenceClassification(cfg).eval()


def _tokens(seed: int, pad: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 7 - pad :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_bert_tokens_and_mask_match_explain():
    m = _bert()
    # A different padding per batch: the mask is data, the op sequence is the same.
    p = _run(m, [_tokens(0, 2), _tokens(1, 3)], 1, method="lrp", composite="attnlrp")
    # No padding at all: transformers checks ``(mask == 1).all()`` in Python and skips the mask, a
    # value read back that the plan sees change, so it records.
    b = _tokens(2, 0)
    _same(p.explain(b), relprop.explain(m, b, target=1, method="lrp", composite="attnlrp"))
    assert p.rerecords == 1 and "read back" in p.last_reason


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoders_match_explain(arch):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, use_cache=False)
        cfg._attn_implementation = "eager"
        m = GPT2LMHeadModel(cfg).eval()
    else:
        cfg = LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            use_cache=False,
        )
        cfg._attn_implementation = "sdpa"
        m = LlamaForCausalLM(cfg).eval()

    def target(out):  # a callable target: its ops are part of the recording
        return out.logits[:, -1, 7]

    batches = [{"input_ids": torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(s))} for s in (0, 1)]
    _run(m, batches, target, method="lrp", composite="attnlrp")


# ------------------------------------------------------------------------ re-records on what it sees
def test_rerecords_when_batch_size_changes_then_replays_the_new_shape():
    m = _cnn()
    p = relprop.plan(m, torch.randn(2, 3, 12, 12), target=1)
    x3 = torch.randn(3, 3, 12, 12)
    _same(p.explain(x3), relprop.explain(m, x3, target=1, method="lrp"))
    assert p.rerecords == 1 and p.last_reason == "changed: input 0: shape (2, 3, 12, 12) -> (3, 3, 12, 12)"
    p.explain(torch.randn(3, 3, 12, 12))
    assert p.rerecords == 1 and p.replays == 1


def test_rerecords_when_a_parameter_is_edited_in_place_under_no_grad():
    m = _cnn()
    x = torch.randn(2, 3, 12, 12)
    p = relprop.plan(m, x, target=1)
    with torch.no_grad():
        m[0].weight.mul_(1.5)
        m[4].weight.copy_(torch.randn_like(m[4].weight))
    _same(p.explain(x), relprop.explain(m, x, target=1, method="lrp"))
    assert p.rerecords == 1 and "parameters" in p.last_reason


def test_edit_through_data_is_read_live():
    # ``p.data.mul_`` does not bump the version counter (documented): no re-recording, but the replay
    # reads parameters live, so the answer is still the edited model's.
    m = _cnn()
    x = torch.randn(2, 3, 12, 12)
    p = relprop.plan(m, x, target=1)
    before = p.explain(x).attributions
    m[0].weight.data.mul_(-2.0)
    m[1].running_var.data.mul_(3.0)
    got = p.explain(x)
    _same(got, relprop.explain(m, x, target=1, method="lrp"))
    assert not torch.allclose(got.attributions, before)
    assert p.rerecords == 0 and p.replays == 2


def test_rerecords_when_a_parameter_is_replaced():
    m = _cnn()
    x = torch.randn(2, 3, 12, 12)
    p = relprop.plan(m, x, target=1)
    m[8].weight = nn.Parameter(torch.randn_like(m[8].weight))
    _same(p.explain(x), relprop.explain(m, x, target=1, method="lrp"))
    assert p.rerecords == 1


def test_rerecords_on_train_eval_switch():
    # The gradient: LRP of a train-mode batch norm is another issue (relprop.explain raises there too).
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 3))
    m.eval()
    x = torch.randn(2, 3, 12, 12)
    p = relprop.plan(m, x, method="gradient", target=0)
    m.train()  # batch statistics instead of running ones: another function of the input
    # (relprop.explain first: a recording in training mode bumps the version counter of batch norm's
    # num_batches_tracked without changing it, which a plan sees as an edit and records again.)
    with pytest.warns(UserWarning, match="training mode"):
        want = relprop.explain(m, x, target=0)
    with pytest.warns(UserWarning, match="training mode"):
        got = p.explain(x)
    _same(got, want)
    assert p.rerecords == 1 and "training" in p.last_reason
    with pytest.warns(UserWarning, match="training mode"):
        p.explain(x)  # still training, no random op: replayed, not recorded
    assert p.rerecords == 1 and p.replays == 1
    m.eval()
    _same(p.explain(x), relprop.explain(m, x, target=0))
    assert p.rerecords == 2


class _Branchy(nn.Module):
    """Takes one of two paths depending on a value read back into Python with ``.item()``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum().item() > 0:
            return self.a(x)
        return self.b(torch.relu(x))


def test_rerecords_when_an_item_value_changes():
    m = _Branchy().eval()
    pos, neg = torch.rand(2, 4) + 0.1, -torch.rand(2, 4) - 0.1
    p = relprop.plan(m, pos, target=1)
    # Same sign, other values: .item() returns another float, so the plan cannot know the branch holds.
    pos2 = torch.rand(2, 4) + 0.1
    _same(p.explain(pos2), relprop.explain(m, pos2, target=1, method="lrp"))
    assert p.rerecords == 1 and "read back" in p.last_reason
    _same(p.explain(neg), relprop.explain(m, neg, target=1, method="lrp"))
    assert p.rerecords == 2
    _same(p.explain(neg), relprop.explain(m, neg, target=1, method="lrp"))  # the very same batch replays
    assert p.rerecords == 2 and p.replays == 1


class _Gate(nn.Module):
    """Branches on a boolean read back (``bool(t)``): only a change of the boolean re-records."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        y = self.a(x)
        return y * 2 if bool((x > 0).all()) else y


def test_boolean_read_back_replays_while_equal():
    m = _Gate().eval()
    p = relprop.plan(m, torch.rand(2, 4) + 0.1, target=0)
    x = torch.rand(2, 4) + 0.1
    _same(p.explain(x), relprop.explain(m, x, target=0, method="lrp"))
    assert p.replays == 1 and p.rerecords == 0
    x = torch.randn(2, 4)
    x[0, 0] = -1.0
    _same(p.explain(x), relprop.explain(m, x, target=0, method="lrp"))
    assert p.rerecords == 1


class _Nonzero(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x)
        idx = (x[0] > 0).nonzero().flatten()  # data-dependent shape, no value read into Python
        return y + y[:, idx].sum(-1, keepdim=True)


def test_rerecords_on_a_data_dependent_shape():
    m = _Nonzero().eval()
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0], [0.5, 0.5, 0.5, 0.5]])
    p = relprop.plan(m, x, method="gradient", target=0)
    x2 = torch.tensor([[1.0, 1.0, 1.0, -1.0], [0.5, 0.5, 0.5, 0.5]])  # three positives instead of two
    _same(p.explain(x2), relprop.explain(m, x2, target=0))
    assert p.rerecords == 1 and "data-dependent" in p.last_reason


def test_dropout_in_train_mode_never_reuses_the_mask():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match="training mode"):
        p = relprop.plan(m, x, method="gradient", target=1)
    assert not p.replayable and "random" in p.last_reason
    for _ in range(2):
        state = torch.random.get_rng_state()
        with pytest.warns(UserWarning, match="training mode"):
            got = p.explain(x).attributions
        torch.random.set_rng_state(state)  # autograd on the same draw: the mask of this forward
        xx = x.clone().requires_grad_()
        (want,) = torch.autograd.grad(m(xx)[:, 1].sum(), xx)
        torch.testing.assert_close(got, want)
        assert "random" in p.last_reason  # each call's own recording: still random
    assert p.replays == 0 and p.records == 3
    m.eval()  # back to eval: recorded once more, for the flag (the random-numbers reason was stale: review)
    _same(p.explain(x), relprop.explain(m, x, target=1))
    assert p.records == 4 and "training" in p.last_reason and "random" not in p.last_reason
    _same(p.explain(x), relprop.explain(m, x, target=1))
    assert p.replays == 1 and p.last_reason is None


def test_verify_catches_a_python_flag_branch():
    class Flag(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(4, 3)
            self.double = False

        def forward(self, x):
            y = self.lin(x)
            return y * 2 if self.double else y

    m = Flag().eval()
    x = torch.randn(2, 4)
    blind = relprop.plan(m, x, target=0)
    checked = relprop.plan(m, x, target=0, verify=True)
    m.double = True  # Python state: invisible to the plan (documented)
    want = relprop.explain(m, x, target=0, method="lrp")
    assert not torch.allclose(blind.explain(x).score, want.score)  # the documented blind spot
    with pytest.warns(PlanMismatch, match="differs from a fresh recording"):
        _same(checked.explain(x), want)
    assert checked.mismatches == 1


def test_verify_every_n_and_no_false_alarm():
    m = _cnn()
    p = relprop.plan(m, torch.randn(2, 3, 12, 12), target=1, verify_every=2)
    for _ in range(4):
        x = torch.randn(2, 3, 12, 12)
        _same(p.explain(x), relprop.explain(m, x, target=1, method="lrp"))
    assert p.mismatches == 0 and p.replays == 4 and p.records == 1


def test_keep_graph_and_layers_through_a_plan():
    m, x, target, _ = res_cnn()
    p = relprop.plan(m, x, target=target, composite="epsilon")
    got = p.explain(x, layers=["block"], keep_graph=True)
    want = relprop.explain(m, x, target=target, method="lrp", layers=["block"])
    torch.testing.assert_close(got.layers["block"], want.layers["block"], rtol=0, atol=1e-6)
    assert got.graph is not None and got.graph is not p._template.graph
    p.explain(torch.randn_like(x))  # a later replay leaves the kept graph alone
    assert got.graph.inputs[0].tensor is not None
    torch.testing.assert_close(got.graph.inputs[0].tensor, x)


def test_unsupported_method_is_refused():
    with pytest.raises(ValueError, match="relprop.plan supports"):
        relprop.plan(_cnn(), torch.randn(1, 3, 8, 8), method="integrated_gradients", target=0)


def test_replay_releases_what_the_recording_released():
    # conv -> relu_ overwrites the conv output: the recording drops its data (recomputed if a rule reads
    # it); the replay must not hold it either (it would double the activation memory), and gives the same
    # relevance through the recomputation.
    import sys

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(inplace=True), nn.Conv2d(6, 4, 3), nn.ReLU(inplace=True))
    m = nn.Sequential(m, nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    p = relprop.plan(m, x, target=1)
    mod = sys.modules["relprop.plan"]
    _, live = mod._signature(m, (x,), {}, None)
    env, why = mod._replay(p._template, (x,), {}, live)
    assert why is None
    replayed = mod._instantiate(p._template, env)
    recorded = relprop.trace(m, x)
    dropped = {v.index for v in recorded.values if v.data is None}
    assert dropped  # the two in-place ReLUs
    assert {v.index for v in replayed.values if v.data is None} == dropped
    _same(p.explain(x), relprop.explain(m, x, target=1, method="lrp"))
    # The replayed graph's nodes are new objects with their names filled in (not formatted again): each the
    # name of its own op, and the structure the recording's.
    assert [(n.index, n.op) for n in replayed.nodes] == [(n.index, n.op) for n in recorded.nodes]
    for n in replayed.nodes:
        assert n.op_name == str(n.op) and n.packet == n.op.overloadpacket.__name__
        assert [v.index for v in n.inputs] == [v.index for v in recorded.nodes[replayed.nodes.index(n)].inputs]
        assert all(o is None or o.producer is n for o in n.outputs) and all(n in v.consumers for v in n.inputs)


def test_rerecords_when_a_forward_hook_is_added_or_removed():
    m = _cnn()
    x = torch.randn(2, 3, 12, 12)
    p = relprop.plan(m, x, method="gradient", target=1)
    handle = m[5].register_forward_hook(lambda mod, args, out: out * 3.0)
    _same(p.explain(x), relprop.explain(m, x, target=1))
    assert p.rerecords == 1 and "modules" in p.last_reason
    handle.remove()
    _same(p.explain(x), relprop.explain(m, x, target=1))
    assert p.rerecords == 2


def test_a_new_callable_target_is_recorded_even_if_its_id_is_reused():
    m = _cnn()
    x = torch.randn(2, 3, 12, 12)
    p = relprop.plan(m, x, target=lambda out: out[:, 0])
    for k in (1, 2, 3, 1):  # a new lambda per call: CPython may give it the id of a freed one
        got = p.explain(x, target=lambda out, k=k: out[:, k])
        want = relprop.explain(m, x, target=k, method="lrp")
        torch.testing.assert_close(got.attributions, want.attributions, rtol=0, atol=1e-6)
    assert p.rerecords == 4 and p.replays == 0
    keep = lambda out: out[:, 4]  # noqa: E731 - the same object: replayed
    p.explain(x, target=keep)
    p.explain(x, target=keep)
    assert p.replays == 1


def test_a_plain_function_with_a_closure_tensor():
    torch.manual_seed(0)
    w = torch.randn(4, 3)

    def f(x):
        return torch.relu(x @ w)

    x = torch.randn(2, 4)
    p = relprop.plan(f, x, target=2)
    x2 = torch.randn(2, 4)
    _same(p.explain(x2), relprop.explain(f, x2, target=2, method="lrp"))
    with torch.no_grad():
        w.mul_(-1.0)  # a closure tensor is read live (not checked, documented): the replay sees the edit
    _same(p.explain(x2), relprop.explain(f, x2, target=2, method="lrp"))
    assert p.replays == 2 and p.rerecords == 0
