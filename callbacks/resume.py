"""Exact mid-epoch resumption: the data position and every rank's random state travel with the checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

from datamodules.sampling import ResumableSampler

__all__ = ["ResumeState", "FinalCheckpoint", "random_state", "restore_random_state"]

log = logging.getLogger(__name__)

_KEY = "dad_resume"


def random_state(device: torch.device) -> dict[str, Any]:
    """This process's CPU generator state and, on a GPU, that of its device's default generator."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_random_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`random_state` saved (the CUDA state only onto a CUDA device)."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class ResumeState(Callback):
    """Stores every rank's random state (CPU and CUDA generators) and the batches consumed in the current epoch.

    On resume, each rank's random state is restored when training starts (after any sanity check) and the
    training loader's :class:`~datamodules.sampling.ResumableSampler` skips the consumed batches, so a run
    killed mid-epoch and resumed from ``last.ckpt`` continues exactly as the uninterrupted run: attack starts,
    noise and augmentation drawn on a GPU come from its CUDA generator, saved beside the CPU one. The states
    are gathered from all ranks when the checkpoint is written (every rank writes the same checkpoint
    content; rank 0 saves it); a run resumed on another number of processes restores rank 0's state on every
    rank, with a warning (the order of draws then cannot be the uninterrupted run's anyway).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        own = random_state(pl_module.device)
        states: list[Any] = [own]
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            states = [None] * trainer.world_size
            dist.all_gather_object(states, own)
        checkpoint[_KEY] = {
            "rng": states,
            "epoch": trainer.current_epoch,
            "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.ready,
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(_KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        states = state.get("rng") or [{"cpu": state["torch_rng"]}]  # before the per-rank states: rank 0's CPU state
        if len(states) != trainer.world_size:
            log.warning("The checkpoint holds the random states of %d process(es), this run has %d: every rank "
                        "restores rank 0's; the resumed run is not the uninterrupted one", len(states),
                        trainer.world_size)
        restore_random_state(states[trainer.global_rank] if len(states) == trainer.world_size else states[0],
                             pl_module.device)
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableSampler) and state["epoch"] == trainer.current_epoch:
            sampler.skip_samples = state["batches_done"] * loader.batch_size


class FinalCheckpoint(Callback):
    """Writes the checkpoint ``path`` when training ends, while the Trainer is live (every rank takes part).

    For a stage whose product is its final state (the kernel: ``last.ckpt``) and whose periodic checkpoints
    may not fall on the last step.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)
