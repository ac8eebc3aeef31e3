"""Half precision (bfloat16/float16 models) on CPU: LRP's divisions in float32, the gradient in the model's dtype.

What is proven here, and against which oracle:

* **LRP relevance is not rounded to half precision.** The oracle is the same rules in float64 on the very
  values the half-precision forward recorded (the recording converted to float64 before the rule pass):
  relprop's half-precision LRP must agree with it to float32 accuracy (``TIGHT``). Relevance carried in the
  model's dtype (the behaviour before) misses this by about bfloat16's epsilon (``2**-8``) per layer, which
  ``test_half_relevance_would_be_caught`` shows the check detects.
* **Conservation.** LRP-0 on bias-free ReLU networks conserves the explained logit exactly in exact
  arithmetic; in bfloat16 relprop conserves it to ``CONSERVE`` (relative).
* **End to end** against float32 LRP of the same bfloat16-rounded weights (a float32 forward): the
  difference comes from the half-precision *forward* (each activation rounded to 8 bits of mantissa), not
  from the rule pass; stated as a relative L2 error (``END_TO_END``).
* **Gradient**: in the model's dtype, equal to ``torch.autograd.grad`` in that dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relprop
from relprop.methods.core import run_backward
from relprop.rules.composites import resolve_composite
from relprop.trace import record

HALVES = [torch.bfloat16, torch.float16]
#: relprop's half-precision LRP vs the float64 rule pass on the same recorded values (float32 arithmetic).
TIGHT = 1e-5
#: |sum of input relevance - explained logit| / |logit|, LRP-0 on bias-free models, in units of the dtype's
#: epsilon: each layer divides by the output the model computed (rounded to the dtype) while its contributions,
#: summed in float32, add up to the unrounded value, so each of the 4 layers may leak about half an epsilon.
CONSERVE = 2.0
#: relative L2 error of bfloat16 LRP against float32 LRP of the same rounded weights (a float32 forward).
END_TO_END = 2e-2


class SmallCNN(nn.Module):
    """conv -> ReLU -> max pool -> residual (conv, ReLU) -> GAP -> linear; ``bias=False`` for exact LRP-0."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)
        self.fc = nn.Linear(8, 5, bias=bias)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = F.relu(self.c2(h)) + h
        return self.fc(h.mean((2, 3)))


class TinyTransformer(nn.Module):
    """Token ids -> embedding -> 2 pre-norm blocks (causal SDPA, GELU MLP) -> LayerNorm -> last-token head."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, layers: int = 2, classes: int = 7) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                dict(
                    ln1=nn.LayerNorm(d),
                    qkv=nn.Linear(d, 3 * d),
                    proj=nn.Linear(d, d),
                    ln2=nn.LayerNorm(d),
                    up=nn.Linear(d, 2 * d),
                    down=nn.Linear(2 * d, d),
                )
            )
            for _ in range(layers)
        )
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        h = self.emb(ids)
        b, t, d = h.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + blk["proj"](a.transpose(1, 2).reshape(b, t, d))
            h = h + blk["down"](F.gelu(blk["up"](blk["ln2"](h))))
        return self.head(self.ln(h)[:, -1])


def _randomise(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def _cnn(bias: bool = True):
    torch.manual_seed(0)
    return _randomise(SmallCNN(bias)), torch.randn(3, 3, 16, 16), torch.tensor([0, 3, 1])


def _transformer():
    torch.manual_seed(0)
    model = _randomise(TinyTransformer())
    return model, torch.randint(0, 50, (2, 12)), torch.tensor([1, 5])


CASES = {
    "cnn-epsilon": (_cnn, "epsilon"),
    "cnn-epsilon_plus_flat": (_cnn, "epsilon_plus_flat"),
    "cnn-epsilon_gamma_box": (_cnn, "epsilon_gamma_box"),
    "transformer-attnlrp": (_transformer, "attnlrp"),
    "transformer-cp_lrp": (_transformer, "cp_lrp"),
}


def _float_inputs(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if x.is_floating_point() else x


def _float64_recorder(model, args, kwargs, post=None, release=None):  # the oracle holds every value
    """The half-precision forward's recording, every value converted to float64: the oracle's rule pass
    then runs in float64 on exactly the values the half-precision model computed."""
    graph = record(model, args, kwargs, post=post)
    assert isinstance(graph.output, torch.Tensor)  # the models here return one tensor
    o = graph.output
    (out,) = [v for v in graph.output_values if v.data.data_ptr() == o.data_ptr() and v.data.shape == o.shape]
    for v in graph.values:
        if v.data is not None and v.data.is_floating_point():
            v.data = v.data.detach().double()
            v.dtype = torch.float64
    graph.output = out.data
    return graph


def _oracle(model, inputs, target, composite):
    return run_backward(
        model,
        inputs,
        target=target,
        composite=resolve_composite(composite, {}),
        method="lrp",
        times_output=True,
        recorder=_float64_recorder,
    )


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_half_lrp_equals_float64_rule_pass_on_the_recorded_values(case, dtype):
    build, composite = CASES[case]
    model, x, target = build()
    model = model.to(dtype)
    x = _float_inputs(x, dtype)
    got = relprop.explain(model, x, target=target, method="lrp", composite=composite)
    ref = _oracle(model, x, target, composite)
    a, r = got.attributions, ref.attributions
    assert a.dtype == torch.float32  # relevance is float32 from the seed on
    assert torch.isfinite(a).all()
    print(f"{case} {dtype}: relative L2 error vs the float64 rule pass {_rel_err(a, r):.2e}")
    assert _rel_err(a, r) < TIGHT, _rel_err(a, r)
    # the same forward: the explained score is the model's own (half precision)
    assert got.score.dtype == dtype


@pytest.mark.parametrize("case", ["cnn-epsilon", "transformer-attnlrp"])
def test_half_relevance_would_be_caught(case, monkeypatch):
    """The oracle check has teeth: carrying relevance in bfloat16 (no float32 upcast) fails it."""
    import relprop.methods.core as core
    import relprop.rules.attention as attention
    import relprop.rules.base as base
    import relprop.rules.elementwise as elementwise
    import relprop.rules.linear as linear

    build, composite = CASES[case]
    model, x, target = build()
    model = model.to(torch.bfloat16)
    x = _float_inputs(x, torch.bfloat16)
    ref = _oracle(model, x, target, composite)
    for mod in (core, attention, base, elementwise, linear):
        monkeypatch.setattr(mod, "HALF", ())
    got = relprop.explain(model, x, target=target, method="lrp", composite=composite)
    assert got.attributions.dtype == torch.bfloat16
    assert _rel_err(got.attributions, ref.attributions) > 10 * TIGHT


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_half_lrp0_conserves_on_bias_free_cnn(dtype):
    model, x, target = _cnn(bias=False)
    model = model.to(dtype)
    got = relprop.explain(model, x.to(dtype), target=target, method="lrp", composite="lrp0")
    total = got.attributions.double().sum((1, 2, 3))
    score = got.score.double()
    gap = ((total - score).abs() / score.abs()).max().item()
    assert gap < CONSERVE * torch.finfo(dtype).eps, (total, score)
    # and the leak is the recorded forward's, not the rule pass's: the float64 rules on the same values agree
    ref = _oracle(model, x.to(dtype), target, "lrp0").attributions.sum((1, 2, 3))
    assert _rel_err(total, ref) < TIGHT


@pytest.mark.parametrize("case", CASES)
def test_bf16_lrp_close_to_float32_lrp_of_rounded_weights(case):
    """End to end: bfloat16 model vs float32 model with the same (rounded) weights and inputs."""
    build, composite = CASES[case]
    model, x, target = build()
    half = model.to(torch.bfloat16)
    full = copy.deepcopy(half).float()
    xh = _float_inputs(x, torch.bfloat16)
    xf = xh.float() if xh.is_floating_point() else xh
    a = relprop.explain(half, xh, target=target, method="lrp", composite=composite).attributions
    b = relprop.explain(full, xf, target=target, method="lrp", composite=composite).attributions
    print(f"{case}: relative L2 error vs float32 LRP of the rounded weights {_rel_err(a, b):.2e}")
    assert _rel_err(a, b) < END_TO_END, _rel_err(a, b)
    # sums (what conservation is about) agree to the same tolerance
    dims = tuple(range(1, a.dim()))
    assert _rel_err(a.sum(dims), b.sum(dims)) < END_TO_END


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("build", [_cnn, _transformer], ids=["cnn", "transformer"])
def test_half_gradient_equals_autograd_in_the_same_dtype(build, dtype):
    model, x, target = build()
    model = model.to(dtype)
    x = _float_inputs(x, dtype)
    got = relprop.explain(model, x, target=target, method="gradient")
    if x.is_floating_point():
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        (ref,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xg)
        a = got.attributions
    else:  # token ids: the gradient at the embedding output, summed over the hidden dim (relprop's convention)
        store = {}
        handle = model.emb.register_forward_hook(lambda m, i, o: store.setdefault("e", o))
        out = model(x)
        handle.remove()
        (ref,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), store["e"])
        ref = ref.sum(-1)
        a = got.attributions
    assert a.dtype == dtype
    # the same kernels in the same dtype: equal up to the order of fan-out sums (one rounding of the dtype)
    tol = torch.finfo(dtype).eps * 4
    assert torch.allclose(a.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item()), (a - ref).abs().max()


# ------------------------------------------------------------------ --device/--dtype of the report and the CLI
def test_placed_model_explains_like_the_half_model_itself():
    """``Placed`` (the report's and CLI's --dtype) casts float32 inputs at the entry: LRP through the cast equals
    LRP of the bfloat16 model on the cast inputs exactly (the entry copy's VJP keeps float32 relevance), and the
    gradient through it equals autograd through it."""
    from relprop.report.device import place

    model, x, target = _cnn()
    placed = place(copy.deepcopy(model), "cpu", "bfloat16")
    assert not placed.training and next(placed.parameters()).dtype == torch.bfloat16
    direct = relprop.explain(placed.inner, x.to(torch.bfloat16), target=target, method="lrp", composite="epsilon")
    via = relprop.explain(placed, x, target=target, method="lrp", composite="epsilon")
    assert via.attributions.dtype == torch.float32 and via.attributions.device == x.device
    assert torch.equal(via.attributions, direct.attributions)
    g = relprop.explain(placed, x, target=target, method="gradient").attributions
    xg = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(placed(xg).gather(1, target[:, None]).sum(), xg)
    assert torch.equal(g, ref)


def test_place_copy_leaves_the_users_module_untouched_and_default_is_a_no_op():
    from relprop.report.device import place

    model, _, _ = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    placed = place(model, "cpu", "float16", copy=True)
    assert placed.inner is not model and next(placed.parameters()).dtype == torch.float16
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert place(model, "cpu", "float32") is model  # nothing to move: the module itself, no wrapper


@pytest.mark.parametrize(
    "device,dtype,message",
    [("tpu", "float32", "expected one of auto, cpu, cuda"), ("cpu", "int8", "expected one of float32")],
)
def test_bad_device_or_dtype_is_one_clear_error(device, dtype, message):
    from relprop.report.device import check_placement
    from relprop.specs import SpecError

    with pytest.raises(SpecError, match=message):
        check_placement(device, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_says_so(tmp_path, capsys):
    from relprop.cli import main

    png = tmp_path / "d.png"
    assert main(["sample", "zoo:digits", "--out", str(png)]) == 0
    assert main(["explain", "--model", "zoo:resnet_digits", "--input", str(png), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_cli_explain_in_bfloat16_and_auto_device(tmp_path, capsys):
    from relprop.cli import main

    png = tmp_path / "d.png"
    assert main(["sample", "zoo:digits", "--out", str(png)]) == 0
    sums = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.png"
        args = ["explain", "--model", "zoo:resnet_digits", "--input", str(png), "--methods", "lrp", "--out", str(out)]
        assert main([*args, "--dtype", dtype, "--device", "auto", "--save", str(tmp_path / f"{dtype}.pt")]) == 0
        assert out.exists()
        sums[dtype] = torch.load(tmp_path / f"{dtype}.pt", weights_only=True)["lrp"]
    assert sums["bfloat16"].dtype == torch.float32  # attributions come back as float32
    assert _rel_err(sums["bfloat16"], sums["float32"]) < 0.1  # a different forward (bfloat16): close, not equal


def test_compare_in_bfloat16_runs_every_metric_and_agrees_with_float32(tmp_path):
    """A tiny compare run with the model in bfloat16 (CPU): every cell complete, the metric means close to the
    float32 run (the forward passes are in bfloat16: 8-bit mantissas)."""
    from relprop.report import MethodSpec, Settings, run_compare
    from relprop.specs import load_data

    data = load_data("zoo:digits")
    kw = dict(samples=6, grid=3, sensitivity_samples=3, randomisation_samples=5, randomisation_layers=1)
    kw |= dict(regions=6, steps=6, bootstrap=50, batch_size=3)
    means = {}
    for dtype in ("float32", "bfloat16"):
        res = run_compare(
            ["zoo:resnet_digits"], data, [MethodSpec.parse(m) for m in ("saliency", "lrp")], tmp_path / dtype, Settings(**kw, dtype=dtype),
            progress=False, log=lambda s: None, use_cache=False,
        )  # fmt: skip
        assert res["status"] == "complete", res.get("problems")
        cells = res["models"][0]["methods"]
        assert all(c["status"] == "ok" for c in cells)
        means[dtype] = {(c["method"], k): v["mean"] for c in cells for k, v in c["summary"].items()}
    for k in ("insertion", "deletion", "class_sensitivity"):
        for m in ("saliency", "lrp"):
            a, b = means["float32"][(m, k)], means["bfloat16"][(m, k)]
            assert a is not None and b is not None and abs(a - b) < 0.05, (m, k, a, b)


@pytest.mark.parametrize("name", ["hf_qwen2", "hf_gpt2"])
def test_bf16_attnlrp_on_hf_decoders_close_to_float32(name):
    """Hugging Face decoders cast inside forward (softmax and RMSNorm in float32, then back to bfloat16): AttnLRP
    runs through the casts (relevance stays float32) and lands within END_TO_END of float32 LRP of the same
    rounded weights (measured 2e-3 to 3e-3)."""
    pytest.importorskip("transformers")
    import model_zoo

    _, model, inputs, target = model_zoo.build(name)
    half = model.to(torch.bfloat16)
    full = copy.deepcopy(half).float()
    hin = {k: _float_inputs(v, torch.bfloat16) for k, v in inputs.items()}
    fin = {k: (v.float() if v.is_floating_point() else v) for k, v in hin.items()}
    a = relprop.explain(half, hin, target=target, method="lrp", composite="attnlrp").attributions["inputs_embeds"]
    b = relprop.explain(full, fin, target=target, method="lrp", composite="attnlrp").attributions["inputs_embeds"]
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert _rel_err(a, b) < END_TO_END, _rel_err(a, b)
