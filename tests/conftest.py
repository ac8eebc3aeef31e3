import os
import sys
from pathlib import Path

# Let test modules import the shared helpers next to them (``import model_zoo``).
sys.path.insert(0, str(Path(__file__).parent))

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is pinned in requirements-test.txt; only the fuzz tests need it
    settings = None

if settings is not None:
    # CI: derandomised (the same examples on every run, so a red CI is reproducible and never flaky),
    # no example database, no per-example deadline (a shared 2-core machine has noisy timings).
    # RELPROP_FUZZ_EXAMPLES=5000 switches to a long randomised run; a failure prints the minimal
    # program and a `@reproduce_failure` line; keep it as a regression test in tests/fuzz_regressions.py.
    _common = dict(
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    settings.register_profile("relprop-ci", derandomize=True, max_examples=60, **_common)
    _long = os.environ.get("RELPROP_FUZZ_EXAMPLES")
    if _long:
        settings.register_profile("relprop-long", derandomize=False, max_examples=int(_long), **_common)
    settings.load_profile("relprop-long" if _long else "relprop-ci")
