"""The three-stage pipeline end to end on a tiny digits subset, frozen networks, resume."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch

from dad.defense import DADDefense
from dad.defense_file import load_defense
from evaluation.runner import evaluate
from pipeline.checkpoints import read_checkpoint, sub_state_dict
from pipeline.paths import RunPaths
from pipeline.networks import RunNetworks
from pipeline.stages import run_pipeline, run_stage
from tests.conftest import tiny_config


def _assert_fraction(value: float) -> None:
    assert 0.0 <= value <= 1.0


def test_whole_pipeline_and_report(tiny):
    summaries = run_pipeline(tiny)
    paths = RunPaths(tiny.run.dir)
    assert set(summaries) == {"classifier", "kernel", "denoiser", "defense"}
    for artefact in (paths.config, paths.splits, paths.defense, paths.product("classifier"), paths.product("kernel"),
                     paths.product("denoiser"), paths.aes / "mmd.pt", paths.aes / "denoiser.pt"):
        assert artefact.is_file(), artefact
    assert summaries["kernel"]["j_end"] > summaries["kernel"]["j_start"]

    defense = load_defense(paths.defense)
    assert isinstance(defense, DADDefense) and defense.detector.calibrated
    x = torch.rand(25, 1, 8, 8)
    out = defense.forward_with_info(x)
    assert out.logits.shape == (25, 10) and out.adversarial.dtype == torch.bool

    report = evaluate(tiny)
    on_disk = json.loads((paths.root / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert "**Worst case per threat model**" in (paths.root / "report.md").read_text()
    for key in ("undefended", "dad", "denoised"):
        _assert_fraction(report["clean_acc"][key])
    assert set(report["robust_acc"]) == {"pgd_linf", "adaptive"}
    for acc in report["robust_acc"].values():
        _assert_fraction(acc["undefended"])
        _assert_fraction(acc["dad"])
    det = report["detection"]
    _assert_fraction(det["fpr_clean"])
    assert det["target_fpr"] == 0.05 and set(det["tpr"]) == {"pgd_linf", "adaptive"}
    assert report["attacks"]["adaptive"]["threat"] == "defense"
    assert report["attacks"]["pgd_linf"]["threat"] == "classifier"
    for field in ("norm", "eps", "steps", "step_size", "eot_samples", "batch_size"):
        assert field in report["attacks"]["pgd_linf"]
    assert {"classifier", "kernel", "denoiser", "eval"} <= set(report["timings_s"])
    assert report["num_test"] == 100

    # a finished pipeline is idempotent: nothing is retrained
    before = paths.product("denoiser").stat().st_mtime_ns
    run_pipeline(tiny)
    assert paths.product("denoiser").stat().st_mtime_ns == before


def test_frozen_networks_stay_frozen_through_denoiser_training(tiny):
    for stage in ("classifier", "kernel"):
        run_stage(tiny, stage)
    paths = RunPaths(tiny.run.dir)
    trained = RunNetworks(tiny, paths).classifier
    run_stage(tiny, "denoiser")
    ckpt = read_checkpoint(paths.last("denoiser"), "denoiser")
    after = sub_state_dict(ckpt["state_dict"], "classifier")
    for name, value in trained.state_dict().items():  # weights and batch-norm statistics
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    kernel_before = sub_state_dict(read_checkpoint(paths.product("kernel"), "kernel")["state_dict"], "kernel")
    kernel_after = sub_state_dict(ckpt["state_dict"], "kernel")
    for name, value in kernel_before.items():
        torch.testing.assert_close(kernel_after[name], value, rtol=0, atol=0, msg=name)


class _Interrupt(pl.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def test_kernel_stage_resumes_from_last_checkpoint(tiny, tmp_path, monkeypatch):
    import pipeline.trainer as trainers

    run_stage(tiny, "classifier")
    reference = run_stage(tiny, "kernel")  # uninterrupted
    ref_state = read_checkpoint(RunPaths(tiny.run.dir).last("kernel"), "kernel")

    cfg = tiny_config(tmp_path / "b")
    run_stage(cfg, "classifier")
    real_trainer = trainers.stage_trainer
    monkeypatch.setattr(trainers, "stage_trainer",
                        lambda c, p, stage, cbs, **kw: real_trainer(c, p, stage, [*cbs, _Interrupt(3)], **kw))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(cfg, "kernel")
    assert not RunPaths(cfg.run.dir).done("kernel").exists()
    monkeypatch.setattr(trainers, "stage_trainer", real_trainer)
    resumed = run_stage(cfg, "kernel", ckpt_path="last")
    state = read_checkpoint(RunPaths(cfg.run.dir).last("kernel"), "kernel")
    assert state["global_step"] == ref_state["global_step"] == tiny.kernel.steps
    assert resumed["j_start"] == pytest.approx(reference["j_start"], rel=1e-5)
    for name in ("kernel.eps_logit", "kernel.log_sigma_phi", "kernel.log_sigma_q"):
        torch.testing.assert_close(state["state_dict"][name], ref_state["state_dict"][name], rtol=1e-5, atol=1e-6)


def test_the_evasion_aware_kernel_stage_trains_against_its_own_crafted_examples(tiny):
    """``kernel.adversarial``: the stage runs its steps with the crafting inside (radius from the training AEs),
    J of the trained kernel is finite, and the crafting's settings are saved with the checkpoint."""
    from dataclasses import replace

    cfg = replace(tiny, kernel=replace(tiny.kernel, adversarial=True, adv_steps=2))
    run_stage(cfg, "classifier")
    summary = run_stage(cfg, "kernel")
    assert torch.isfinite(torch.tensor([summary["j_start"], summary["j_end"]])).all()
    ckpt = read_checkpoint(RunPaths(cfg.run.dir).product("kernel"), "kernel")
    assert ckpt["hyper_parameters"]["settings"]["adversarial"] is True


def test_the_pipeline_stops_after_the_stage_it_is_asked_to(tmp_path):
    cfg = tiny_config(tmp_path)
    summaries = run_pipeline(cfg, until="kernel")
    paths = RunPaths(cfg.run.dir)
    assert list(summaries) == ["classifier", "kernel"] and not paths.done("denoiser").exists()
    assert list(run_pipeline(cfg, until="kernel")) == ["classifier", "kernel"]  # finished stages count too
    with pytest.raises(ValueError, match="until"):
        run_pipeline(cfg, until="kernels")
