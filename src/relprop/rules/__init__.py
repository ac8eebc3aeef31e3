"""Per-operation rules, one module per family of ops, and the composites that combine them."""

from . import attention, deeplift, elementwise, gradient, guided, linear, normalization, recurrent, reduction, routing  # noqa: F401  (register)  # noqa: F401,E402
from .attention import AttentionRule, SoftmaxRule
from .base import NoRuleError, Rule, RuleContext, family_of, register_family
from .composites import (
    GRADIENT,
    NAMES,
    Composite,
    GradientComposite,
    base_families,
    named_composite,
    register_rule,
    resolve_composite,
)
from .elementwise import Identity, Stop, Uniform
from .linear import AlphaBeta, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus, stabilize
from .normalization import ConstantScale, PassThrough
from .reduction import Proportional
from .routing import Route

__all__ = [
    "AlphaBeta",
    "AttentionRule",
    "Composite",
    "ConstantScale",
    "Epsilon",
    "Flat",
    "GRADIENT",
    "Gamma",
    "GradientComposite",
    "Identity",
    "NAMES",
    "NoRuleError",
    "PassThrough",
    "Proportional",
    "Route",
    "Rule",
    "RuleContext",
    "SoftmaxRule",
    "Stop",
    "Uniform",
    "WSquare",
    "ZBox",
    "ZPlus",
    "base_families",
    "family_of",
    "named_composite",
    "register_family",
    "register_rule",
    "resolve_composite",
    "stabilize",
]
