"""ChannelsLast: a training stage's built-in networks in channels-last format on a CPU train to the same weights
(up to the order of floating-point sums); a network of the user's own keeps its format."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import ChannelsLast
from callbacks.memory_format import built_in
from dad.models import create_model


class _Stage(pl.LightningModule):
    """A classifier and a user network of its own, trained together on cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = create_model("small_cnn", num_classes=10, in_channels=1)
        self.own = _Own()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.model(self.own(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class _Own(nn.Module):
    """A user's network that ``view``s its activations: it cannot run in channels-last format."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.convs[0](x)
        return x + 0.1 * self.convs[1](h.view(len(x), -1).view_as(h))


def _fit(enabled: bool | None) -> _Stage:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
    module = _Stage()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[ChannelsLast(enabled)])
    trainer.fit(module, DataLoader(data, batch_size=16))
    return module


def test_built_in_networks_train_channels_last_on_a_cpu_to_the_same_weights() -> None:
    assert built_in(create_model("small_cnn", num_classes=10, in_channels=1)) and not built_in(_Own())
    last, plain = _fit(None), _fit(False)
    convs = [m.weight for m in last.model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    assert all(p.is_contiguous() for p in last.own.parameters())  # the user's network keeps its format
    assert all(p.is_contiguous() for p in plain.parameters())
    for (name, a), b in zip(last.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
