"""A zoo of small, randomly initialised architectures for the engine's acceptance tests.

Every builder returns ``(name, model.eval(), inputs, target)``:

* ``inputs``: a tensor, or a dict of keyword arguments (text models are fed ``inputs_embeds`` so the
  gradient can be compared with ``torch.autograd.grad`` at the same float tensor; attention masks are
  extra integer entries, as Hugging Face tokenizers return them);
* ``target``: an int class index on the last dim of the output / ``.logits``, or a callable
  ``output -> tensor(batch,)`` for models whose output is not a classification.

Sizes are tiny (hidden 32-64, 1-2 layers, 32x32 images, batch 2) so the whole zoo runs in seconds
on a CPU. Attention implementations are mixed (``eager`` and ``sdpa``) so both code paths are hit.
No hub downloads: every model is built from a config with random weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

BATCH = 2
SEQ = 6

Entry = tuple[str, nn.Module, Any, Any]
BUILDERS: dict[str, Callable[[], Entry]] = {}


def builder(name: str):
    def deco(fn):
        BUILDERS[name] = fn
        return fn

    return deco


def build(name: str) -> Entry:
    """Build zoo entry ``name`` deterministically (seeded before construction and input sampling)."""
    torch.manual_seed(0)
    out = BUILDERS[name]()
    assert out[0] == name
    return out


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Give batch norms non-trivial running statistics and affine parameters (random init leaves them ~identity)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def resnet18_random_norms(negative_scales: bool = False) -> nn.Module:
    """torchvision's ResNet-18 (5 classes, seed 0, eval) with non-trivial batch-norm statistics; with
    ``negative_scales`` some norm weights below zero (rules that branch on signs)."""
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=5).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                if negative_scales:
                    mod.weight.normal_(1, 0.3)
    return m


def _image(size: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn(BATCH, channels, size, size)


def _cnn(name: str, model: nn.Module, size: int = 32, target: int = 3) -> Entry:
    return name, _randomize_norms(model).eval(), _image(size), target


def _ids(vocab: int, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(3, vocab, (BATCH, seq))


def _mask(seq: int = SEQ, dtype=torch.long) -> torch.Tensor:
    m = torch.ones(BATCH, seq, dtype=dtype)
    m[1, seq - 2 :] = 0  # right padding on the second sample
    return m


def _embeds(model: nn.Module, vocab: int, seq: int = SEQ) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(_ids(vocab, seq)).detach().clone()


def _hf(cls, config, attn: str | None = None) -> nn.Module:
    if attn is not None:
        config._attn_implementation = attn
    model = cls(config)
    if attn is not None:
        assert model.config._attn_implementation == attn, (cls, model.config._attn_implementation)
    return model.eval()


def qwen2(vocab: int = 50, intermediate: int = 48, layers: int = 2) -> nn.Module:
    """A tiny random-init Qwen2 decoder with eager attention (callers seed ``torch`` first)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        use_cache=False,
    )
    return _hf(Qwen2ForCausalLM, cfg, "eager")


# ----------------------------------------------------------------------------------------- CNNs
@builder("tv_resnet18")
def _tv_resnet18():
    from torchvision.models import resnet18

    return _cnn("tv_resnet18", resnet18(num_classes=10))


@builder("tv_vgg11_bn")
def _tv_vgg11_bn():
    from torchvision.models import vgg11_bn

    model = vgg11_bn(num_classes=10)
    # The stock 25088x4096 classifier costs ~0.5 GB; same structure, narrower.
    model.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, 10),
    )
    return _cnn("tv_vgg11_bn", model)


@builder("tv_densenet121")
def _tv_densenet121():
    from torchvision.models import densenet121

    return _cnn("tv_densenet121", densenet121(num_classes=10))


@builder("tv_inception_v3")
def _tv_inception_v3():
    from torchvision.models import inception_v3

    model = inception_v3(num_classes=10, aux_logits=False, init_weights=False, transform_input=False)
    return _cnn("tv_inception_v3", model, size=75)


@builder("tv_mobilenet_v3_small")
def _tv_mobilenet_v3_small():
    from torchvision.models import mobilenet_v3_small

    return _cnn("tv_mobilenet_v3_small", mobilenet_v3_small(num_classes=10))


@builder("tv_efficientnet_b0")
def _tv_efficientnet_b0():
    from torchvision.models import efficientnet_b0

    return _cnn("tv_efficientnet_b0", efficientnet_b0(num_classes=10))


@builder("timm_convnext")
def _timm_convnext():
    import timm

    model = timm.create_model(
        "convnext_tiny", pretrained=False, num_classes=10, depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)
    )
    return _cnn("timm_convnext", model)


@builder("timm_resnet18")
def _timm_resnet18():
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False)
    return _cnn("timm_resnet18", model)


# ------------------------------------------------------------------------- vision transformers
@builder("timm_vit_tiny")
def _timm_vit_tiny():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10, depth=2)
    return "timm_vit_tiny", model.eval(), _image(), 3


@builder("tv_vit")
def _tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    return "tv_vit", model.eval(), _image(), 3


@builder("timm_swin")
def _timm_swin():
    import timm

    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        window_size=4,
        embed_dim=32,
        depths=(1, 1),
        num_heads=(2, 4),
        num_classes=10,
    )
    return "timm_swin", model.eval(), _image(), 3


@builder("hf_vit")
def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    return "hf_vit", _hf(ViTForImageClassification, cfg, "eager"), {"pixel_values": _image()}, 3


# ---------------------------------------------------------------------------- text transformers
@builder("hf_bert")
def _hf_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = _hf(BertForSequenceClassification, cfg, "eager")
    inputs = {"inputs_embeds": _embeds(model, 100), "attention_mask": _mask()}
    return "hf_bert", model, inputs, 1


@builder("hf_roberta")
def _hf_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        num_labels=3,
        pad_token_id=1,
    )
    model = _hf(RobertaForSequenceClassification, cfg, "sdpa")
    inputs = {"inputs_embeds": _embeds(model, 100), "attention_mask": _mask()}
    return "hf_roberta", model, inputs, 2


@builder("hf_distilbert")
def _hf_distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(
        vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=32, num_labels=3
    )
    model = _hf(DistilBertForSequenceClassification, cfg, "sdpa")
    inputs = {"inputs_embeds": _embeds(model, 100), "attention_mask": _mask()}
    return "hf_distilbert", model, inputs, 0


@builder("hf_gpt2")
def _hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, use_cache=False)
    model = _hf(GPT2LMHeadModel, cfg, "eager")
    inputs = {"inputs_embeds": _embeds(model, 100), "attention_mask": _mask()}
    return "hf_gpt2", model, inputs, lambda out: out.logits[:, 3, 7]


@builder("hf_llama")
def _hf_llama():
    from transformers import LlamaConfig, LlamaModel

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
    model = _hf(LlamaModel, cfg, "sdpa")
    inputs = {"inputs_embeds": _embeds(model, 100)}
    return "hf_llama", model, inputs, lambda out: out.last_hidden_state[:, -1, :3].sum(-1)


@builder("hf_qwen2")
def _hf_qwen2():
    model = qwen2(vocab=100, intermediate=64, layers=1)
    inputs = {"inputs_embeds": _embeds(model, 100), "attention_mask": _mask()}
    return "hf_qwen2", model, inputs, 11  # int target: summed over positions


@builder("hf_mistral")
def _hf_mistral():
    from transformers import MistralConfig, MistralModel

    cfg = MistralConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=32,
        sliding_window=4,
        use_cache=False,
    )
    model = _hf(MistralModel, cfg, "sdpa")
    inputs = {"inputs_embeds": _embeds(model, 100), "attention_mask": _mask()}
    return "hf_mistral", model, inputs, lambda out: out.last_hidden_state[:, 2, :].pow(2).sum(-1)


@builder("hf_t5")
def _hf_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        use_cache=False,
        feed_forward_proj="gated-gelu",
    )
    model = _hf(T5ForConditionalGeneration, cfg, "eager")
    inputs = {
        "inputs_embeds": _embeds(model, 100),
        "attention_mask": _mask(),
        "decoder_inputs_embeds": _embeds(model, 100, seq=4),
    }
    return "hf_t5", model, inputs, lambda out: out.logits[:, -1, 5]


@builder("hf_whisper")
def _hf_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(
        vocab_size=100,
        num_mel_bins=8,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        d_model=32,
        max_source_positions=8,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        begin_suppress_tokens=None,
        use_cache=False,
    )
    model = _hf(WhisperForConditionalGeneration, cfg, "sdpa")
    with torch.no_grad():
        dec = model.get_decoder().embed_tokens(_ids(100, 4)).clone()
    inputs = {"input_features": torch.randn(BATCH, 8, 16), "decoder_inputs_embeds": dec}
    return "hf_whisper", model, inputs, lambda out: out.logits[:, -1, 5]


@builder("hf_mamba")
def _hf_mamba():
    from transformers import MambaConfig, MambaModel

    cfg = MambaConfig(
        vocab_size=100, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4, use_cache=False
    )
    model = _hf(MambaModel, cfg)
    inputs = {"inputs_embeds": _embeds(model, 100)}
    return "hf_mamba", model, inputs, lambda out: out.last_hidden_state[:, -1, :3].sum(-1)


@builder("hf_pix2struct")
def _hf_pix2struct():
    from transformers import (
        Pix2StructConfig,
        Pix2StructForConditionalGeneration,
        Pix2StructTextConfig,
        Pix2StructVisionConfig,
    )

    patch, seq = 4, 8
    vision = Pix2StructVisionConfig(
        hidden_size=32,
        patch_embed_hidden_size=patch * patch * 3,
        d_ff=64,
        d_kv=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        seq_len=seq,
        initializer_range=0.02,
    )
    text = Pix2StructTextConfig(
        vocab_size=100, hidden_size=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, dropout_rate=0.0, use_cache=False
    )
    cfg = Pix2StructConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    model = _hf(Pix2StructForConditionalGeneration, cfg)
    # flattened_patches: [row index, column index, patch pixels] per patch (DePlot's input format).
    rows = torch.arange(seq).div(4, rounding_mode="floor").float() + 1
    cols = torch.arange(seq).remainder(4).float() + 1
    pixels = torch.randn(BATCH, seq, patch * patch * 3)
    patches = torch.cat([rows.expand(BATCH, seq)[..., None], cols.expand(BATCH, seq)[..., None], pixels], -1)
    with torch.no_grad():
        dec = model.get_input_embeddings()(_ids(100, 3)).clone()
    inputs = {"flattened_patches": patches, "attention_mask": _mask(seq), "decoder_inputs_embeds": dec}
    return "hf_pix2struct", model, inputs, lambda out: out.logits[:, -1, 9]


@builder("hf_clip_text")
def _hf_clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = _hf(CLIPTextModel, cfg, "sdpa")
    ids = _ids(100)
    ids[:, -1] = 2  # eos, pooled
    # CLIP's text model only takes token ids: attributions are the embedding gradients summed over features.
    return (
        "hf_clip_text",
        model,
        {"input_ids": ids, "attention_mask": _mask()},
        (lambda out: out.pooler_output[:, :4].sum(-1)),
    )


ZOO = sorted(BUILDERS)
