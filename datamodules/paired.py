"""Paired data: (clean, adversarial, label) triples for a classifier and an attack configuration."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dad.attacks import AttackSpec
from datamodules.ae_cache import load_or_generate
from datamodules.base import DADDataModule
from datamodules.sampling import ResumableSampler

__all__ = ["PairedDataModule"]


class PairedDataModule(pl.LightningDataModule):
    """Yields ``(clean, adversarial, label)`` batches of one training split and one validation split.

    The adversarial examples are made once by ``attack`` on ``classifier`` (frozen) and cached under
    ``cache_dir`` (see :mod:`datamodules.ae_cache`): when the module is a Trainer's data module, in its ``setup``
    on the Trainer's device; otherwise where the classifier is.

    Args:
        base: the image data module with the DAD splits.
        classifier: the classifier the AEs are crafted against.
        classifier_hash: SHA-256 of the classifier's checkpoint (recorded in the cache manifest).
        attack: the attack (threat ``classifier``).
        cache_dir: where AE caches live (the run directory's ``aes/``).
        train_split: ``mmd`` (kernel stage) or ``denoiser`` (denoiser stage).
        val_split: held-out pairs for validation, or None.
        batch_size: per-process batch size; None means the whole split in one batch (the paper's
            full-batch kernel training).
    """

    def __init__(
        self,
        base: DADDataModule,
        classifier: nn.Module,
        classifier_hash: str,
        attack: AttackSpec,
        cache_dir: str | Path,
        train_split: str = "mmd",
        val_split: str | None = "val",
        batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 2:
            raise ValueError(f"Expected an MMD batch of at least 2 pairs, got batch_size={batch_size}")
        self.base = base
        self.classifier = classifier
        self.classifier_hash = classifier_hash
        self.attack = attack
        self.cache_dir = Path(cache_dir)
        self.train_split = train_split
        self.val_split = val_split
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pairs: dict[str, TensorDataset] = {}

    def triples(self, split: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(clean, adversarial, labels)`` of a split, generating the AEs if no valid cache exists."""
        if split not in self.pairs:
            clean, labels = self.base.split_tensors(split)
            adv = load_or_generate(
                self.classifier,
                clean,
                labels,
                self.attack,
                self.cache_dir / f"{split}.pt",
                self.classifier_hash,
                self.base.splits.digest(),
                split,
                self.trainer.strategy.root_device if self.trainer is not None else None,
            )
            self.pairs[split] = TensorDataset(clean, adv, labels)
        return self.pairs[split].tensors  # type: ignore[return-value]

    def setup(self, stage: str | None = None) -> None:
        self.base.setup()
        self.triples(self.train_split)
        if self.val_split is not None:
            self.triples(self.val_split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self.pairs[split]
        sampler = ResumableSampler(len(data), shuffle=shuffle, seed=self.base.seed, pad=shuffle)
        per_rank = len(sampler)
        size = min(self.batch_size or per_rank, per_rank)
        # training batches all have the same size: a trailing batch of one pair has no U-statistic
        return DataLoader(data, batch_size=size, sampler=sampler, drop_last=shuffle, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.base.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_split is None:
            return []  # type: ignore[return-value]
        return self._loader(self.val_split, shuffle=False)
