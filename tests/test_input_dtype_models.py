"""A floating input in another dtype than the model's is one clear ValueError before the forward, for models
that carry a ``dtype`` attribute of their own too (Hugging Face models; one whose attribute disagrees with its
weights), while ``Placed`` (which casts at its entry) keeps taking any float dtype."""

from __future__ import annotations

import pytest
import torch

import relprop
from relprop.methods._validate import check_input_dtype, model_float_dtype
from relprop.report.device import place

MATCH = r"^{name}: dtype torch.float64 but the model's parameters are torch.float32; convert the inputs with "


class Lying(torch.nn.Module):
    """float32 weights under a ``dtype`` attribute that says float64 (a stale or hand-set attribute)."""

    dtype = torch.float64

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x)


def test_a_dtype_attribute_does_not_hide_the_weights_dtype():
    model = Lying().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=MATCH.format(name="inputs")):
        relprop.explain(model, torch.rand(2, 4, dtype=torch.float64), target=0)
    assert model.calls == 0  # refused before the forward
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model_float_dtype(model) == torch.float32


def test_buffers_give_the_dtype_of_a_model_without_floating_parameters():
    model = torch.nn.BatchNorm1d(4, affine=False).eval()
    assert model_float_dtype(model) == torch.float32
    with pytest.raises(ValueError, match=MATCH.format(name="inputs")):
        check_input_dtype(model, torch.rand(2, 4, dtype=torch.float64))
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double())
    assert model_float_dtype(mixed) is None
    check_input_dtype(mixed, torch.rand(2, 2, dtype=torch.float64))  # not certain: left to run


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_hugging_face_models_get_the_one_line_error(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "vit":
        cfg = transformers.ViTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
        model = transformers.ViTForImageClassification(cfg).eval()
        inputs, name = torch.rand(2, 3, 16, 16, dtype=torch.float64), "inputs"
    else:
        cfg = transformers.BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=2,
        )
        model = transformers.BertForSequenceClassification(cfg).eval()
        inputs, name = {"inputs_embeds": torch.rand(2, 5, 16, dtype=torch.float64)}, r"inputs\['inputs_embeds'\]"
    assert isinstance(getattr(model, "dtype", None), torch.dtype)  # the attribute that used to skip the check
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=MATCH.format(name=name)):
        relprop.explain(model, inputs, target=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_placed_models_still_cast_any_float_input_at_their_entry():
    torch.manual_seed(0)
    placed = place(torch.nn.Sequential(torch.nn.Linear(4, 3)).eval(), "cpu", "bfloat16")
    x = torch.rand(2, 4)  # float32 into a bfloat16 model: Placed casts it
    check_input_dtype(placed, x)
    attr = relprop.explain(placed, x, target=0).attributions
    assert attr.dtype == torch.float32 and attr.shape == x.shape
