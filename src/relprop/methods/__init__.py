"""Attribution methods: every backward method is a rule set over the traced graph."""

from .core import Explanation
from .coverage import Coverage, coverage
from .explain import METHODS, explain, register_method

__all__ = ["Coverage", "Explanation", "METHODS", "coverage", "explain", "register_method"]
