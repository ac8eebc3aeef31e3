"""DeepLIFT's baselines for masks, and DeepLIFT in half precision.

**Masks.** An integer input given no baseline that feeds no embedding lookup (an attention mask, position
ids) is held at its own value in the reference pass, as Captum's ``additional_forward_args``. Zeroing it
(the default before) masked every token: BERT then ran other ops on the baseline (``all(mask == 1)`` decides
whether a mask is built) and DeepLIFT was refused; on a padded batch it ran, with a reference of fully
masked attention that no attribution accounts for. Oracle: Captum's ``DeepLift`` on a model taking the
embeddings, the mask passed as an additional forward argument. A baseline on which the model still takes
another path is refused with the first op that differs and the baselines to pass.

**Half precision.** The rescale rule's quotient ``delta_y / delta_x`` overflowed float16 where ``delta_x`` is
a subnormal (non-finite relevance, raised, on most of the zoo). The rules now divide in float32 and the
multipliers are carried in float32 from the seed on (as LRP's relevance), also through upcast copies
(``h.to(float32)`` in Hugging Face RMSNorms). Oracles: the same rules in float64 on the very values the
float16 forward recorded (``TIGHT``), and end to end the float32 model with the same rounded weights
(``END_TO_END``: the half-precision forward's rounding; measured 2e-4 to 2e-3 on the models below).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relprop
from model_zoo import build
from relprop.methods._common import leaves, rebuild
from relprop.methods.core import run_backward, split_inputs
from relprop.propagate import PropagationError
from relprop.rules.deeplift import DeepLiftComposite
from relprop.trace import record

C = pytest.importorskip("captum.attr")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: float16/bfloat16 DeepLIFT vs the float64 rule pass on the recorded half-precision values (relative L2; float32
#: arithmetic).
TIGHT = 1e-5
#: float16 DeepLIFT vs float32 DeepLIFT of the same rounded weights and inputs (relative L2).
END_TO_END = 1e-2


# ----------------------------------------------------------------------------------------------- masks
class MaskedTokens(nn.Module):
    """Embedding (or given embeddings) -> mask applied only when some token is masked -> ReLU MLP -> mean."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.out = nn.Linear(8, 3)

    def forward(self, ids, mask):
        return self.from_embeddings(self.emb(ids), mask)

    def from_embeddings(self, h, mask):
        if not bool(mask.all()):  # Python control flow on the mask: another path for a zero mask
            h = h * mask[..., None]
        return self.out(self.act(self.lin(h)).mean(1))


class FromEmbeddings(nn.Module):
    def __init__(self, model: MaskedTokens) -> None:
        super().__init__()
        self.model = model

    def forward(self, h, mask):
        return self.model.from_embeddings(h, mask)


@pytest.mark.parametrize("padded", [False, True], ids=["full-mask", "padded"])
def test_default_baseline_holds_the_mask_like_captum(padded):
    torch.manual_seed(0)
    m = MaskedTokens().eval()
    ids = torch.randint(1, 20, (2, 5))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 3:] = 0
    got = relprop.explain(m, (ids, mask), target=1, method="deeplift")
    with torch.no_grad():
        e, e0 = m.emb(ids), m.emb(torch.zeros_like(ids))
    ref = C.DeepLift(FromEmbeddings(m)).attribute(e, e0, target=1, additional_forward_args=(mask,)).sum(-1)
    torch.testing.assert_close(got.attributions[0], ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.attributions[1], torch.zeros_like(ids, dtype=got.attributions[1].dtype))
    # completeness: the token scores sum to f(x) - f(x0) with the mask held
    with torch.no_grad():
        delta = m(ids, mask)[:, 1] - m(torch.zeros_like(ids), mask)[:, 1]
    torch.testing.assert_close(got.attributions[0].sum(1), delta, rtol=1e-5, atol=1e-6)


def _bert(attn: str):
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=3,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    m = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 100, (2, 7))
    return m, ids, torch.ones_like(ids)


class BertFromWordEmbeddings(nn.Module):
    def __init__(self, bert) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, e, mask):
        return self.bert(inputs_embeds=e, attention_mask=mask).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_default_baseline_runs_and_equals_captum(attn):
    m, ids, mask = _bert(attn)
    inputs = {"input_ids": ids, "attention_mask": mask}
    got = relprop.explain(m, inputs, target=0, method="deeplift", scope="captum")  # refused before
    held = relprop.explain(
        m, inputs, target=0, method="deeplift", scope="captum", baselines={"input_ids": torch.zeros_like(ids)}
    )
    assert torch.equal(got.attributions["input_ids"], held.attributions["input_ids"])
    # the replayed reference pass (on the held mask) is the model's own forward on the baseline
    checked = relprop.explain(m, inputs, target=0, method="deeplift", scope="captum", verify_replay=True)
    assert torch.equal(got.attributions["input_ids"], checked.attributions["input_ids"])
    assert not got.attributions["attention_mask"].any()
    word = m.bert.embeddings.word_embeddings
    with torch.no_grad():
        e, e0 = word(ids), word(torch.zeros_like(ids))
    ref = C.DeepLift(BertFromWordEmbeddings(m)).attribute(e, e0, target=0, additional_forward_args=(mask,)).sum(-1)
    torch.testing.assert_close(got.attributions["input_ids"], ref, rtol=1e-4, atol=1e-6)
    # every nonlinearity rescaled (relprop's default scope): runs too, and the noise tunnel over it
    relprop.explain(m, inputs, target=0, method="deeplift")
    relprop.explain(m, inputs, target=0, method="smoothgrad", base_method="deeplift", nt_samples=2, stdevs=0.01)


def test_a_baseline_that_takes_another_path_names_the_op_and_the_fix():
    m, ids, mask = _bert("eager")
    zeros = {"input_ids": torch.zeros_like(ids), "attention_mask": torch.zeros_like(mask)}
    with pytest.raises(ValueError) as info:
        relprop.explain(m, {"input_ids": ids, "attention_mask": mask}, target=0, method="deeplift", baselines=zeros)
    msg = str(info.value)
    assert msg.startswith("baselines: the model runs other operations on the baseline")
    assert "op #" in msg and "on the inputs but" in msg and "in module '" in msg
    assert "'attention_mask': mask" in msg


# -------------------------------------------------------------------------------------- half precision
class Logits(nn.Module):
    """A Hugging Face classifier's logits as a tensor (the float64 oracle recorder needs a tensor output)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model(**kwargs).logits


def _case(name):
    _, model, x, target = build(name)
    return (Logits(model) if name == "hf_bert" else model), x, target


def _half(x, dtype=torch.float16):
    if isinstance(x, dict):
        return {k: _half(v, dtype) for k, v in x.items()}
    return x.to(dtype) if x.is_floating_point() else x


def _float64_recorder(model, args, kwargs, post=None, release=None):
    """The float16 forward's recording with every value (those the model overwrote in place recomputed in
    float16 first) converted to float64: the rules then run in float64 on exactly the float16 values."""
    graph = record(model, args, kwargs, post=post)
    for v in graph.values:
        if v.producer is not None:
            v.tensor  # noqa: B018
    out = None
    if post is None:
        (out,) = [v for v in graph.output_values if v.data is not None and v.data.data_ptr() == graph.output.data_ptr()]
    for v in graph.values:
        if v.data is not None and v.data.is_floating_point():
            v.data, v.dtype = v.data.detach().double(), torch.float64
    if out is not None:
        graph.output = out.data
    return graph


def _float64_oracle(model, x, target):
    """``(x - x0) * multipliers`` from the float64 rule pass (zeros baseline, integer inputs held)."""
    xs = leaves(x)
    base = [torch.zeros_like(t) if t.is_floating_point() else t for t in xs]
    bargs, bkwargs = split_inputs(rebuild(x, base))
    comp = DeepLiftComposite(
        lambda _: record(model, bargs, bkwargs), baselines=base, replay=False, allow_appended_ops=callable(target)
    )
    e = run_backward(
        model, x, target=target, composite=comp, method="deeplift", times_output=False, recorder=_float64_recorder
    )
    return [(t.double() - b.double()) * m for t, b, m in zip(xs, base, e.tensors()) if t.is_floating_point()]


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


#: in-place ReLUs, max pools, Hugging Face upcast copies and SiLU, T5's promoting ``h * rstd``; not models with layer norms: there the widened
#: VJP recomputes mean and rstd in float32 (more exact than the half model's recorded ones, which the float64
#: oracle reads: 2e-4 apart on BERT); those are checked end to end below.
HALF_CASES = ["tv_resnet18", "tv_vgg11_bn", "hf_llama", "hf_t5"]


@pytest.mark.parametrize(
    ("name", "dtype"),
    [(n, torch.float16) for n in HALF_CASES] + [(n, torch.bfloat16) for n in ("tv_resnet18", "hf_t5")],
    ids=str,
)
def test_half_deeplift_is_the_float64_rule_pass_on_the_recorded_values(name, dtype):
    model, x, target = _case(name)
    model, x = model.to(dtype), _half(x, dtype)
    got = relprop.explain(model, x, target=target, method="deeplift")  # non-finite (raised) before
    atts = [a for a, t in zip(got.tensors(), leaves(x)) if t.is_floating_point()]
    want = _float64_oracle(model, x, target)
    for a, w in zip(atts, want, strict=True):
        assert a.dtype == torch.float32  # multipliers carried in float32, also through upcast copies
        assert torch.isfinite(a).all()
        assert _rel_err(a, w) < TIGHT, _rel_err(a, w)


def test_float16_rule_pass_in_half_precision_would_be_caught(monkeypatch):
    """The old behaviour (the rescale quotient in float16) gives non-finite relevance, which is raised."""
    import relprop.rules.deeplift as dl

    monkeypatch.setattr(dl, "to_float32", lambda t: t)
    monkeypatch.setattr(dl.DeepLiftComposite, "float32_relevance", False)
    model, x, target = _case("tv_resnet18")
    with pytest.raises(PropagationError, match="non-finite deeplift"):
        relprop.explain(model.half(), _half(x), target=target, method="deeplift")


@pytest.mark.parametrize("name", ["hf_bert", "hf_gpt2", "hf_llama"])
def test_float16_deeplift_close_to_float32_of_the_rounded_weights(name):
    model, x, target = _case(name)
    half, xh = model.half(), _half(x)
    a = relprop.explain(half, xh, target=target, method="deeplift").tensors()
    full = half.float()  # the same (rounded) weights in float32 (model.half() cast in place: rebuild is a copy)
    xf = {k: v.float() if v.is_floating_point() else v for k, v in xh.items()}
    b = relprop.explain(full, xf, target=target, method="deeplift").tensors()
    for p, q in zip(a, b):
        if q.is_floating_point() and q.norm() > 0:
            assert _rel_err(p, q) < END_TO_END, _rel_err(p, q)
