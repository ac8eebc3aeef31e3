"""Model, data and method specs for the command line: parse a string, load a model or a dataset.

- :mod:`.models`: the registry of model kinds (``zoo:``, ``torchvision:``, ``timm:``, ``hf:``,
  ``python:``, files) and the dispatch; :mod:`.loaders`: one loader per kind, safe loading;
  :mod:`.loaded`: :class:`LoadedModel`; :mod:`.layers`: layer listing, Grad-CAM's default layer.
- :mod:`.data`: image folders, text files, zoo datasets; images read at their declared bit depth.
- :mod:`.labels`: data labels matched to the model's class names.
- :mod:`.methods`: ``NAME:KEY=VALUE`` method specs, checked before any work.
- :mod:`.preprocess`, :mod:`.inputs`: how raw data becomes model inputs.
- :mod:`.hashing`: content hashes for the result cache.

Every user error raises :class:`SpecError` with a one-line message naming what was wrong.
"""

from .data import IMAGE_SUFFIXES, Data, load_data, read_image
from .errors import SpecError, TrustPickleWarning, install_hint
from .inputs import check_forward, image_batch, text_batch
from .labels import LabelMap, map_labels, read_class_file
from .methods import METHOD_DEFAULTS, MethodSpec, check_method, parse_methods, split_methods
from .models import (
    KINDS,
    MODEL_PREFIXES,
    TEXT_ZOO,
    TRUST_PICKLE_HELP,
    ImageClassifier,
    LoadedModel,
    LoadOptions,
    ModelKind,
    TextClassifier,
    check_model_spec,
    default_cam_layer,
    default_composite,
    list_layers,
    load_model,
    spec_forms,
    takes_weights,
    unique_names,
    weights_prefixes,
)
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, check_overrides, override_preprocess

__all__ = [
    "IMAGE_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KINDS",
    "METHOD_DEFAULTS",
    "MODEL_PREFIXES",
    "TEXT_ZOO",
    "TRUST_PICKLE_HELP",
    "Data",
    "ImageClassifier",
    "LabelMap",
    "LoadOptions",
    "LoadedModel",
    "MethodSpec",
    "ModelKind",
    "Preprocess",
    "SpecError",
    "TextClassifier",
    "TrustPickleWarning",
    "check_forward",
    "check_method",
    "check_model_spec",
    "default_cam_layer",
    "default_composite",
    "image_batch",
    "install_hint",
    "list_layers",
    "load_data",
    "load_model",
    "map_labels",
    "check_overrides",
    "override_preprocess",
    "parse_methods",
    "read_class_file",
    "read_image",
    "spec_forms",
    "split_methods",
    "takes_weights",
    "text_batch",
    "unique_names",
    "weights_prefixes",
]
