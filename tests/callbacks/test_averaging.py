"""DelayedEMA against its definition: the live weights until the start step, then an EMA seeded by a copy."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import DelayedEMA


class _Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.trajectory: list[torch.Tensor] = []  # the live weights after every step
        self.validated: list[torch.Tensor] = []  # the weights each validation saw

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, *args: object) -> None:
        self.trajectory.append(self.net.weight.detach().clone())

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        if batch_idx == 0:
            self.validated.append(self.net.weight.detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_average_starts_at_its_share_of_the_steps_and_validation_sees_the_live_weights_before() -> None:
    data = TensorDataset(torch.randn(40, 3), torch.randn(40, 1))
    module, decay = _Linear(), 0.8
    trainer = pl.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[DelayedEMA(decay, start=0.5)])
    trainer.fit(module, DataLoader(data, batch_size=10), DataLoader(data, batch_size=10))
    steps = module.trajectory
    assert len(steps) == 16
    average = steps[8].clone()  # the update of zero-based step 8 (the ninth) copies the live weights
    for w in steps[9:]:
        average = decay * average + (1 - decay) * w
    torch.testing.assert_close(module.net.weight, average)
    torch.testing.assert_close(module.validated[0], steps[3])  # epoch 1: no average yet, the live weights
    torch.testing.assert_close(module.validated[1], steps[7])
    expected = steps[8].clone()
    for w in steps[9:12]:
        expected = decay * expected + (1 - decay) * w
    torch.testing.assert_close(module.validated[2], expected)  # epoch 3: the average so far


def test_the_start_must_be_a_share() -> None:
    with pytest.raises(ValueError, match="start"):
        DelayedEMA(0.9, start=1.0)


def test_the_host_counted_update_equals_averaged_models_bit_for_bit() -> None:
    torch.manual_seed(0)
    live = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))  # parameters and buffers (an int counter too)
    ema = DelayedEMA(0.9)
    ema._average_model = torch.optim.swa_utils.AveragedModel(live, use_buffers=True,
                                                             avg_fn=torch.optim.swa_utils.get_ema_avg_fn(0.9))
    reference = torch.optim.swa_utils.AveragedModel(live, use_buffers=True,
                                                    avg_fn=torch.optim.swa_utils.get_ema_avg_fn(0.9))
    for _ in range(4):
        live.train()(torch.randn(4, 2, 5, 5))  # moves the batch-norm statistics
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p))
        ema._update(live)
        reference.update_parameters(live)
    assert int(ema._average_model.n_averaged) == int(reference.n_averaged) == 4
    for ours, theirs in zip(ema._average_model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(ours, theirs)
