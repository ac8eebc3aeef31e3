"""Minimal programs found by the property-based tests (tests/test_fuzz.py), kept as plain tests.

Each case is a program exactly as hypothesis printed it (see tests/fuzz_programs.py for the format) and
the property it broke. Cases for ops listed in ``fuzz_programs.KNOWN_FAILING`` are strict xfails: when
the op is fixed the case XPASSes, which fails the suite until the entry is removed from that list (so
the fuzzer draws the op again).
"""

from __future__ import annotations

import pytest

from fuzz_programs import KNOWN_FAILING, valid_under_autograd
from test_fuzz import check_composites, check_gradient, check_lrp0

# (id, property, known-failing key or None, steps, input shape)
CASES = [
    # trace: metadata-only in-place ops on a fresh tensor
    (
        "unsqueeze_",
        "gradient",
        "inplace.unsqueeze_",
        [("inplace", (0,), {"fn": "unsqueeze_", "fresh": True, "dim": 1})],
        (2, 6),
    ),
    (
        "unsqueeze_-after-use",
        "gradient",
        "inplace.unsqueeze_",
        [
            ("add_branches", (0, 0), {}),
            ("add_branches", (1, 0), {}),
            ("inplace", (2,), {"fn": "unsqueeze_", "fresh": False, "dim": 1}),
        ],
        (2, 6),
    ),
    (
        "squeeze_",
        "gradient",
        "inplace.squeeze_",
        [("view", (0,), {"fn": "unsqueeze", "dim": 1}), ("inplace", (1,), {"fn": "squeeze_", "fresh": True, "dim": 1})],
        (2, 6),
    ),
    (
        "transpose_",
        "gradient",
        "inplace.transpose_",
        [("inplace", (0,), {"fn": "transpose_", "fresh": True, "dim": 1, "dim2": 2})],
        (2, 4, 5),
    ),
    (
        "transpose_-after-use",
        "lrp0",
        "inplace.transpose_",
        [
            ("linear", (0,), {"out": 5, "bias": False}),
            ("relu", (1,), {}),
            ("inplace", (1,), {"fn": "transpose_", "fresh": False, "dim": 1, "dim2": 2}),
            ("view", (3,), {"fn": "transpose", "dim": 1, "dim2": 2}),
            ("add_branches", (4, 2), {}),
        ],
        (2, 4, 5),
    ),
    # y.t_() once: the value keeps its new (transposed) shape; the step returns y.t()
    ("t_", "lrp0", "inplace.t_", [("inplace", (0,), {"fn": "t_", "fresh": True, "twice": False})], (2, 6)),
    (
        "t_-composites",
        "composites",
        "inplace.t_",
        [("inplace", (0,), {"fn": "t_", "fresh": True, "twice": False})],
        (2, 6),
    ),
    (
        "t_-after-use",
        "lrp0",
        "inplace.t_",
        [
            ("linear", (0,), {"out": 6, "bias": False}),
            ("relu", (1,), {}),
            ("inplace", (1,), {"fn": "t_", "fresh": False, "twice": False}),
            ("add_branches", (3, 2), {}),
        ],
        (2, 6),
    ),
    # logsumexp is a reduction, not an element-wise function
    (
        "logsumexp",
        "composites",
        "reduce.logsumexp",
        [("reduce", (0,), {"dim": 1, "keepdim": False, "fn": "logsumexp"})],
        (2, 4, 5),
    ),
    (
        "logsumexp-keepdim",
        "composites",
        "reduce.logsumexp",
        [("reduce", (0,), {"dim": 2, "keepdim": True, "fn": "logsumexp"})],
        (2, 4, 5),
    ),
    # diag_embed had no rule (NoRuleError under LRP-0); it routes values like a view
    ("diag_embed", "lrp0", None, [("view", (0,), {"fn": "diag_embed"})], (2, 6)),
]

CHECKS = {"gradient": check_gradient, "lrp0": check_lrp0, "composites": check_composites}


@pytest.mark.parametrize(
    "prop,known,steps,in_shape",
    [
        pytest.param(
            p,
            k,
            s,
            shape,
            id=f"{name}-{p}",
            marks=[pytest.mark.xfail(reason=KNOWN_FAILING[k], strict=True)] if k in KNOWN_FAILING else [],
        )
        for name, p, k, s, shape in CASES
    ],
)
def test_regression(prop, known, steps, in_shape):
    assert valid_under_autograd(steps, in_shape)  # a valid program under plain autograd
    for target in range(2):
        CHECKS[prop](steps, in_shape, target)
