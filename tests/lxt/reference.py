"""Runs in the separate LXT environment (transformers 4.52 + lxt 2.1): builds a small random Llama or
BERT, saves it with save_pretrained, and writes LXT's efficient-mode AttnLRP/CP-LRP relevance.

    python tests/lxt/reference.py {llama,bert} {attnlrp,cp_lrp} OUT_DIR
"""

import sys

import torch


def main(arch: str, variant: str, out: str) -> None:
    from lxt.efficient import monkey_patch

    torch.manual_seed(0)
    if arch == "llama":
        from lxt.efficient.models.llama import attnLRP, cp_LRP
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.llama import modeling_llama

        monkey_patch(modeling_llama, attnLRP if variant == "attnlrp" else cp_LRP)
        cfg = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
        cfg._attn_implementation = "eager"
        model = LlamaForCausalLM(cfg).eval()
    else:
        from lxt.efficient.models.bert import attnLRP
        from transformers import BertConfig, BertForSequenceClassification
        from transformers.models.bert import modeling_bert

        monkey_patch(modeling_bert, attnLRP)
        cfg = BertConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            num_labels=3,
        )
        cfg._attn_implementation = "eager"
        model = BertForSequenceClassification(cfg).eval()
    for p in model.parameters():  # random-init biases are zero: make them matter
        if p.dim() == 1:
            p.data.normal_(0, 0.1)
    model.save_pretrained(out)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits
    score = logits[:, -1, 5] if arch == "llama" else logits[:, 2]
    score.backward(torch.ones_like(score))  # grad x input of the logit: relevance sums to the logit
    torch.save(
        {"embeds": emb.detach(), "relevance": (emb * emb.grad).detach(), "score": score.detach()}, f"{out}/lxt.pt"
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
