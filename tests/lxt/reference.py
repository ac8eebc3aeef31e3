"""Runs in the separate LXT environment (transformers 4.52 + lxt 2.1): builds a small random Llama,
BERT or GPT-2, saves it with save_pretrained, and writes LXT's efficient-mode AttnLRP/CP-LRP relevance.

    python tests/lxt/reference.py {llama,bert,gpt2} {attnlrp,cp_lrp} OUT_DIR [float32|float64]

GPT-2 keeps its default activation ``gelu_new``, written in Python as eight element-wise ops; LXT's
GPT-2 patch applies the identity rule to the whole activation (``identity_rule_implicit``).
"""

import sys

import torch


def main(arch: str, variant: str, out: str, dtype: str = "float32") -> None:
    from lxt.efficient import monkey_patch

    torch.manual_seed(0)
    if arch == "gpt2":
        from lxt.efficient.models.gpt2 import attnLRP, cp_LRP
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.models.gpt2 import modeling_gpt2

        monkey_patch(modeling_gpt2, attnLRP if variant == "attnlrp" else cp_LRP)
        cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        assert cfg.activation_function == "gelu_new"
        cfg._attn_implementation = "eager"
        model = GPT2LMHeadModel(cfg).eval()
    elif arch == "llama":
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
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb).logits
    score = logits[:, 2] if arch == "bert" else logits[:, -1, 5]
    score.backward(torch.ones_like(score))  # grad x input of the logit: relevance sums to the logit
    torch.save(
        {"embeds": emb.detach(), "relevance": (emb * emb.grad).detach(), "score": score.detach()}, f"{out}/lxt.pt"
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
