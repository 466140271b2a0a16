"""What every training stage's checkpoint carries besides Lightning's own content.

A stage checkpoint is tagged with its stage (so a kernel checkpoint is never taken for a denoiser one),
the checkpoint format version, and the plain-data specs of its networks
(:func:`dad.networks.network_specs`), from which the next stage or a later process rebuilds them.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

__all__ = ["StageModule", "STAGE_KEY", "NETWORKS_KEY", "FORMAT_KEY", "CHECKPOINT_FORMAT"]

STAGE_KEY = "dad_stage"
NETWORKS_KEY = "dad_networks"
FORMAT_KEY = "dad_format"
CHECKPOINT_FORMAT = 2
"""Version of the stage checkpoints (1: networks rebuilt from hyper-parameters, before networks were injected)."""


class StageModule(pl.LightningModule):
    """A LightningModule of one pipeline stage; subclasses set :attr:`stage` and implement :meth:`network_specs`."""

    stage: str = ""

    def network_specs(self) -> dict[str, Any]:
        """The stage's networks as plain data (:func:`dad.networks.network_specs`)."""
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[STAGE_KEY] = self.stage
        checkpoint[FORMAT_KEY] = CHECKPOINT_FORMAT
        checkpoint[NETWORKS_KEY] = self.network_specs()
