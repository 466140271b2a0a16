"""Classifier zoo: every model takes [0, 1] images and splits features from head.

Importing this package registers all architectures; build them with :func:`create_model`.
"""

from dad.models import resnet_cifar, small_cnn, torchvision_resnet, wide_resnet  # noqa: F401  (registration)
from dad.models.base import ImageClassifier, freeze
from dad.models.registry import create_model, list_models, register_model
from dad.models.weights import load_classifier_weights

__all__ = [
    "ImageClassifier",
    "create_model",
    "freeze",
    "list_models",
    "load_classifier_weights",
    "register_model",
]
