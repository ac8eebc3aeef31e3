"""Small review items: ``relprop list`` takes its file rows from ``specs.models.FILE_FORMS`` (one tuple
of forms), the randomisation verdict and its reason come from one rule, and ``explain --out`` refuses a token-score
suffix before the model runs (the write step has no second check to reach)."""

from __future__ import annotations

import itertools

import pytest

from relprop.cli import main
from relprop.report import cell_metrics
from relprop.specs.models import FILE_FORMS, spec_forms


def test_list_shows_each_file_spec_form_of_the_loader(capsys, monkeypatch):
    assert main(["list"]) == 0
    specs = capsys.readouterr().out.split("model specs:")[1]
    for example, text in FILE_FORMS:
        line = next(ln for ln in specs.splitlines() if ln.strip().startswith(example + " "))
        assert line.rstrip().endswith(text), (example, line)
        assert f"{example} ({text})" in spec_forms()  # the help text names the same forms
    # a new file form shows up in the listing and the help without a second edit, even one whose text holds
    # " (" and " | " (the listing used to split the help string back into rows on those)
    onnx = ("FILE.onnx", "an exported graph (opset 17) | experimental")
    monkeypatch.setattr("relprop.specs.models.FILE_FORMS", (*FILE_FORMS, onnx))
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(ln.split() == ["FILE.onnx", *onnx[1].split()] for ln in out), out
    assert spec_forms().endswith(" | FILE.onnx (an exported graph (opset 17) | experimental)")


@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_inconclusive_reason_exactly_when_the_verdict_is_inconclusive(threshold):
    for n, lo, hi in itertools.product([0, 1, 4, 5, 30], [0.1, 0.3, 0.5, None], [0.2, 0.5, 0.9, None]):
        summary = {"randomisation_similarity": {"mean": 0.4, "ci": [lo, hi], "n": n}}
        verdict = cell_metrics.randomisation_verdict(summary, threshold)
        reason = cell_metrics.inconclusive_reason(summary, threshold)
        assert (reason is not None) == (verdict == "inconclusive")
        if verdict == "inconclusive":
            assert reason == ("few" if n < cell_metrics.MIN_RANDOMISATION_EXAMPLES else "straddles")
    assert cell_metrics.randomisation_verdict({}, 0.5) is None and cell_metrics.inconclusive_reason({}, 0.5) is None


def test_explain_token_scores_with_a_bad_suffix_fail_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import relprop.cli as cli

    monkeypatch.setattr(cli, "_loader", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = main(["explain", "--model", "zoo:bert_sst2", "--input", "fine", "--out", str(tmp_path / "t.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("relprop: error: --out ") and "t.txt" in err


def test_docs_name_one_form_of_relprop_layers_and_both_uses_of_a_pt_file(capsys):
    """README showed ``relprop layers zoo:resnet_digits`` while ``--help`` showed ``relprop layers --model ...``
    (a hidden alias); ``relprop list`` described ``FILE.pt`` only as a whole pickled model, though a state dict
    with ``--weights`` works too."""
    from pathlib import Path

    from relprop.cli import build_parser, main

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    helps = build_parser().format_help()
    sub = build_parser()._subparsers._group_actions[0].choices["layers"].format_help()  # type: ignore[union-attr]
    shown = [ln for text in (readme, helps, sub) for ln in text.splitlines() if "relprop layers " in ln]
    assert shown and not [ln for ln in shown if "--model" in ln], shown
    assert "relprop layers zoo:resnet_digits" in readme and "relprop layers zoo:resnet_digits" in helps
    assert main(["list"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("FILE.pt"))
    assert "--trust-pickle" in row and "state dict" in row and "--weights" in row
