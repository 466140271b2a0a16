"""The evaluator's randomised rule (correct in every draw) and its mixed batches, on stub defenses."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dad.attacks import AttackSpec
from dad.defense import DefenseOutput
from evaluation.state import AttackState
from lightning_modules.evaluator import CLEAN, DefenseEvaluator

B = 10


class _Stub(nn.Module):
    """A two-class "defense" that is right with probability ``p`` per draw, and records the batches it judges."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        self.p = p
        self.seen: list[Tensor] = []

    def purify_runs(self, x: Tensor, count: int) -> Tensor:
        return x.expand(count, *x.shape)

    def logits_of_runs(self, images: Tensor) -> Tensor:
        return self.classifier(images.flatten(0, 1)).view(*images.shape[:2], -1)

    def forward_draws(self, x: Tensor, draws: int) -> DefenseOutput:
        self.seen.append(x.detach().clone())
        right = torch.rand(draws, len(x)) < self.p  # label 0 is right
        logits = torch.stack([right.float(), (~right).float()], dim=2)
        return DefenseOutput(logits=logits, score=torch.tensor(0.0), adversarial=torch.tensor(False),
                             flags=torch.zeros(len(x), dtype=torch.bool))


def _test(defense: nn.Module, x: Tensor, names: list[str], **kwargs: object) -> DefenseEvaluator:
    states = {name: AttackState(name) for name in names}
    module = DefenseEvaluator(defense, states=states, batch_size=B, **kwargs)  # type: ignore[arg-type]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         inference_mode=False)
    data = TensorDataset(x, torch.zeros(len(x), dtype=torch.long), torch.arange(len(x)))
    trainer.test(module, DataLoader(data, batch_size=B), verbose=False)
    return module


def test_a_sample_counts_only_if_right_in_every_draw() -> None:
    torch.manual_seed(0)
    module = _test(_Stub(p=0.5), torch.rand(2000, 1, 2, 2), [CLEAN], draws=3)
    result = module.results()[CLEAN]
    assert abs(result["dad"] - 0.5**3) < 0.03  # all three draws right
    assert abs(result["dad_mean"] - 0.5) < 0.03  # the mean over draws, reported beside it
    correct = module.states[CLEAN].gather("dad_correct")
    assert torch.equal(module.states[CLEAN].gather("dad"), correct == 3)


def test_mixed_batches_hold_each_image_once_with_filler_from_other_images() -> None:
    n = 30
    ids = torch.arange(n, dtype=torch.float32)
    pool = (ids / 100.0).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()  # image i is the constant i / 100
    stub = _Stub(p=1.0)
    spec = AttackSpec(name="pgd", eps=1e-4, step_size=1e-5, steps=1, random_start=False)
    module = _test(stub, pool, ["mixed"], mixed={"mixed": (spec, 0.2)}, filler=(pool, torch.zeros(n, dtype=torch.long)),
                   with_clean=False)
    k = 2  # round(0.2 * B)
    assert len(stub.seen) == n // k and all(len(batch) == B for batch in stub.seen)
    attacked: list[int] = []
    for g, batch in enumerate(stub.seen):
        own = (batch[:k, 0, 0, 0] * 100).round().long().tolist()
        filler = set((batch[k:, 0, 0, 0] * 100).round().long().tolist())
        evaluation_batch = set(range((g * k) // B * B, (g * k) // B * B + B))
        assert not filler & evaluation_batch and len(filler) == B - k  # other test images, all distinct
        attacked += own
    assert sorted(attacked) == list(range(n))  # every attacked image exactly once
    record = module.states["mixed"].batches[0]
    assert record["batches"].item() == B // k and record["dad"].all()
