"""relprop: explain the predictions of any PyTorch model.

Record a forward pass as a graph of ATen operations (:func:`trace`), then propagate a rule set over
it: the exact gradient, LRP composites, and the rest of the attribution family, all through
:func:`explain`.
"""

from .graph import Graph, Node, Value
from .methods import METHODS, Coverage, Explanation, activation_profiles, coverage, explain, register_method
from .plan import Plan, plan
from .propagate import PropagationError, propagate
from .rules import Composite, NoRuleError, RuleContext, named_composite, register_rule
from .trace import TraceError, trace

__version__ = "0.2.0"

__all__ = [
    "Composite",
    "Coverage",
    "Explanation",
    "Graph",
    "METHODS",
    "Node",
    "NoRuleError",
    "Plan",
    "PropagationError",
    "RuleContext",
    "TraceError",
    "Value",
    "activation_profiles",
    "coverage",
    "explain",
    "named_composite",
    "plan",
    "propagate",
    "register_method",
    "register_rule",
    "trace",
]


def __getattr__(name: str):
    # Heavier layers load on first use so ``import relprop`` stays light.
    if name in ("metrics", "zoo", "captum", "report", "visualize"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'relprop' has no attribute {name!r}")
