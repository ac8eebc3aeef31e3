"""Every op of every zoo model gets a rule under the LRP composites (no fallback, no error)."""

from __future__ import annotations

import functools

import pytest

import relprop
from model_zoo import ZOO, build


@functools.lru_cache(maxsize=4)
def _entry(name):
    return build(name)


@pytest.mark.parametrize("composite", ["epsilon", "attnlrp"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_full_coverage(name, composite):
    _, model, inputs, _ = _entry(name)
    cov = relprop.coverage(model, inputs, composite=composite)
    if cov.fraction != 1.0:
        missing = sorted({f"{op} in '{module}'" for op, module in cov.unsupported})
        print(f"{name} / {composite}: {cov.fraction:.2%} covered; unsupported:\n  " + "\n  ".join(missing))
        print(cov)
    assert cov.fraction == 1.0, f"{name}/{composite}: unsupported ops {sorted({op for op, _ in cov.unsupported})}"
