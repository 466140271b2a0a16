"""GAIR-FAT training steps on a fixed global batch, in one process or under DDP (2 CPU processes, gloo).

Usage: python gairat_step.py {single,ddp} OUT_DIR

Two epochs of one step each: the second is in the weighted half of training. The classifier is a small MLP
(no batch norm, whose per-rank batch statistics would make DDP differ from one process anyway), pretrained
here identically in every process so that kappa varies across the batch; FAT's path from the clean image
with no Gaussian term is deterministic. Saves, per rank, the second step's GAIRAT weights and kappa, its loss
and every parameter gradient after DDP's reduction, for tests/lightning_modules/test_robust_training.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import dad.training.gairat as gairat
from dad.distributed import release_process_group
from dad.models import ImageClassifier
from datamodules.sampling import ResumableSampler
from lightning_modules.classifier import ClassifierModule, ClassifierSettings

GLOBAL_BATCH = 16
SETTINGS = ClassifierSettings(epochs=2, lr=1e-3, scheduler="none", training="gair_fat", adv_eps=0.1,
                              adv_step_size=0.025, adv_steps=5, method={"omega": 0.0})


class MLP(ImageClassifier):
    def __init__(self) -> None:
        super().__init__(num_classes=10, num_features=32, in_channels=1, mean=(0.5,), std=(0.5,))
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def _features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)


class Capture(pl.Callback):
    def __init__(self, out: Path, tag: str) -> None:
        self.out, self.tag, self.grads = out, tag, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.current_epoch == 1:
            torch.save({"loss": outputs["loss"].detach(), "grads": self.grads, **RECORDED},
                       self.out / f"gairat_{self.tag}_rank{trainer.global_rank}.pt")


RECORDED: dict[str, Any] = {}


def _recording(weights_fn):  # type: ignore[no-untyped-def]
    def wrapper(kappa: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        weights = weights_fn(kappa, *args, **kwargs)
        RECORDED.update(kappa=kappa.clone(), weights=weights.detach().clone())
        return weights
    return wrapper


def _pretrained(x: Tensor, y: Tensor) -> MLP:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    digits = load_digits()
    x = torch.tensor(digits.images[:500], dtype=torch.float32).div(16).unsqueeze(1)
    y = torch.tensor(digits.target[:500])
    module = ClassifierModule(_pretrained(x, y), SETTINGS)
    gairat.gairat_weights = _recording(gairat.gairat_weights)
    devices = 2 if mode == "ddp" else 1
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=2,
                         limit_train_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         use_distributed_sampler=False, callbacks=[Capture(Path(out), mode)])
    # the project's sampler deals the global batch (held out from the pretraining) round-robin: rank r holds r::2
    batch = TensorDataset(x[-GLOBAL_BATCH:], y[-GLOBAL_BATCH:])
    sampler = ResumableSampler(GLOBAL_BATCH, shuffle=False)
    trainer.fit(module, train_dataloaders=DataLoader(batch, batch_size=GLOBAL_BATCH // devices, sampler=sampler))
    release_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
