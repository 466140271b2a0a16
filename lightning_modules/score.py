"""The score stage: train the epsilon-prediction U-Net that diffusion purification (SSNI) denoises with.

The standard DDPM objective (Ho et al. 2020, ``L_simple``): draw a timestep uniformly, diffuse the image
to it with Gaussian noise, and regress the noise, ``|| eps - eps_theta(x_t, t) ||^2``. No pretrained
diffusion weights are reachable from this project's machines, so the network is trained here. Purification
only ever visits timesteps up to ``t* + b`` (about 100-200 of the 1000), so training may be restricted to
``[1, t_max]``: the network's capacity then goes where purification uses it. This restriction is a
documented departure from DDPM, off by default. The pipeline's score stage trains on the training split
only (``mmd`` + ``denoiser`` + ``extra``: never ``val``, ``calibration`` or ``test``) and validates on ``val``
with fixed timesteps and noise per batch, so the validation loss of two epochs is comparable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dad.diffusion import DiffusionSchedule, ScoreUNet
from lightning_modules.stage import StageModule

__all__ = ["ScoreModule", "ScoreSettings"]


@dataclass(frozen=True)
class ScoreSettings:
    """The score stage (DDPM on CIFAR-10: Adam 2e-4, batch 128, EMA 0.9999, dropout 0.1).

    Attributes:
        epochs: training epochs.
        batch_size: images per step and process.
        lr: Adam learning rate.
        t_max: train only on timesteps in ``[1, t_max]``; None: all ``T`` steps.
        net: the :class:`~dad.diffusion.unet.ScoreUNet` options (``in_channels`` comes from the data).
        ema_decay: keep an exponential moving average of the weights with this decay (None: off); like the
            classifier's, it is applied by the training run (:class:`~callbacks.DelayedEMA`) and the stage's
            product holds the averaged weights.
        ema_start: the share of the training steps after which the average starts.
        flip: random horizontal flips of the training images (DDPM's CIFAR-10 augmentation; not for digits).
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 2e-4
    t_max: int | None = None
    net: dict[str, Any] = field(default_factory=dict)
    ema_decay: float | None = None
    ema_start: float = 0.25
    flip: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"Expected `score.epochs` >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"Expected `score.batch_size` >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"Expected `score.lr` > 0, got {self.lr}")
        if self.t_max is not None and self.t_max < 1:
            raise ValueError(f"Expected `score.t_max` >= 1 or None, got {self.t_max}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"Expected `score.ema_decay` in (0, 1), got {self.ema_decay}")
        if not 0.0 <= self.ema_start < 1.0:
            raise ValueError(f"Expected `score.ema_start` in [0, 1), got {self.ema_start}")


class ScoreModule(StageModule):
    """DDPM epsilon-prediction training of an injected :class:`~dad.diffusion.unet.ScoreUNet`.

    Batches are ``(x, y)`` with images in [0, 1] (the labels are ignored); the network sees ``2x - 1``.
    Logs ``train/loss`` and ``val/loss`` (the same loss, with timesteps and noise seeded by the batch index).

    Args:
        net: the network to train.
        settings: the stage's :class:`ScoreSettings`.
        schedule: the noise schedule; None: DDPM's (T = 1000, beta from 1e-4 to 0.02).
    """

    stage = "score"

    def __init__(self, net: ScoreUNet, settings: ScoreSettings = ScoreSettings(),
                 schedule: DiffusionSchedule | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"settings": asdict(settings)})
        self.settings = settings
        self.net = net
        self.schedule = DiffusionSchedule() if schedule is None else schedule
        if settings.t_max is not None and settings.t_max > self.schedule.num_steps:
            raise ValueError(f"Expected `score.t_max` <= {self.schedule.num_steps} (the schedule's steps), "
                             f"got {settings.t_max}")

    def network_specs(self) -> dict[str, Any]:
        return {"score_net": dict(self.net.config), "schedule": dict(self.schedule.config)}

    def sample_timesteps(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Uniform integer timesteps in ``[1, t_max]`` (``[1, T]`` without ``t_max``), one per image of ``x``."""
        high = self.settings.t_max or self.schedule.num_steps
        return torch.randint(1, high + 1, (x.shape[0],), generator=generator, device=x.device)

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``L_simple``: the mean squared error of the predicted noise, for images ``x`` in [0, 1].

        Args:
            x: images in [0, 1].
            generator: the source of the timesteps and the noise (on ``x``'s device); None: the global one.
        """
        t = self.sample_timesteps(x, generator)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_t = self.schedule.diffuse(2.0 * x - 1.0, t, noise)
        return F.mse_loss(self.net(x_t, t), noise)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch[0])
        self.log("train/loss", loss)  # not on the progress bar: it would read the loss back at every step
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        self.log("val/loss", self.loss(batch[0], generator), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.net.parameters(), lr=self.settings.lr)
