"""bench/routing.py: the judging rule, the mixed batches it builds, and its command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from dad.defense import DefenseOutput
from pipeline.config import PipelineConfig
from pipeline.stages import run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bench.routing as routing  # noqa: E402
from bench.routing import judge, mixed_batches, purified_share  # noqa: E402


class _Recorder(nn.Module):
    """A defense whose logits say the label stored in the image's first pixel, flagging images above 0.5."""

    def __init__(self, wrong_in_draw: int | None = None) -> None:
        super().__init__()
        self.batches: list[Tensor] = []
        self.wrong_in_draw = wrong_in_draw

    def forward_draws(self, x: Tensor, draws: int) -> DefenseOutput:
        self.batches.append(x.clone())
        labels = x[:, 0, 0, 0].round().long()
        logits = torch.nn.functional.one_hot(labels, 1000).float().expand(draws, -1, -1).clone()
        if self.wrong_in_draw is not None:  # every image wrong in one draw
            logits[self.wrong_in_draw] = torch.nn.functional.one_hot((labels + 1) % 1000, 1000).float()
        flags = x[:, 0, 0, 1] > 0.5
        return DefenseOutput(logits=logits, score=torch.tensor(0.0), adversarial=flags.any(), flags=flags)


def _images(labels: Tensor, flagged: bool) -> Tensor:
    x = torch.zeros(len(labels), 1, 2, 2)
    x[:, 0, 0, 0] = labels.float()
    x[:, 0, 0, 1] = float(flagged)
    return x


def test_a_sample_counts_only_if_right_in_every_draw() -> None:
    y = torch.arange(6)
    right, _ = judge(_Recorder(), _images(y, False), y, draws=3)
    assert right.all()
    right, _ = judge(_Recorder(wrong_in_draw=2), _images(y, False), y, draws=3)
    assert not right.any()


def test_mixed_batches_hold_each_ae_once_beside_filler_of_other_images() -> None:
    n, b = 20, 10
    y = torch.arange(n)
    aes, pool = _images(y, True), _images(y, False)
    defense = _Recorder()
    right, flags = mixed_batches(defense, aes, y, (pool, y), b, 0.2, draws=2, seed=0)
    assert right.all() and flags.all() and len(right) == n
    seen = []
    for batch in defense.batches:
        assert len(batch) == b
        is_ae = batch[:, 0, 0, 1] > 0.5
        assert int(is_ae.sum()) == 2 and bool(is_ae[:2].all())  # the AE part comes first
        ae_labels = batch[is_ae, 0, 0, 0]
        filler_labels = batch[~is_ae, 0, 0, 0]
        assert not set(ae_labels.tolist()) & set(filler_labels.tolist())  # never an AE's own clean image
        seen += ae_labels.long().tolist()
    assert sorted(seen) == list(range(n))


def test_purified_share_is_the_flagged_fraction_of_random_batches() -> None:
    pool = torch.cat([_images(torch.arange(50), True), _images(torch.arange(150), False)])
    share = purified_share(_Recorder(), pool, b=20, batches=400, seed=0)
    assert abs(share - 0.25) < 0.02


def test_the_bench_takes_trainer_flags_as_overrides_of_the_saved_config(tiny: PipelineConfig,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run_pipeline(tiny)
    monkeypatch.setattr(routing, "RESULTS", tiny.run.dir.parent)
    routing.main(["--run", str(tiny.run.dir), "--trainer.accelerator", "cpu", "--eval.draws", "2", "--max-test", "20",
                  "--routings", "never,batch", "--random-batches", "5"])
    result = json.loads((tiny.run.dir.parent / f"routing_{tiny.run.name}.json").read_text())
    assert result["machine"]["device"] == "cpu" and result["settings"]["draws"] == 2  # the overrides were applied
    assert list(result["routings"]) == ["never", "batch"] and result["routings"]["batch"]["clean"]["n"] == 20


@pytest.mark.parametrize("extra", [["--max_test", "10"], ["stray"]])
def test_the_bench_rejects_what_is_no_configuration_override(extra: list[str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        routing.main(["--run", "runs/none", *extra])
    error = capsys.readouterr().err
    assert f"unrecognized arguments: {extra[0]} " in error and "--<section>.<option> VALUE" in error
