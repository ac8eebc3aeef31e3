"""AttnLRP and CP-LRP agree with LXT (the AttnLRP authors' package) on a small Llama, BERT and GPT-2.

LXT's efficient mode needs transformers 4.52, so its side runs in the separate environment
``.venv-lxt`` that ``scripts/env.sh`` creates; it saves the random model with ``save_pretrained``
and its relevance, and relprop explains the same weights under transformers 5.

GPT-2 runs with its default activation ``gelu_new``, written in Python as eight element-wise ops:
it matches only because relprop treats the whole function as one nonlinearity (``relprop.regions``).
"""

import subprocess
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM

import relprop

ROOT = Path(__file__).resolve().parents[1]
LXT_PYTHON = ROOT / ".venv-lxt" / "bin" / "python"


def _reference(arch, variant, tmp_path, dtype="float32"):
    assert LXT_PYTHON.exists(), "run scripts/env.sh (or scripts/test.sh) to create the LXT environment"
    out = tmp_path / f"{arch}_{variant}_{dtype}"
    if (out / "lxt.pt").exists():
        return out, torch.load(out / "lxt.pt")
    out.mkdir()
    subprocess.run(
        [str(LXT_PYTHON), str(ROOT / "tests" / "lxt" / "reference.py"), arch, variant, str(out), dtype],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out, torch.load(out / "lxt.pt")


@pytest.mark.parametrize(
    "arch,variant,attn",
    [
        ("llama", "attnlrp", "eager"),
        ("llama", "attnlrp", "sdpa"),
        ("llama", "cp_lrp", "eager"),
        ("bert", "attnlrp", "eager"),
        ("bert", "attnlrp", "sdpa"),
    ],
)
def test_matches_lxt(arch, variant, attn, tmp_path):
    folder, ref = _reference(arch, variant, tmp_path)
    if arch == "llama":
        model = LlamaForCausalLM.from_pretrained(folder, attn_implementation=attn).eval()
        target = lambda out: out.logits[:, -1, 5]  # noqa: E731
    else:
        model = BertForSequenceClassification.from_pretrained(folder, attn_implementation=attn).eval()
        target = 2
    e = relprop.explain(model, {"inputs_embeds": ref["embeds"]}, target=target, method="lrp", composite=variant)
    ours = e.attributions["inputs_embeds"]
    torch.testing.assert_close(e.score, ref["score"], rtol=1e-4, atol=1e-6)
    theirs = ref["relevance"]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    # Token scores (what a user reads) agree too.
    torch.testing.assert_close(ours.sum(-1), theirs.sum(-1), rtol=1e-4, atol=1e-4 * theirs.sum(-1).abs().max().item())


@pytest.fixture(scope="module")
def lxt_dir(tmp_path_factory):
    """One folder per module: each GPT-2 reference (variant, dtype) is computed once for both attentions."""
    return tmp_path_factory.mktemp("lxt")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["attnlrp", "cp_lrp"])
def test_gpt2_gelu_new_matches_lxt(variant, attn, dtype, lxt_dir):
    folder, ref = _reference("gpt2", variant, lxt_dir, dtype)
    model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation=attn, dtype=getattr(torch, dtype)).eval()
    assert model.config.activation_function == "gelu_new"
    inputs = {"inputs_embeds": ref["embeds"]}
    assert ref["embeds"].dtype == getattr(torch, dtype)
    # The parity is about the written-out activation: each layer's gelu_new is one region of 8 ops.
    cov = relprop.coverage(model, inputs, variant)
    assert [(c, d.split(": ")[1]) for d, c, _ in cov.regions] == [
        (model.config.n_layer, "mul, pow, mul, add, mul, tanh, add, mul")
    ]
    target = lambda out: out.logits[:, -1, 5]  # noqa: E731
    e = relprop.explain(model, inputs, target=target, method="lrp", composite=variant)
    ours, theirs = e.attributions["inputs_embeds"], ref["relevance"]
    tol = 1e-6 if dtype == "float64" else 1e-4
    torch.testing.assert_close(e.score, ref["score"], rtol=tol, atol=tol * ref["score"].abs().max().item())
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol * theirs.abs().max().item())
    torch.testing.assert_close(ours.sum(-1), theirs.sum(-1), rtol=tol, atol=tol * theirs.sum(-1).abs().max().item())
