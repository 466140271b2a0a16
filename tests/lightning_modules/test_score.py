"""The score stage: DDPM training lowers the loss, ``t_max`` restricts the timesteps, settings are checked."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from dad.diffusion import ScoreUNet
from lightning_modules.score import ScoreModule, ScoreSettings


def _module(**settings: object) -> ScoreModule:
    torch.manual_seed(0)
    net = ScoreUNet(in_channels=1, widths=(8, 16), blocks_per_level=1)
    return ScoreModule(net, ScoreSettings(**settings))  # type: ignore[arg-type]


def _fixed_loss(module: ScoreModule, x: torch.Tensor) -> float:
    torch.manual_seed(123)  # the same timesteps and noise before and after training
    with torch.no_grad():
        return float(torch.stack([module.loss(x) for _ in range(4)]).mean())


def test_a_short_fit_lowers_the_denoising_loss() -> None:
    # toy images: bright squares on a dark background at random positions
    images = torch.zeros(64, 1, 8, 8)
    corners = torch.randint(0, 5, (64, 2), generator=torch.Generator().manual_seed(0))
    for image, (row, col) in zip(images, corners.tolist()):
        image[:, row:row + 4, col:col + 4] = 1.0
    data = DataLoader(TensorDataset(images, torch.zeros(64, dtype=torch.long)), batch_size=16, shuffle=True)
    module = _module(lr=3e-3)
    before = _fixed_loss(module, images)
    trainer = pl.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data, data)
    after = _fixed_loss(module, images)
    assert before == pytest.approx(1.0, abs=0.1)  # the untrained network predicts zero noise
    assert after < 0.6 * before
    assert {"train/loss", "val/loss"} <= set(trainer.callback_metrics)
    assert module.network_specs() == {"score_net": module.net.config,
                                      "schedule": {"num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}}


@pytest.mark.parametrize(("t_max", "high"), [(None, 1000), (50, 50), (1, 1)])
def test_t_max_restricts_the_sampled_timesteps(t_max: int | None, high: int) -> None:
    module = _module(t_max=t_max)
    draws = module.sample_timesteps(torch.zeros(20000, 1), torch.Generator().manual_seed(0))
    assert draws.dtype == torch.long and int(draws.min()) == 1 and int(draws.max()) == high
    again = module.sample_timesteps(torch.zeros(20000, 1), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"epochs": 0}, r"Expected `score.epochs` >= 1, got 0"),
    ({"batch_size": 0}, r"`score.batch_size` >= 1"),
    ({"lr": 0.0}, r"`score.lr` > 0"),
    ({"t_max": 0}, r"`score.t_max` >= 1"),
    ({"ema_decay": 1.0}, r"`score.ema_decay` in \(0, 1\)"),
    ({"ema_start": 1.0}, r"`score.ema_start` in \[0, 1\)"),
])
def test_settings_are_validated(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ScoreSettings(**kwargs)  # type: ignore[arg-type]


def test_t_max_beyond_the_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match=r"`score.t_max` <= 1000"):
        _module(t_max=1001)
