"""AEs that do not depend on the defense, crafted once per run and judged by every evaluation of it.

A classifier-only attack crafts its AEs on the defense's classifier, a transfer attack on its source: neither sees
the detector, the noise or the purifier. Two evaluations of one run that differ only there (the backbone alone,
``--eval.routing never``, beside the defense's own routing; another defense file over the same classifier) would
craft the same AEs twice, from the same images, seeds and attack. The store keeps each batch's AEs under a key of
everything they depend on (the attack's configuration, a digest of the attacked network's weights, the split, the
batch size, the evaluation protocol); a later evaluation with the same key reads them instead of crafting them
again, and judges them with its own defense and noise draws. On a CIFAR-10 CPU-scale run AutoAttack on the
classifier alone is 14 of the 35 minutes of the backbone-alone evaluation.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from dad.io import atomic_torch_save

__all__ = ["CraftedStore", "module_digest"]

log = logging.getLogger(__name__)

_FORMAT = "dad-crafted-aes"
_VERSION = 1


def module_digest(module: nn.Module) -> str:
    """Hex SHA-256 of a network's state: every parameter and buffer, with its name, dtype and shape."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class CraftedStore:
    """The AEs of one attack, one file per batch under ``directory/key/``, written atomically (evaluations running
    side by side, or the ranks of one, share it safely).

    Args:
        directory: the run's store of crafted AEs.
        key: everything the AEs depend on, hashed (:func:`evaluation.state.state_key`).
        read: whether saved AEs are read (an evaluation that does not resume crafts every batch, and saves it).
    """

    def __init__(self, directory: str | Path, key: str, read: bool = True) -> None:
        self.key = key
        self.folder = Path(directory) / key
        self.read = read
        self.reads = 0  # batches whose AEs were read rather than crafted

    def _path(self, batch_idx: int) -> Path:
        return self.folder / f"{int(batch_idx)}.pt"

    def load(self, batch_idx: int, index: Tensor, like: Tensor) -> Tensor | None:
        """The saved AEs of batch ``batch_idx`` if they were made under this key for the samples ``index`` and have
        the shape of ``like`` (placed like it), else None."""
        path = self._path(batch_idx)
        if not self.read or not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged file is crafted again, never trusted
            log.warning("Ignoring unreadable crafted AEs %s (%s)", path, str(err).splitlines()[0])
            return None
        if (not isinstance(saved, dict) or saved.get("format") != _FORMAT or saved.get("version") != _VERSION
                or saved.get("key") != self.key or not torch.equal(saved["index"], index.cpu())
                or saved["x_adv"].shape != like.shape):
            return None
        self.reads += 1
        return saved["x_adv"].to(like)

    def save(self, batch_idx: int, index: Tensor, x_adv: Tensor) -> None:
        """Keep the AEs of batch ``batch_idx`` (samples ``index``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"format": _FORMAT, "version": _VERSION, "key": self.key, "index": index.detach().cpu(),
                           "x_adv": x_adv.detach().cpu()}, self._path(batch_idx))
