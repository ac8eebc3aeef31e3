"""Evaluation metrics for explanations: perturbation curves (pixel flipping,
region perturbation, ABPC, insertion/deletion, and the same for text models:
``token_perturbation``), class sensitivity, model parameter randomisation,
conservation and complexity, plus a Quantus adapter.

All perturbation metrics run on one engine: ``_units`` (patches, features,
tokens and their ranking), ``baselines`` (what a unit is replaced by) and
``_engine`` (building and evaluating the perturbed copies; the one ABPC
definition, ``area_between``).

All functions accept tensors or NumPy arrays and return small result
dataclasses holding plain numbers, per-sample tensors and curves; each result
has a ``.plot()`` method (matplotlib is imported only then).
"""

from ._utils import pearson, rankdata, spearman
from .baselines import Baseline
from .complexity import ComplexityResult, complexity, sparseness
from .conservation import ConservationResult, conservation
from .perturbation import (
    ABPCResult,
    InsertionDeletionResult,
    PerturbationCurve,
    PerturbationResult,
    abpc,
    insertion_deletion,
    perturbation_curve,
    pixel_flipping,
    region_perturbation,
)
from .quantus_adapter import quantus_explain_func
from .randomisation import RandomisationResult, model_parameter_randomisation, randomisable_layers
from .sensitivity import ClassSensitivityResult, class_sensitivity
from .tokens import TokenPerturbationResult, token_perturbation

__all__ = [
    "ABPCResult",
    "Baseline",
    "ClassSensitivityResult",
    "ComplexityResult",
    "ConservationResult",
    "InsertionDeletionResult",
    "PerturbationCurve",
    "PerturbationResult",
    "RandomisationResult",
    "abpc",
    "class_sensitivity",
    "complexity",
    "conservation",
    "insertion_deletion",
    "model_parameter_randomisation",
    "pearson",
    "perturbation_curve",
    "pixel_flipping",
    "quantus_explain_func",
    "randomisable_layers",
    "rankdata",
    "region_perturbation",
    "sparseness",
    "spearman",
    "token_perturbation",
    "TokenPerturbationResult",
]
