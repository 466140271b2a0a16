"""load_config with train.py-style overrides (as bench/robust.py passes them): applied, bad ones refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

PRESET = str(Path(__file__).resolve().parents[2] / "configs" / "digits_robust.yaml")


def test_overrides_apply_on_top_of_the_preset() -> None:
    cfg = load_config(PRESET, ["--run.name", "digits_robust_route", "--denoiser.adv_steps", "5",
                               "--denoiser.adv_eps", "0.2", "--data.root", "/nowhere"])
    assert (cfg.run.name, cfg.denoiser.adv_steps, cfg.denoiser.adv_eps, cfg.data.root) == (
        "digits_robust_route", 5, 0.2, "/nowhere")
    assert cfg.classifier.training == "pgd_at" and cfg.denoiser.epochs == 20  # the rest is the preset's


@pytest.mark.parametrize(("overrides", "error", "message"), [
    (["--denoiser.adv_stepz", "5"], ConfigError, "unrecognized arguments: --denoiser.adv_stepz 5"),
    (["--denoiser.adv_steps", "-1"], ConfigError, "Expected `denoiser.adv_steps` to be an integer >= 0, got -1"),
])
def test_bad_overrides_are_refused(overrides: list[str], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        load_config(PRESET, overrides)
