"""Saved defenses: the current format round-trips, and files of the earlier format (4) load and behave as before.

``tests/data/defense_v4.pt`` (DAD's noise and denoiser, every routing calibrated) and ``defense_ssni_v4.pt`` (an
SSNI purifier) were written by the code before the purifier and routing interfaces, with the outputs it gave on
fixed images under every routing (``outputs_v4.pt``): ``python tests/data/make_v4.py.txt OUT`` at commit cb734c1
wrote them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dad.defense import VERSION
from dad.defense_file import load_defense
from dad.diffusion import SSNIPurifier
from dad.io import IncompatibleFileError
from dad.purification import DenoiserPurifier
from dad.routing import ROUTINGS

DATA = Path(__file__).resolve().parents[1] / "data"
RECORDED = torch.load(DATA / "outputs_v4.pt", weights_only=True)


def _outputs(defense, routing: str) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    defense.routing = routing
    torch.manual_seed(7)
    with torch.no_grad():
        out = defense.forward_with_info(RECORDED["x"])
    return {"logits": out.logits, "flags": out.flags, "score": out.score}


@pytest.mark.parametrize("name, kind", [("defense_v4", DenoiserPurifier), ("defense_ssni_v4", SSNIPurifier)])
def test_format_4_files_load_and_give_the_outputs_they_gave(name: str, kind: type, tmp_path: Path) -> None:
    defense = load_defense(DATA / f"{name}.pt")
    assert isinstance(defense.purifier, kind) and defense.target_fpr == 0.05
    assert defense.route_selection is None  # no recorded choice of route: the file's purifier, as before
    resaved = tmp_path / "again.pt"
    defense.save(resaved)
    assert torch.load(resaved, weights_only=True)["version"] == VERSION
    recorded = [key.split("/")[1] for key in RECORDED["expected"] if key.startswith(f"{name}/")]
    assert recorded == list(ROUTINGS[:5])  # every mode of the time (a mode added since loads uncalibrated)
    for model in (defense, load_defense(resaved)):
        for routing in recorded:
            for key, value in _outputs(model, routing).items():
                torch.testing.assert_close(value, RECORDED["expected"][f"{name}/{routing}"][key], rtol=0, atol=0,
                                           msg=f"{name} {routing} {key}")


def test_a_file_of_an_unknown_version_is_one_line_naming_it(tmp_path: Path) -> None:
    payload = torch.load(DATA / "defense_v4.pt", weights_only=True)
    torch.save({**payload, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(IncompatibleFileError, match="format version 99") as info:
        load_defense(tmp_path / "future.pt")
    assert "\n" not in str(info.value)


def test_a_trained_phi_with_batch_norm_scores_the_same_after_loading(tmp_path: Path) -> None:
    """With ``train_features`` phi's batch norm follows the module's mode: the detectors' stored sets must be passed
    through it in eval mode when a saved defense is loaded (in train mode their features came from batch
    statistics: every clean image of a digits run was then purified under per-sample routing)."""
    from dad.denoisers import UNetDenoiser
    from dad.detector import MMDDetector
    from dad.kernels import SemanticKernel
    from dad.models import create_model
    from dad.sample_detector import SampleDetector
    from dad.defense import DADDefense

    torch.manual_seed(0)
    classifier = create_model("small_cnn", num_classes=10, in_channels=1).eval()
    phi = create_model("small_cnn", num_classes=10, in_channels=1)
    for module in phi.modules():  # running statistics far from any batch's, as after training on other data
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.fill_(0.5)
            module.running_var.fill_(4.0)
    kernel = SemanticKernel(phi, train_features=True, sigma_phi=10.0, sigma_q=128.0).eval()
    images = torch.rand(40, 1, 8, 8)
    defense = DADDefense(classifier, MMDDetector(kernel, images[:20]),
                         DenoiserPurifier(UNetDenoiser(1, (4, 8), (1, 1), (4,), (1,)).eval(), 0.1),
                         sample_detector=SampleDetector(kernel, images[20:30], images[30:]), routing="sample").eval()
    defense.sample_detector.threshold.fill_(0.0)
    defense.save(tmp_path / "d.pt")
    loaded = load_defense(tmp_path / "d.pt")
    probe = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.sample_detector.scores(probe), defense.sample_detector.scores(probe))
        torch.testing.assert_close(loaded.detector.score(probe), defense.detector.score(probe))
