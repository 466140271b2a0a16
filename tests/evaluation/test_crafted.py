"""The store of AEs that do not depend on the defense: what it gives back, and when it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dad.attacks import AttackSpec
from evaluation.crafted import CraftedStore, module_digest
from lightning_modules.evaluator import DefenseEvaluator
from tests.lightning_modules.test_evaluator import _Stub


def test_saved_aes_come_back_only_for_the_same_key_samples_and_shape(tmp_path: Path) -> None:
    x_adv, index = torch.rand(4, 1, 2, 2), torch.arange(8, 12)
    CraftedStore(tmp_path, "k1").save(2, index, x_adv)
    assert torch.equal(CraftedStore(tmp_path, "k1").load(2, index, x_adv), x_adv)
    assert CraftedStore(tmp_path, "k1").load(3, index, x_adv) is None  # another batch
    assert CraftedStore(tmp_path, "k1").load(2, index + 1, x_adv) is None  # other samples
    assert CraftedStore(tmp_path, "k1").load(2, index, torch.rand(4, 1, 3, 3)) is None  # other images
    assert CraftedStore(tmp_path, "k2").load(2, index, x_adv) is None  # another attack or classifier
    assert CraftedStore(tmp_path, "k1", read=False).load(2, index, x_adv) is None  # not resuming: crafted again
    (tmp_path / "k1" / "2.pt").write_bytes(b"damaged")
    assert CraftedStore(tmp_path, "k1").load(2, index, x_adv) is None


def test_the_digest_follows_every_weight() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    copy = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    copy.load_state_dict(net.state_dict())
    assert module_digest(net) == module_digest(copy)
    with torch.no_grad():
        copy[0].weight[0, 0, 0, 0] += 1e-6
    assert module_digest(net) != module_digest(copy)
    copy.load_state_dict(net.state_dict())
    copy[1].running_mean += 1.0  # buffers count
    assert module_digest(net) != module_digest(copy)


def test_only_attacks_that_do_not_see_the_defense_can_share_their_aes(tmp_path: Path) -> None:
    spec = AttackSpec(name="pgd", eps=0.1, step_size=0.05, steps=1)
    through = AttackSpec(name="pgd", eps=0.1, step_size=0.05, steps=1, threat="defense")
    store = CraftedStore(tmp_path, "k")
    DefenseEvaluator(_Stub(0.5), {"a": spec}, crafted={"a": store})  # type: ignore[arg-type]
    transfer = DefenseEvaluator(_Stub(0.5), {"t": through}, sources={"t": nn.Identity()},  # type: ignore[arg-type]
                                crafted={"t": store})
    assert transfer.crafted == {"t": store}
    with pytest.raises(ValueError, match="do not see the defense"):
        DefenseEvaluator(_Stub(0.5), {"d": through}, crafted={"d": store})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="do not see the defense"):
        DefenseEvaluator(_Stub(0.5), {"a": spec}, crafted={"b": store})  # type: ignore[arg-type]
