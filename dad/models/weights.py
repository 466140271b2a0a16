"""Load classifier weights from the state-dict files that training code actually writes."""

import os
import pickle
from collections.abc import Mapping

import torch
from torch import Tensor, nn

# Wrapper attribute names that prefix every key: DataParallel/DDP (`module.`) and the usual
# attribute under which a LightningModule or a training script holds its network.
_WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "model.", "net.")
_MAX_KEYS_SHOWN = 3


def _read_state_dict(path: str) -> dict[str, Tensor]:
    """Read a plain state dict or a Lightning checkpoint's ``state_dict`` from ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"Cannot load {path} with weights_only=True ({first_line}); save the network's state dict instead"
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in obj.items()
    ):
        raise ValueError(f"Expected a state dict (str -> Tensor) or a checkpoint with one in {path}")
    return dict(obj)


def _strip_wrapper_prefixes(state_dict: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Strip the wrapper prefixes shared by all keys until the keys match ``expected``.

    Prefixes are removed one level at a time (``model.module.`` takes two steps). The first level
    whose keys equal ``expected`` wins; if none does, the level sharing most keys with ``expected``
    is returned so that the mismatch report names the real differences.
    """
    levels = [state_dict]
    while True:
        keys = levels[-1].keys()
        prefix = next((p for p in _WRAPPER_PREFIXES if keys and all(k.startswith(p) for k in keys)), None)
        if prefix is None:
            break
        levels.append({key[len(prefix) :]: value for key, value in levels[-1].items()})
    for level in levels:
        if set(level) == expected:
            return level
    return max(levels, key=lambda level: len(expected.intersection(level)))


def _check_match(state_dict: dict[str, Tensor], model: nn.Module, path: str) -> None:
    """Raise a one-line ValueError naming the first missing/unexpected keys or shape mismatch."""
    own = model.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    name = type(model).__name__
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {path} does not fit {name}: {len(missing)} missing keys "
            f"{missing[:_MAX_KEYS_SHOWN]}, {len(unexpected)} unexpected keys {unexpected[:_MAX_KEYS_SHOWN]}"
        )
    for key, value in own.items():
        if value.shape != state_dict[key].shape:
            raise ValueError(
                f"Checkpoint {path} does not fit {name}: '{key}' has shape {tuple(state_dict[key].shape)} "
                f"in the file and {tuple(value.shape)} in the model"
            )


def load_classifier_weights(model: nn.Module, path: str) -> nn.Module:
    """Load weights saved by common training code into ``model``, strictly.

    Accepts a plain state dict, a Lightning checkpoint (``{"state_dict": ...}``) and keys
    prefixed by wrapper names (``module.``, ``model.``, ``net.``, possibly nested), which are
    stripped so the keys match the model's. A model with an ``adapt_state_dict(state_dict)`` method
    maps other layouts of its weights (torchvision's ResNet-50 file, say) onto its own keys. The file
    is read with ``weights_only=True``.

    Args:
        model: the network to fill; its architecture must match the file.
        path: a local file written by ``torch.save``.

    Returns:
        ``model``, with the loaded weights.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no state dict, or its keys or shapes do not fit ``model``.
    """
    state_dict = _read_state_dict(path)
    state_dict = _strip_wrapper_prefixes(state_dict, set(model.state_dict()))
    adapt = getattr(model, "adapt_state_dict", None)  # e.g. a wrapper reading its source library's layout
    if callable(adapt):
        state_dict = adapt(state_dict)
    _check_match(state_dict, model, path)
    model.load_state_dict(state_dict, strict=True)
    return model
