"""bench/witness_size.py: the stored subsets it measures are the pipeline's."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dad.kernels import SemanticKernel
from dad.sample_detector import SampleDetector

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.witness_size import subset  # noqa: E402


class _Pixels(torch.nn.Module):
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_subset_keeps_the_pipelines_seeded_pairs_or_everything() -> None:
    clean = torch.arange(10.0).reshape(10, 1, 1, 1)
    stored = SampleDetector(SemanticKernel(_Pixels()), clean, clean + 100)
    kept_clean, kept_adversarial = subset(stored, 4, seed=7)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(7))[:4]  # pipeline.defense._witness_sets
    assert kept_clean.flatten().long().tolist() == expected.tolist()
    torch.testing.assert_close(kept_adversarial, kept_clean + 100)  # each AE stays with its clean image
    assert len(subset(stored, 10, seed=7)[0]) == 10 and len(subset(stored, 50, seed=7)[0]) == 10
