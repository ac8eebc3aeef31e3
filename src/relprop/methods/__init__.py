"""Attribution methods: every backward method is a rule set over the traced graph."""

from . import gradcam, gradients, integrated, noise_tunnel, normgrad, occlusion  # noqa: F401,E402  (register)
from ._convergence import DeepLiftDeltaWarning
from .core import Explanation
from .coverage import Coverage, coverage
from .explain import METHODS, explain, register_method
from .profiles import ActivationProfiles, activation_profiles, plot_activation_profiles  # noqa: E402

__all__ = [
    "ActivationProfiles",
    "Coverage",
    "DeepLiftDeltaWarning",
    "Explanation",
    "METHODS",
    "activation_profiles",
    "coverage",
    "explain",
    "plot_activation_profiles",
    "register_method",
]
