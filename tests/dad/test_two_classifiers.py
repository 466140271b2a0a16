"""A defense with two classifiers: the clean route keeps its classifier, what the routing flags is purified and
classified by the second one; the pair saves and loads, and the attacks' objectives reach each route's own
classifier."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dad.attacks.objectives import defense_objective
from dad.defense import DADDefense
from dad.defense_file import load_defense
from dad.models import create_model
from dad.purification import IdentityPurifier
from tests.conftest import tiny_defense


def _two_classifier_defense() -> DADDefense:
    base = tiny_defense([10])
    torch.manual_seed(1)
    flagged = create_model("small_cnn", num_classes=10, in_channels=1).eval()
    return DADDefense(base.classifier, base.detector, base.purifier, sample_detector=base.sample_detector,
                      routing="sample", target_fpr=base.target_fpr, flagged_classifier=flagged).eval()


def _split_threshold(defense: DADDefense, x: torch.Tensor) -> None:
    """Put the per-sample threshold at the median score of ``x``: half its images flagged, half not."""
    assert defense.sample_detector is not None
    defense.sample_detector.threshold.fill_(defense.sample_detector.scores(x).median())


def test_clean_images_reach_the_clean_classifier_and_flagged_ones_the_second_behind_the_purifier() -> None:
    defense = _two_classifier_defense().with_purifier(IdentityPurifier())  # deterministic: the logits are exact
    assert defense.flagged_classifier is not None
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    _split_threshold(defense, x)
    with torch.no_grad():
        out = defense.forward_with_info(x)
        clean, flagged = defense.classifier(x), defense.flagged_classifier(x)
    assert 0 < int(out.flags.sum()) < len(x)
    assert not torch.allclose(clean, flagged)  # the two classifiers differ, so the test can tell them apart
    torch.testing.assert_close(out.logits[~out.flags], clean[~out.flags])
    torch.testing.assert_close(out.logits[out.flags], flagged[out.flags])
    defense.routing = "never"  # the clean classifier alone
    torch.testing.assert_close(defense(x), clean)
    defense.routing = "always"
    torch.testing.assert_close(defense(x), flagged)


def test_the_pair_saves_and_loads_with_its_outputs(tmp_path: Path) -> None:
    defense = _two_classifier_defense()
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    _split_threshold(defense, x)
    defense.save(tmp_path / "d.pt")
    loaded = load_defense(tmp_path / "d.pt")
    assert loaded.specs == defense.specs and loaded.specs["flagged_classifier"]["name"] == "small_cnn"
    for a, b in zip(defense.flagged_classifier.state_dict().values(), loaded.flagged_classifier.state_dict().values()):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = defense.forward_with_info(x)
        torch.manual_seed(0)
        found = loaded.forward_with_info(x)
    assert torch.equal(found.flags, expected.flags) and bool(found.flags.any())
    torch.testing.assert_close(found.logits, expected.logits)


def test_a_defense_with_one_classifier_saves_none_and_a_format_5_file_loads(tmp_path: Path) -> None:
    defense = tiny_defense([10])
    defense.save(tmp_path / "one.pt")
    payload = torch.load(tmp_path / "one.pt", weights_only=True)
    assert payload["version"] == 6 and payload["networks"]["flagged_classifier"] is None
    del payload["networks"]["flagged_classifier"]  # what format 5 wrote
    torch.save({**payload, "version": 5}, tmp_path / "v5.pt")
    loaded = load_defense(tmp_path / "v5.pt")
    assert loaded.flagged_classifier is None and loaded.route_classifier is loaded.classifier


def test_the_attack_objectives_reach_each_routes_own_classifier() -> None:
    """``evade_clean`` scores the clean classifier, ``evade_denoised`` the purified route's (the second one): with
    no penalty (lambda 0) and no purification, each objective is that classifier's cross-entropy."""
    defense = _two_classifier_defense().with_purifier(IdentityPurifier())
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.arange(10) % 10
    with torch.no_grad():
        into_clean = defense_objective(defense, y, "evade_clean", 0.0)(x)
        into_flagged = defense_objective(defense, y, "evade_denoised", 0.0)(x)
        ce_clean = F.cross_entropy(defense.classifier(x), y, reduction="none")
        ce_flagged = F.cross_entropy(defense.flagged_classifier(x), y, reduction="none")
    torch.testing.assert_close(into_clean, ce_clean)
    torch.testing.assert_close(into_flagged, ce_flagged)
    assert not torch.allclose(ce_clean, ce_flagged)
