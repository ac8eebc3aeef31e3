"""AttnLRP and CP-LRP agree with LXT (the AttnLRP authors' package) on a small Llama and BERT.

LXT's efficient mode needs transformers 4.52, so its side runs in the separate environment
``.venv-lxt`` that ``scripts/env.sh`` creates; it saves the random model with ``save_pretrained``
and its relevance, and relprop explains the same weights under transformers 5.
"""

import subprocess
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification, LlamaForCausalLM

import relprop

ROOT = Path(__file__).resolve().parents[1]
LXT_PYTHON = ROOT / ".venv-lxt" / "bin" / "python"


def _reference(arch, variant, tmp_path):
    assert LXT_PYTHON.exists(), "run scripts/env.sh (or scripts/test.sh) to create the LXT environment"
    out = tmp_path / f"{arch}_{variant}"
    out.mkdir()
    subprocess.run(
        [str(LXT_PYTHON), str(ROOT / "tests" / "lxt" / "reference.py"), arch, variant, str(out)],
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
