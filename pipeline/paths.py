"""Where each artefact of a run lives: ``runs/<name>/`` and its stage folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunPaths", "STAGES", "PURIFICATION_STAGES"]

STAGES = ("classifier", "kernel", "denoiser", "defense", "score", "purifier")
PURIFICATION_STAGES = ("score", "purifier")
"""The stages of diffusion purification: ``train.py pipeline`` runs them only when ``purifier.kinds`` is set."""


@dataclass(frozen=True)
class RunPaths:
    """Where each artefact of a run lives."""

    root: Path

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def done(self, stage: str) -> Path:
        """Written when ``stage`` has finished (its summary, as JSON)."""
        return self.stage_dir(stage) / "done.json"

    def last(self, stage: str) -> Path:
        return self.stage_dir(stage) / "last.ckpt"

    def product(self, stage: str) -> Path:
        """The checkpoint the next stage consumes: the best classifier/denoiser, the final kernel and score model."""
        return self.stage_dir(stage) / ("last.ckpt" if stage in ("kernel", "score") else "best.ckpt")

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def aes(self) -> Path:
        return self.root / "aes"

    @property
    def defense(self) -> Path:
        return self.root / "defense.pt"

    def purified_defense(self, kind: str) -> Path:
        """The defense whose purification path is the diffusion purifier ``kind`` (written by the purifier stage)."""
        return self.root / f"defense_{kind}.pt"

    @property
    def logs(self) -> Path:
        return self.root / "logs"
