"""The classifier stage's fast recipe on tiny runs: the one-cycle schedule, label smoothing, weight averaging."""

from __future__ import annotations

from dataclasses import replace

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from dad.models import create_model
from lightning_modules.classifier import ClassifierModule, ClassifierSettings
from pipeline.checkpoints import read_checkpoint
from pipeline.paths import RunPaths
from pipeline.stages import load_datamodule, run_stage
from tests.conftest import tiny_config


class _LearningRates(pl.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_one_cycle_warms_up_to_the_peak_then_anneals() -> None:
    settings = ClassifierSettings(epochs=4, optimizer="sgd", lr=0.4, scheduler="onecycle", warmup=0.25,
                                  label_smoothing=0.1)
    module = ClassifierModule(create_model("small_cnn", num_classes=10, in_channels=1), settings)
    data = TensorDataset(torch.rand(80, 1, 8, 8), torch.randint(0, 10, (80,)))
    rates = _LearningRates()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[rates])
    trainer.fit(module, DataLoader(data, batch_size=10))
    assert len(rates.rates) == 32
    peak = max(range(32), key=lambda i: rates.rates[i])
    assert rates.rates[peak] == pytest.approx(0.4, rel=0.02) and 6 <= peak <= 9  # 25% of 32 steps
    assert rates.rates[0] == pytest.approx(0.4 / 25, rel=1e-3)  # starts at lr / div_factor
    assert all(a >= b for a, b in zip(rates.rates[peak:], rates.rates[peak + 1:]))  # then only decreases
    assert rates.rates[-1] < 0.4 / 100


def test_label_smoothing_applies_to_training_only() -> None:
    module = ClassifierModule(create_model("small_cnn", num_classes=10, in_channels=1),
                              ClassifierSettings(label_smoothing=0.2))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    logits = module.model(x)
    smoothed = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.2)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    torch.testing.assert_close(module._step((x, y), module.train_acc, "train"), smoothed)
    plain = torch.nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(module._step((x, y), module.val_acc, "val"), plain)


def test_the_recipe_keeps_averaged_weights_with_recomputed_batch_norm_statistics(tmp_path) -> None:
    cfg = tiny_config(tmp_path)
    cfg = replace(cfg, classifier=ClassifierSettings(epochs=3, optimizer="sgd", lr=0.1, scheduler="onecycle",
                                                     augment=True, crop_padding=1, ema_decay=0.9,
                                                     label_smoothing=0.1, channels_last=True))
    summary = run_stage(cfg, "classifier")
    assert {"val_acc", "val_acc_averaged_statistics", "images_per_second", "train_images"} <= set(summary)
    assert summary["backward_passes_per_sample"] == 1.0  # standard training: one backward per sample
    ckpt = read_checkpoint(RunPaths(cfg.run.dir).product("classifier"), "classifier")
    assert "current_model_state" in ckpt  # the averaged weights are the checkpoint's state_dict
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert not torch.equal(averaged["model.head.weight"], raw["model.head.weight"])
    # the saved statistics are those of one pass of the averaged weights over the training images
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    model.load_state_dict({k[len("model."):]: v for k, v in averaged.items() if k.startswith("model.")})
    dm = load_datamodule(cfg, RunPaths(cfg.run.dir))
    torch.optim.swa_utils.update_bn(DataLoader(dm.dataset("train"), batch_size=dm.batch_size), model)
    for name, value in model.state_dict().items():
        if "running" in name:
            torch.testing.assert_close(averaged[f"model.{name}"], value, msg=name)
