"""Text faithfulness metrics measure something: on models whose output depends on known tokens, an
attribution that ranks the deciding token first gets deletion < insertion and ABPC > 0, the reversed
ranking gets the mirror image, and every curve equals a plain hand-written loop (perturb the ids, run the
model). A model whose output does not move under perturbation (a randomly initialised BERT: ~1e-6) is
flagged in the report instead of showing ABPC 0.000 as if it were a tie.

Investigated report: a tiny random-init BERT gave ABPC 0.000 and insertion = deletion = 0.505 for every
method. Cause: honest, not a masking bug: replacing every content token by [MASK] moves that model's
probability by ~2e-6 (init std 0.02 -> pooler and classifier outputs ~1e-3 apart); the engine's curves
equal the hand-written ones below on a model that does react.
"""

import json

import numpy as np
import pytest
import torch

from relprop import metrics as M
from relprop.report import cell_metrics
from relprop.report.cell_metrics import FLAT_TOLERANCE, flat_warning
from test_cli_user_paths import FAST, tiny_bert

KEY, FILL, CLS, SEP, PAD = 7, 4, 2, 3, 0


class KeyTokenBag(torch.nn.Module):
    """Embedding-bag classifier: class 1 iff token ``KEY`` is among the unmasked tokens (logit +4 against a
    bias of 1 for class 0); tokens 8.. add 0.3 to class 0, the rest nothing."""

    def __init__(self, vocab: int = 12):
        super().__init__()
        w = torch.zeros(vocab, 2)
        w[KEY, 1] = 4.0
        w[8:, 0] = 0.3
        self.w = torch.nn.Parameter(w)
        self.bias = torch.nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, ids, mask):
        return (self.w[ids] * mask[..., None].float()).sum(1) + self.bias


def hand_curve(model, ids, mask, attr, content, fill, steps, order, insertion, target):
    """The plain computation: rank the content tokens, replace the first round(f * n) (or all but them for
    insertion) by ``fill``, run the model, softmax probability of ``target``."""
    out = np.zeros((ids.shape[0], steps + 1))
    for b in range(ids.shape[0]):
        pos = [int(p) for p in torch.nonzero(content[b]).reshape(-1)]
        pos.sort(key=lambda p: float(attr[b, p]), reverse=order == "morf")
        for k in range(steps + 1):
            n = int(round(k / steps * len(pos)))
            row = ids[b].clone()
            for p in pos[n:] if insertion else pos[:n]:
                row[p] = fill
            with torch.no_grad():
                logits = model(row[None], mask[b : b + 1])
            out[b, k] = float(torch.softmax(logits, -1)[0, target[b]])
    return out


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 12, (4, 9), generator=g)
    ids[ids == KEY] = 5
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[0, 3], ids[1, 1], ids[2, 6], ids[3, 2] = KEY, KEY, KEY, KEY  # one deciding token per text
    mask = torch.ones_like(ids)
    ids[3, 5:], mask[3, 5:] = PAD, 0  # padding, never replaced
    ids[3, 4] = SEP
    special = (ids == CLS) | (ids == SEP) | (ids == PAD)
    return ids, mask, special


def test_deciding_token_first_beats_reversed_and_curves_equal_a_hand_loop():
    model = KeyTokenBag().eval()
    ids, mask, special = batch()
    with torch.no_grad():
        assert model(ids, mask).argmax(1).tolist() == [1, 1, 1, 1]  # KEY decides: class 1 explained
    g = torch.Generator().manual_seed(1)
    good = torch.rand(ids.shape, generator=g) + 10.0 * (ids == KEY)  # KEY ranked first, the rest at random
    content = mask.bool() & ~special
    steps = 4
    res = {}
    for name, a in (("good", good), ("reversed", -good)):
        r = M.token_perturbation(model, ids, a, fill_id=FILL, attention_mask=mask, exclude=special, steps=steps)
        assert r.target.tolist() == [1, 1, 1, 1]
        for curve, order, ins in (("morf", "morf", False), ("lerf", "lerf", False), ("insertion", "morf", True)):
            want = hand_curve(model, ids, mask, a, content, FILL, steps, order, ins, r.target)
            np.testing.assert_allclose(getattr(r, curve).numpy(), want, rtol=1e-6, atol=1e-7, err_msg=f"{name} {curve}")
        res[name] = r
    g_idl, r_idl = res["good"].insertion_deletion, res["reversed"].insertion_deletion
    # KEY first: deleting it drops the class at once, inserting it restores it at once
    assert (g_idl.deletion_auc < g_idl.insertion_auc - 0.3).all(), (g_idl.deletion_auc, g_idl.insertion_auc)
    assert (res["good"].abpc.scores > 0.5).all(), res["good"].abpc.scores
    # reversed: KEY last, MoRF and LeRF swap: ABPC is the mirror image (negative), insertion < deletion
    assert (res["reversed"].abpc.scores < 0).all()
    torch.testing.assert_close(res["reversed"].abpc.scores, -res["good"].abpc.scores, rtol=1e-6, atol=1e-9)
    assert (r_idl.insertion_auc < r_idl.deletion_auc).all()
    # the perturbation reaches the model: with every content token replaced the class flips
    assert (res["good"].morf[:, -1] < 0.5).all() and (res["good"].morf[:, 0] > 0.8).all()


def test_flat_warning_only_for_curves_that_do_not_move():
    flat = torch.full((3, 5), 0.5047) + 1e-6 * torch.randn(3, 5)
    msg = flat_warning(flat, flat.flip(1), flat)
    assert msg is not None and "does not change under perturbation" in msg and "uninformative" in msg
    moved = flat.clone()
    moved[2, 3] += 2 * FLAT_TOLERANCE  # one copy of one example moves: the metrics can discriminate
    assert flat_warning(flat, flat, moved) is None
    assert flat_warning(moved, flat, flat) is None


def trained_bert(folder, steps: int = 60):
    """tiny_bert trained a few Adam steps so that 'good'/'bad' decide the class (about a second)."""
    transformers = pytest.importorskip("transformers")
    src = tiny_bert(folder / "init")
    tok = transformers.BertTokenizer.from_pretrained(str(src))
    model = transformers.BertForSequenceClassification.from_pretrained(str(src))
    # the word decides; without it (masked, or absent) both classes are equally likely
    texts = ["a good film", "a bad plot", "good plot", "bad film", "a good plot", "a bad film", "film good",
             "plot bad", "a film", "a plot", "[MASK] film", "a [MASK] plot", "[MASK] [MASK]", "film"]  # fmt: skip
    labels = torch.tensor([[0.0, 1.0], [1.0, 0.0]] * 4 + [[0.5, 0.5]] * 6)
    enc = tok(texts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(**enc).logits, labels).backward()
        opt.step()
    model.eval()
    out = folder / "trained"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, tok, model


def test_report_text_metrics_on_a_trained_bert_equal_hand_curves_and_rank_the_deciding_word(tmp_path):
    """The report's path (tokenizer's [MASK] as fill, special tokens kept, the loaded model wrapper) on a
    BERT that reacts: the word that decides gets ABPC > 0 first and < 0 last, equal to a hand loop on the
    Hugging Face model itself; no flat-model warning."""
    from relprop.specs.loaded import TextClassifier

    folder, tok, hf = trained_bert(tmp_path)
    enc = tok(["a good film", "a bad plot", "good plot", "bad film"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    module = TextClassifier(hf, tok.pad_token_id).eval()
    decides = (ids == tok.convert_tokens_to_ids("good")) | (ids == tok.convert_tokens_to_ids("bad"))
    attr = decides.float() + 0.01 * torch.arange(ids.shape[1]).float()  # deciding word first, then by position
    with torch.no_grad():
        target = hf(input_ids=ids, attention_mask=mask).logits.argmax(1)
    assert target.tolist() == [1, 0, 1, 0]  # trained: 'good'/'bad' decide
    s = type("S", (), {"steps": 3, "batch_size": 32})()  # the Settings fields text_perturbation reads
    special = torch.zeros_like(ids, dtype=torch.bool)
    for sid in tok.all_special_ids:
        special |= ids == sid
    content = mask.bool() & ~special

    def hf_fn(row, m):
        return hf(input_ids=row, attention_mask=m).logits

    per_step = {}
    for name, a in (("first", attr), ("last", -attr)):
        res = cell_metrics.text_perturbation(module, tok, {"input_ids": ids, "attention_mask": mask}, a, target, s)
        assert "warning" not in res["perturbation"]
        morf = hand_curve(hf_fn, ids, mask, a, content, tok.mask_token_id, 3, "morf", False, target)
        lerf = hand_curve(hf_fn, ids, mask, a, content, tok.mask_token_id, 3, "lerf", False, target)
        ins = hand_curve(hf_fn, ids, mask, a, content, tok.mask_token_id, 3, "morf", True, target)
        np.testing.assert_allclose(res["curves"]["morf"], morf.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res["curves"]["lerf"], lerf.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res["curves"]["insertion"], ins.mean(0), rtol=1e-5, atol=1e-6)
        want = np.trapezoid((lerf - morf)[:, 1:], axis=1) / 2  # per step: 2 trapezoid intervals over steps 1..3
        np.testing.assert_allclose(res["per_example"]["abpc"], want, rtol=1e-5, atol=1e-7)
        per_step[name] = np.array(res["per_example"]["abpc"])
        fr = np.linspace(0, 1, 4)
        ins_auc, del_auc = np.trapezoid(ins, fr, axis=1), np.trapezoid(morf, fr, axis=1)
        np.testing.assert_allclose(res["per_example"]["insertion"], ins_auc, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(res["per_example"]["deletion"], del_auc, rtol=1e-5, atol=1e-7)
        if name == "first":
            assert (del_auc < ins_auc).all(), (del_auc, ins_auc)
    assert (per_step["first"] > 0.05).all(), per_step
    assert (per_step["last"] < 0).all(), per_step


@pytest.mark.slow
def test_compare_flags_a_model_whose_output_does_not_move_and_not_a_trained_one(tmp_path, capsys):
    """`relprop compare` on the random-init tiny BERT: a warning (results.json, terminal, the cell's
    perturbation settings) says the faithfulness metrics are uninformative; on the trained copy, none."""
    from relprop.cli import main

    pytest.importorskip("transformers")
    trained, _, _ = trained_bert(tmp_path)
    csv = tmp_path / "reviews.csv"
    rows = [
        ("a good film", "positive"),
        ("a bad plot", "negative"),
        ("good plot", "positive"),
        ("bad film", "negative"),
    ]
    csv.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    for folder, flat in ((tmp_path / "init", True), (trained, False)):
        out = tmp_path / f"r-{folder.name}"
        rc = main(["compare", "--models", f"hf:{folder}", "--data", str(csv), "--methods", "gradient", "--out", str(out),
                   *FAST])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 0, err
        res = json.loads((out / "results.json").read_text())
        cell = res["models"][0]["methods"][0]
        warned = [w for w in res["warnings"] if "does not change under perturbation" in w]
        assert bool(warned) == flat, res["warnings"]
        assert ("warning" in cell["perturbation"]) == flat
        assert ("uninformative" in err) == flat, err
        if not flat:
            assert abs(cell["abpc"]) > 1e-3 and abs(cell["insertion"] - cell["deletion"]) > 1e-3, cell
        else:
            assert "uninformative" in (out / "index.html").read_text()
