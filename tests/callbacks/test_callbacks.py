"""Callbacks on toy modules: calibration state travels with a checkpoint; attack states are flushed as promised."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks import AttackStateWriter, ThresholdCalibration


class _Store:
    """A record store that remembers where it was written."""

    def __init__(self) -> None:
        self.writes: list[tuple[Path, Any]] = []

    def to_disk(self, path: Path, rank: int | None = None) -> None:
        self.writes.append((path, rank))


class _Toy(pl.LightningModule):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)
        self.states = {"a": _Store(), "b": _Store()}
        self.dirty: set[str] = set()
        self.fail_at = fail_at

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.dirty.add("a" if batch_idx % 2 == 0 else "b")
        if batch_idx == self.fail_at:
            raise RuntimeError("interrupted")


def _test(module: _Toy, writer: AttackStateWriter) -> None:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[writer])
    trainer.test(module, DataLoader(TensorDataset(torch.zeros(4, 2)), batch_size=1), verbose=False)


def test_attack_state_writer_flushes_dirty_states_at_the_end_and_on_interruption(tmp_path: Path) -> None:
    paths = {"a": tmp_path / "a.pt", "b": tmp_path / "b.pt"}
    module = _Toy()
    _test(module, AttackStateWriter(paths, interval_s=3600.0))  # no periodic write: only the final one
    assert module.states["a"].writes == [(paths["a"], None)] and module.states["b"].writes == [(paths["b"], None)]
    assert not module.dirty

    interrupted = _Toy(fail_at=2)
    try:
        _test(interrupted, AttackStateWriter(paths, interval_s=3600.0))
    except RuntimeError:
        pass
    assert interrupted.states["a"].writes == [(paths["a"], None)]  # batches 0 and 2 were finished or started
    assert interrupted.states["b"].writes == [(paths["b"], None)]


def test_threshold_calibration_state_round_trips() -> None:
    calibration = ThresholdCalibration(torch.rand(30, 1, 2, 2), [5, 10], target_fpr=0.1, num_batches=20)
    calibration.results = {5: {"threshold": 0.5}}
    again = ThresholdCalibration(torch.rand(30, 1, 2, 2), [5], target_fpr=0.2)
    again.load_state_dict(calibration.state_dict())
    assert again.results == {5: {"threshold": 0.5}} and again.target_fpr == 0.1


def _fake_trainer(world_size: int = 1, rank: int = 0):  # type: ignore[no-untyped-def]
    from types import SimpleNamespace

    progress = SimpleNamespace(current=SimpleNamespace(ready=3))
    return SimpleNamespace(world_size=world_size, global_rank=rank, current_epoch=1, train_dataloader=None,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def test_resume_state_restores_each_ranks_random_state_and_reads_the_old_format() -> None:
    from types import SimpleNamespace

    from callbacks import ResumeState

    module = SimpleNamespace(device=torch.device("cpu"))
    torch.manual_seed(5)
    checkpoint: dict = {}
    ResumeState().on_save_checkpoint(_fake_trainer(), module, checkpoint)  # type: ignore[arg-type]
    state = checkpoint["dad_resume"]
    assert len(state["rng"]) == 1 and set(state["rng"][0]) == {"cpu"} and state["batches_done"] == 3
    expected = torch.rand(3)
    for saved in (state, {**state, "rng": None, "torch_rng": state["rng"][0]["cpu"]}):  # before per-rank states
        torch.manual_seed(123)
        resume = ResumeState()
        resume.on_load_checkpoint(_fake_trainer(), module, {"dad_resume": saved})  # type: ignore[arg-type]
        resume.on_train_start(_fake_trainer(), module)  # type: ignore[arg-type]
        assert torch.equal(torch.rand(3), expected)
    rank_one = torch.manual_seed(9).get_state()
    rank_one_draws = torch.rand(3)
    two_ranks = {**state, "rng": [state["rng"][0], {"cpu": rank_one}]}
    resume = ResumeState()
    resume.on_load_checkpoint(_fake_trainer(2, 1), module, {"dad_resume": two_ranks})  # type: ignore[arg-type]
    resume.on_train_start(_fake_trainer(2, 1), module)  # type: ignore[arg-type]
    assert torch.equal(torch.rand(3), rank_one_draws)  # rank 1 restored rank 1's state
