"""compare's text metrics run one explain batch (``--batch-size`` texts) at a time, as the image metrics do:
a text's values are those of its batch run alone (what a Ray shard, aligned to batches, computes), the
``rows`` hold the per-example curves whose means are the report's curves, and they equal a hand loop."""

import types

import numpy as np
import torch

from relprop.report import cell_metrics
from test_text_metrics_sanity import CLS, FILL, PAD, SEP, KeyTokenBag, batch, hand_curve


class Tok:
    """The tokenizer attributes text_perturbation reads."""

    mask_token_id = FILL
    all_special_ids = [CLS, SEP, PAD]

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]


def test_text_metrics_per_batch_equal_each_batch_alone_and_a_hand_loop():
    model = KeyTokenBag().eval()
    ids, mask, special = batch()
    attr = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = model(ids, mask).argmax(1)
    s = types.SimpleNamespace(batch_size=3, steps=4)
    rows: dict = {}
    whole = cell_metrics.text_perturbation(
        model, Tok(), {"input_ids": ids, "attention_mask": mask}, attr, target, s, rows=rows
    )
    alone = [
        cell_metrics.text_perturbation(
            model, Tok(), {"input_ids": ids[r], "attention_mask": mask[r]}, attr[r], target[r], s
        )
        for r in (slice(0, 3), slice(3, 4))
    ]
    for k, v in whole["per_example"].items():
        assert v == alone[0]["per_example"][k] + alone[1]["per_example"][k], k  # bit for bit
    assert set(rows) == {"morf", "lerf", "insertion", "deletion"}
    assert all(rows[k].shape == (4, 5) for k in rows)
    for k in ("morf", "lerf", "insertion", "deletion"):
        assert whole["curves"][k] == cell_metrics._list(rows[k].mean(0)), k
    content = ~special
    for name, order, ins in (("morf", "morf", False), ("lerf", "lerf", False), ("insertion", "morf", True)):
        ref = hand_curve(model, ids, mask, attr, content, FILL, 4, order, ins, target)
        np.testing.assert_allclose(rows[name].numpy(), ref, rtol=0, atol=1e-6)
