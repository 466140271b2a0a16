"""The assembled defense as a LightningModule: evaluation of the undefended classifier and DAD."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics import SumMetric

from dad.attacks.adaptive import attack_defense
from dad.attacks.config import AttackConfig
from dad.defense import DADDefense

__all__ = ["DADModule", "CLEAN"]

CLEAN = "clean"
_COUNTS = ("n", "undefended", "dad", "denoised", "batches", "flagged")


class DADModule(pl.LightningModule):
    """Runs the defense on clean test batches and on each configured attack.

    For every batch and every attack it counts correct predictions of the undefended classifier and of
    DAD, and how many batches the detector flagged. Counts are torchmetrics sums, so they are exact
    under DDP. Clean and classifier-threat adversarial images are kept (``kept``) for the
    random-batch detection metrics computed afterwards.

    Args:
        defense: the assembled :class:`~dad.defense.DADDefense`.
        attacks: named attack configurations.
        keep_images: keep the images for detection metrics on random batches.
    """

    def __init__(self, defense: DADDefense, attacks: dict[str, AttackConfig] | None = None,
                 keep_images: bool = True) -> None:
        super().__init__()
        self.defense = defense
        self.attacks = dict(attacks or {})
        self.keep_images = keep_images
        names = [CLEAN, *self.attacks]
        self.counts = torch.nn.ModuleDict(
            {f"{name}__{key}": SumMetric() for name in names for key in _COUNTS}
        )
        self.kept: dict[str, list[Tensor]] = defaultdict(list)
        self.scores: dict[str, list[Tensor]] = defaultdict(list)

    def train(self, mode: bool = True) -> "DADModule":
        super().train(mode)
        self.defense.eval()
        return self

    @torch.no_grad()
    def _record(self, name: str, x: Tensor, y: Tensor, with_denoised: bool = False) -> None:
        undefended = self.defense.classifier(x).argmax(1)
        out = self.defense.forward_with_info(x)
        c = self.counts
        c[f"{name}__n"].update(float(len(y)))
        c[f"{name}__undefended"].update((undefended == y).sum().float())
        c[f"{name}__dad"].update((out.logits.argmax(1) == y).sum().float())
        c[f"{name}__batches"].update(1.0)
        c[f"{name}__flagged"].update(out.adversarial.float())
        if with_denoised:
            c[f"{name}__denoised"].update((self.defense.classifier(self.defense.purify(x)).argmax(1) == y).sum().float())
        self.scores[name].append(out.score.detach().reshape(1).cpu())
        if self.keep_images:
            self.kept[name].append(x.detach().cpu())

    def attack(self, cfg: AttackConfig, x: Tensor, y: Tensor, batch_idx: int) -> Tensor:
        """AEs of one batch under ``cfg`` (seeded by the attack's seed and the batch index)."""
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(cfg.seed * 1_000_003 + batch_idx)
            if cfg.threat == "classifier":
                return cfg.run_on_classifier(self.defense.classifier, x, y)
            return attack_defense(self.defense, x, y, cfg)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._record(CLEAN, *batch)
        self.log("val/dad_clean_acc", self.results([CLEAN])[CLEAN]["dad"], batch_size=len(batch[1]))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self._record(CLEAN, x, y, with_denoised=True)
        for name, cfg in self.attacks.items():
            self._record(name, self.attack(cfg, x, y, batch_idx), y)

    def results(self, names: list[str] | None = None) -> dict[str, dict[str, float]]:
        """Accuracies and the detection rate per name (``clean`` and each attack), as fractions."""
        out: dict[str, dict[str, float]] = {}
        for name in names or [CLEAN, *self.attacks]:
            total = {key: self.counts[f"{name}__{key}"].compute().item() for key in _COUNTS}
            n = max(total["n"], 1.0)
            out[name] = {
                "n": int(total["n"]),
                "undefended": total["undefended"] / n,
                "dad": total["dad"] / n,
                "detection_rate": total["flagged"] / max(total["batches"], 1.0),
                "batches": int(total["batches"]),
            }
            if name == CLEAN:
                out[name]["denoised"] = total["denoised"] / n
        return out

    def configure_optimizers(self) -> Any:
        return None
