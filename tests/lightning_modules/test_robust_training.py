"""Adversarial training in the classifier stage: settings, the training and validation steps, DDP, and robustness."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_modules.classifier as classifier
from dad.attacks import pgd
from dad.models import create_model
from dad.training.inner import fat_examples
from dad.training.losses import gairat_weights
from lightning_modules.classifier import ClassifierModule, ClassifierSettings

REPO = Path(__file__).resolve().parents[2]
METHODS = ["pgd_at", "trades", "fat", "fat_trades", "gairat", "gair_fat"]


def _digits() -> tuple[Tensor, Tensor]:
    digits = load_digits()
    return torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1), torch.tensor(digits.target)


def _module(**settings: Any) -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(create_model("small_cnn", num_classes=10, in_channels=1), ClassifierSettings(**settings))


def _trainer(epochs: int, **kwargs: Any) -> pl.Trainer:
    options = dict(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**options, **kwargs})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"training": "pgd_at", "label_smoothing": 0.1},
         "Expected `classifier.label_smoothing` 0 with adversarial training \\(it masks gradients\\), got 0.1"),
        ({"training": "mart"}, "Expected `classifier.training` in"),
        ({"adv_eps": 0.0}, "Expected `classifier.adv_eps` > 0, got 0.0"),
        ({"adv_step_size": -0.1}, "Expected `classifier.adv_step_size` > 0"),
        ({"adv_steps": 0}, "Expected `classifier.adv_steps` to be an integer >= 1, got 0"),
        ({"training": "trades", "method": {"beta": -1.0}}, "Expected `classifier.method.beta` >= 0"),
        ({"training": "fat", "method": {"omega": -0.001}}, "Expected `classifier.method.omega` >= 0"),
        ({"training": "pgd_at", "method": {"beta": 6.0}}, "Unknown `classifier.method` option\\(s\\) \\['beta'\\]"),
        ({"robust_val_samples": 0}, "Expected `classifier.robust_val_samples` to be an integer >= 1, got 0"),
    ],
)
def test_invalid_settings_are_rejected(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClassifierSettings(**settings)


def test_label_smoothing_stays_allowed_for_standard_training() -> None:
    assert ClassifierSettings(label_smoothing=0.1).training == "standard"


def test_the_checkpoint_criterion_is_robust_accuracy_for_adversarial_training() -> None:
    assert _module().monitor == "val/acc"
    assert all(_module(training=method).monitor == "val/robust_acc" for method in METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_validates_its_robust_accuracy(method: str, monkeypatch) -> None:
    attacked: list[int] = []

    def counting_pgd(model, x, *args, **kwargs):  # type: ignore[no-untyped-def]
        attacked.append(len(x))
        return pgd(model, x, *args, **kwargs)

    monkeypatch.setattr(classifier, "pgd", counting_pgd)
    x, y = _digits()
    module = _module(training=method, epochs=2, adv_eps=0.2, adv_step_size=0.05, adv_steps=3, robust_val_samples=30)
    before = copy.deepcopy(module.model.state_dict())
    trainer = _trainer(2, limit_train_batches=2, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(TensorDataset(x[:40], y[:40]), batch_size=20),
                DataLoader(TensorDataset(x[40:90], y[40:90]), batch_size=20))
    metrics = trainer.callback_metrics
    assert {"val/robust_acc", "val/acc", "train/adv_acc", "train/loss"} <= set(metrics)
    assert attacked == [20, 10, 20, 10]  # the first 30 validation images, each epoch
    passes = float(metrics["train/backward_passes_per_sample"])
    over_the_fit = float(module.backward_passes.compute())
    if method in ("fat", "fat_trades", "gair_fat"):
        assert 1.0 <= passes <= 4.0 and 1.0 <= over_the_fit <= 4.0  # early stopped: at most K + 1
    else:
        assert passes == 4.0 and over_the_fit == 4.0  # K inner steps and the outer backward
    assert module.model.training and all(m.training for m in module.model.modules())
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items())


@pytest.mark.parametrize(("method", "outer_forwards"), [("pgd_at", 1), ("trades", 2), ("fat", 1), ("fat_trades", 2)])
def test_batch_norm_statistics_move_only_in_the_outer_step(method: str, outer_forwards: int) -> None:
    module = _module(training=method, adv_eps=0.2, adv_step_size=0.05, adv_steps=3)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module.train()
    x, y = _digits()
    loss = module.training_step((x[:16], y[:16]), 0)
    loss.backward()
    bn = module.model.body[0][1]
    assert int(bn.num_batches_tracked) == outer_forwards
    assert all(p.grad is not None for p in module.model.parameters())


@pytest.mark.parametrize("method", ["gairat", "gair_fat"])
def test_gairat_weights_start_at_half_of_the_epochs(method: str) -> None:
    options = {"omega": 0.0} if method == "gair_fat" else {}
    module = _module(training=method, adv_eps=0.2, adv_step_size=0.05, adv_steps=3, method=options, epochs=10)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module.train()
    x, y = _digits()
    x, y = x[:32], y[:32]
    state = copy.deepcopy(module.model.state_dict())

    def step_and_reference(fraction: float) -> tuple[Tensor, Tensor, Tensor]:
        module.model.load_state_dict(state)
        module.epoch_fraction = lambda: fraction  # type: ignore[method-assign]
        torch.manual_seed(1)
        loss = module.training_step((x, y), 0)
        module.model.load_state_dict(state)
        torch.manual_seed(1)
        inner = module.method.inner(module.model, x, y, fraction)
        losses = F.cross_entropy(module.model(inner.examples), y, reduction="none")
        return loss, losses, gairat_weights(inner.kappa, 3)

    loss, losses, weights = step_and_reference(0.4)
    torch.testing.assert_close(loss, losses.mean())  # uniform weights in the first half
    loss, losses, weights = step_and_reference(0.5)
    assert weights.std() > 0.1
    torch.testing.assert_close(loss, (weights * losses).mean())


def test_gair_fat_uses_fats_early_stopped_examples() -> None:
    module = _module(training="gair_fat", adv_eps=0.2, adv_step_size=0.05, adv_steps=3, method={"omega": 0.0},
                     epochs=10)
    x, y = _digits()
    inner = module.method.inner(module.model, x[:16], y[:16], 0.5)
    reference = fat_examples(module.model, x[:16], y[:16], 0.2, 0.05, 3, tau=1, omega=0.0)
    torch.testing.assert_close(inner.examples, reference.examples)
    assert torch.equal(inner.kappa, reference.kappa)


def test_robust_validation_attacks_this_ranks_share_of_the_first_images(monkeypatch) -> None:
    attacked: list[int] = []
    monkeypatch.setattr(classifier, "rank_and_world", lambda: (1, 2))
    monkeypatch.setattr(classifier, "pgd", lambda model, x, *args, **kwargs: attacked.append(len(x)) or x)
    module = _module(training="pgd_at", robust_val_samples=25)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module.eval()
    x, y = _digits()
    module.on_validation_epoch_start()
    for i in range(3):
        module.validation_step((x[10 * i:10 * i + 10], y[10 * i:10 * i + 10]), i)
    assert attacked == [10, 2]  # rank 1 of 2 holds global images 1, 3, ..., 23 of the first 25: 12 of them


def test_the_kappa_histogram_goes_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = _digits()
    module = _module(training="gairat", adv_eps=0.2, adv_step_size=0.05, adv_steps=2, epochs=1)
    logger = TensorBoardLogger(str(tmp_path), name="logs", version="tb")
    trainer = _trainer(1, logger=logger, limit_train_batches=2, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, DataLoader(TensorDataset(x[:40], y[:40]), batch_size=20))
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path / "logs" / "tb"), size_guidance={"histograms": 0}).Reload()
    assert "train/kappa" in events.Tags()["histograms"]
    assert len(events.Histograms("train/kappa")) == 2


def test_a_tiny_robust_run_is_more_robust_than_a_standard_one() -> None:
    x, y = _digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held_out = order[:500], order[500:800]
    robust = {}
    for method in ("standard", "pgd_at"):
        pl.seed_everything(0, verbose=False)
        module = _module(training=method, epochs=8, lr=3e-3, adv_eps=0.2, adv_step_size=0.05, adv_steps=5)
        _trainer(8, limit_val_batches=0).fit(module, DataLoader(TensorDataset(x[train], y[train]), batch_size=50,
                                                                shuffle=True))
        model = module.model.eval()
        x_adv = pgd(model, x[held_out], y[held_out], 0.2, 0.05, 10, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            robust[method] = (model(x_adv).argmax(1) == y[held_out]).float().mean().item()
    # measured (seeds 0-2): standard 0.00-0.01, pgd_at 0.41-0.44
    assert robust["standard"] < 0.1 and robust["pgd_at"] > robust["standard"] + 0.25, robust


@pytest.mark.ddp
def test_gairat_weights_are_normalised_over_the_global_batch_under_ddp(tmp_path: Path) -> None:
    script = REPO / "tests" / "pipeline" / "scripts" / "gairat_step.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    for mode in ("single", "ddp"):
        result = subprocess.run([sys.executable, str(script), mode, str(tmp_path)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    single = torch.load(tmp_path / "gairat_single_rank0.pt", weights_only=True)
    ddp = [torch.load(tmp_path / f"gairat_ddp_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert single["weights"].mean().item() == pytest.approx(1.0) and single["weights"].std() > 0.1
    for rank, shard in enumerate(ddp):  # rank r holds samples r::2 of the global batch
        assert torch.equal(shard["kappa"], single["kappa"][rank::2])
        torch.testing.assert_close(shard["weights"], single["weights"][rank::2])
    # a per-rank normalisation would differ: the ranks' shares do not have mean 1 on their own
    assert abs(ddp[0]["weights"].mean().item() - 1.0) > 0.05
    torch.testing.assert_close((ddp[0]["loss"] + ddp[1]["loss"]) / 2, single["loss"])
    for shard in ddp:
        assert set(shard["grads"]) == set(single["grads"]) and single["grads"]
        for name, grad in single["grads"].items():
            torch.testing.assert_close(shard["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
