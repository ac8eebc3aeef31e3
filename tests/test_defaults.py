"""Defaults must let every check reach a verdict: a default that can only say "inconclusive" misleads."""

from relprop.cli import build_parser
from relprop.report.cell_metrics import MIN_RANDOMISATION_EXAMPLES
from relprop.report.compare import Settings


def test_default_randomisation_samples_can_reach_a_verdict():
    args = build_parser().parse_args(["compare"])
    assert args.randomisation_samples >= MIN_RANDOMISATION_EXAMPLES
    assert Settings().randomisation_samples >= MIN_RANDOMISATION_EXAMPLES
