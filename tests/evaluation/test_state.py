"""The resumable per-attack evaluation state: order, keys, damaged files, rank shares."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from evaluation.state import AttackState, share_path, state_key


def _record(index: list[int], correct: list[bool]) -> dict[str, Tensor]:
    n = len(index)
    return {"index": torch.tensor(index), "x_adv": torch.rand(n, 1, 2, 2), "undefended": torch.tensor(correct),
            "dad": torch.tensor(correct), "dad_correct": 3 * torch.tensor(correct).long(),
            "denoised": torch.tensor(correct), "score": torch.tensor(0.5), "flagged": torch.tensor(1.0),
            "batches": torch.tensor(1.0), "filler_acc": torch.tensor(float("nan")), "seconds": torch.tensor(1.0),
            "passes": torch.tensor(10.0), "programs": torch.tensor(4.0), "stops": torch.tensor(0.0)}


def test_attack_state_round_trip_order_and_key(tmp_path) -> None:
    key = state_key(attack={"eps": 0.1}, defense="abc")
    assert key == state_key(defense="abc", attack={"eps": 0.1}) != state_key(attack={"eps": 0.2}, defense="abc")
    state = AttackState(key)
    state.add(1, _record([3, 2], [True, False]))
    state.add(0, _record([1, 0], [False, True]))
    assert state.gather("dad").tolist() == [True, False, False, True]  # samples 0, 1, 2, 3
    path = tmp_path / "a.pt"
    state.to_disk(path)
    again = AttackState.from_disk(path, key)
    assert sorted(again.batches) == [0, 1] and torch.equal(again.gather("x_adv"), state.gather("x_adv"))
    assert again.per_batch("seconds").tolist() == [1.0, 1.0]
    assert AttackState.from_disk(path, "other").batches == {}  # another configuration: recomputed
    path.write_bytes(b"not a state")
    assert AttackState.from_disk(path, key).batches == {}
    with pytest.raises(ValueError, match="lacks"):
        state.add(2, {"index": torch.tensor([4])})


def test_rank_shares_are_merged_on_resume_and_removed_by_a_whole_write(tmp_path) -> None:
    key = state_key(attack={"eps": 0.1})
    path = tmp_path / "a.pt"
    for rank, (batch, index) in enumerate([(0, [0, 1]), (1, [2, 3])]):
        share = AttackState(key)
        share.add(batch, _record(index, [True, False]))
        share.to_disk(path, rank=rank)
    assert share_path(path, 1).is_file() and not path.exists()
    resumed = AttackState.resume(path, key)
    assert sorted(resumed.batches) == [0, 1] and resumed.gather("dad").tolist() == [True, False, True, False]
    resumed.to_disk(path)
    assert path.is_file() and not list(tmp_path.glob("a.rank*.pt"))
