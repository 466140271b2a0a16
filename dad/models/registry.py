"""Name -> builder registry and the one factory that builds classifiers by name (timm style)."""

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from dad.models.base import ImageClassifier
from dad.models.weights import load_classifier_weights

Builder = TypeVar("Builder", bound=Callable[..., ImageClassifier])

_MODEL_BUILDERS: dict[str, Callable[..., ImageClassifier]] = {}


def register_model(fn: Builder) -> Builder:
    """Register a model builder under its function name.

    Registering a name twice replaces the earlier builder with a warning.

    Args:
        fn: a function returning an :class:`ImageClassifier`; its keyword arguments are the
            model's options.

    Returns:
        ``fn`` unchanged, so this works as a decorator.
    """
    name = fn.__name__
    if name in _MODEL_BUILDERS:
        warnings.warn(f"Overwriting model '{name}' in the registry", stacklevel=2)
    _MODEL_BUILDERS[name] = fn
    return fn


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_MODEL_BUILDERS)


def create_model(name: str, checkpoint_path: str | None = None, **kwargs: Any) -> ImageClassifier:
    """Build a registered classifier, optionally loading its weights.

    Keyword arguments whose value is ``None`` are dropped, so the builder's defaults apply (this
    lets configs leave options unset).

    Args:
        name: a name from :func:`list_models`.
        checkpoint_path: a local state dict or Lightning checkpoint to load (see
            :func:`load_classifier_weights`); ``None`` keeps the initial weights.
        **kwargs: options of the builder, e.g. ``num_classes``, ``in_channels``, ``mean``, ``std``.

    Returns:
        The classifier, in training mode; ``model.spec`` records ``{"name", "kwargs"}`` (plain data) so
        that checkpoints and saved defenses can rebuild it (:func:`dad.networks.build_model`).
    """
    if name not in _MODEL_BUILDERS:
        raise ValueError(f"Unknown model '{name}'; available: {', '.join(list_models())}")
    options = {key: value for key, value in kwargs.items() if value is not None}
    model = _MODEL_BUILDERS[name](**options)
    model.spec = {"name": name, "kwargs": options}
    if checkpoint_path is not None:
        load_classifier_weights(model, checkpoint_path)
    return model
