"""The classifier stage's training speed against a bare training loop of the same network, side by side.

Both train the config's classifier on the same synthetic CIFAR-shaped uint8 images held on the device, with the
config's batch size, memory format, optimiser (SGD with Nesterov momentum or Adam), schedule, label smoothing
and crop/flip, in the given precision, for the same number of full epochs after a warm-up epoch:

- ``bare``: a plain loop (a random permutation per epoch, one gather, :meth:`~datamodules.augment.FlipCrop.batch`,
  forward, backward, optimiser and scheduler steps), the fastest this network trains in this framework's
  PyTorch;
- ``stage``: :class:`~lightning_modules.classifier.ClassifierModule` under the stage's Trainer
  (:func:`pipeline.trainer.build_trainer`: the run's Trainer arguments and callbacks, the weight average when
  the config averages) on :class:`~datamodules.device_batches.DeviceBatches`, as ``train.py classifier`` runs it.

Each epoch is timed from its start to the end of its last training step (device synchronised at both ends), so
validation and checkpoints are outside the measure. Printed and written (``bench/results/classifier_speed_*.json``):
images/s of both, and ``classifier_over_bare``, the stage's share of the bare loop's speed.

    python -m bench.classifier_speed --config configs/cifar10_cpu.yaml --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback

from bench.machine import RESULTS, configure_threads, machine_description, write_result
from callbacks import DelayedEMA
from dad.models import create_model
from datamodules.augment import FlipCrop
from datamodules.device_batches import DeviceBatches
from datamodules.synthetic import synthetic_images
from lightning_modules.classifier import ClassifierModule, classifier_optimizer
from pipeline.config import PipelineConfig, load_config
from pipeline.trainer import build_trainer, quiet_third_party

__all__ = ["measure", "bare_loop", "stage_loop"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))


def _model(cfg: PipelineConfig, channels: int, num_classes: int, device: torch.device) -> torch.nn.Module:
    kwargs = {"in_channels": channels, **cfg.classifier.model_kwargs, "num_classes": num_classes}
    model = create_model(cfg.classifier.model, **kwargs).to(device)
    return model.to(memory_format=torch.channels_last) if cfg.classifier.channels_last else model


def bare_loop(cfg: PipelineConfig, images: torch.Tensor, labels: torch.Tensor, epochs: int, warmup: int,
              precision: str, num_classes: int) -> float:
    """Images per second of a plain training loop over the timed epochs (after ``warmup`` epochs)."""
    device, c = images.device, cfg.classifier
    batch = cfg.data.batch_size
    model = _model(cfg, images.shape[1], num_classes, device).train()
    steps_per_epoch = -(-len(labels) // batch)
    opt, sched, interval = classifier_optimizer(c, model.parameters(), steps_per_epoch * (warmup + epochs),
                                                warmup + epochs)
    augment = FlipCrop(c.crop_padding) if c.augment else None
    seconds = 0.0
    for epoch in range(warmup + epochs):
        _sync(device)
        start = time.perf_counter()
        order = torch.randperm(len(labels), device=device)
        for first in range(0, len(labels), batch):
            rows = order[first:first + batch]
            x = augment.batch(images[rows]) if augment is not None else images[rows].float().div_(255.0)
            if c.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, precision):
                loss = F.cross_entropy(model(x), labels[rows], label_smoothing=c.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None and interval == "step":
                sched.step()
        if sched is not None and interval == "epoch":
            sched.step()
        _sync(device)
        if epoch >= warmup:
            seconds += time.perf_counter() - start
    return epochs * len(labels) / seconds


class _EpochTimer(Callback):
    """Seconds of each training epoch, from its start to the end of its last training step (synchronised)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            _sync(pl_module.device)
            self.seconds.append(time.perf_counter() - self._start)


def stage_loop(cfg: PipelineConfig, images: torch.Tensor, labels: torch.Tensor, epochs: int, warmup: int,
               precision: str, num_classes: int) -> float:
    """Images per second of the classifier stage's training over the timed epochs (after ``warmup`` epochs)."""
    c = replace(cfg.classifier, epochs=warmup + epochs)
    device = images.device
    module = ClassifierModule(_model(cfg, images.shape[1], num_classes, torch.device("cpu")), c)
    timer = _EpochTimer()
    callbacks: list[Callback] = [timer, *([DelayedEMA(c.ema_decay, c.ema_start)] if c.ema_decay is not None else [])]
    trainer_args = {**cfg.trainer, "accelerator": device.type, "devices": [device.index or 0]
                    if device.type == "cuda" else 1, "precision": precision, "enable_progress_bar": False}
    loader = DeviceBatches(images.cpu(), labels.cpu(), cfg.data.batch_size, cfg.run.seed,
                           FlipCrop(c.crop_padding) if c.augment else None)
    with tempfile.TemporaryDirectory() as root:
        trainer = build_trainer(trainer_args, root, "classifier", callbacks, max_epochs=c.epochs)
        trainer.fit(module, train_dataloaders=loader)
    return epochs * len(labels) / sum(timer.seconds[warmup:])


def measure(cfg: PipelineConfig, device: torch.device, precision: str = "32-true", images: int = 34_000,
            epochs: int = 2, warmup: int = 1, num_classes: int = 10) -> dict[str, Any]:
    """Both loops on the same data, on ``device``: images/s and their ratio."""
    x, y = synthetic_images(images, num_classes, 3, 32, seed=0)
    x, y = x.to(device), y.to(device)
    pl.seed_everything(cfg.run.seed, verbose=False)
    bare = bare_loop(cfg, x, y, epochs, warmup, precision, num_classes)
    pl.seed_everything(cfg.run.seed, verbose=False)
    stage = stage_loop(cfg, x, y, epochs, warmup, precision, num_classes)
    return {"model": cfg.classifier.model, "batch_size": cfg.data.batch_size, "precision": precision,
            "channels_last": cfg.classifier.channels_last, "optimizer": cfg.classifier.optimizer,
            "images": images, "epochs_timed": epochs, "warmup_epochs": warmup,
            "bare_images_per_second": bare, "stage_images_per_second": stage, "classifier_over_bare": stage / bare}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cifar10_cpu.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--images", type=int, default=34_000, help="synthetic training images (cifar10_cpu: 34,000)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs, after one warm-up epoch")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default=None, help="result file name (default: classifier_speed_<device type>)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the result file")
    args = parser.parse_args(argv)
    quiet_third_party()
    configure_threads(args.threads)
    device = torch.device(args.device)
    result = {"machine": machine_description(device), "config": args.config,
              **measure(load_config(args.config), device, args.precision, args.images, args.epochs)}
    print(f"{result['model']} batch {result['batch_size']} {args.precision} on {device}: bare loop "
          f"{result['bare_images_per_second']:,.0f} images/s, classifier stage {result['stage_images_per_second']:,.0f}"
          f" images/s: {result['classifier_over_bare']:.2f} of the bare loop")
    write_result(args.name or f"classifier_speed_{device.type}", result, args.results)
    return result


if __name__ == "__main__":
    main()
