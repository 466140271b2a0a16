"""Diffusion purification in the pipeline: the score and purifier stages, the defense files, their evaluation."""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from dad.attacks import AttackSpec, run_attack, run_seeded
from dad.defense import VERSION
from dad.defense_file import load_defense
from dad.io import IncompatibleFileError
from dad.diffusion import DiffusionPurifier, SSNIPurifier
from dad.diffusion.selection import PurifierSettings
from dad.route_selection import RouteSelectionSettings
from evaluation.runner import evaluate
from lightning_modules.score import ScoreSettings
from pipeline.checkpoints import read_checkpoint
from evaluation.cli import main_eval
from pipeline.cli import main_train
from pipeline.config import ConfigError, PipelineConfig, dump_config
from pipeline.paths import RunPaths
from pipeline.stages import load_datamodule, run_pipeline, run_stage
from tests.conftest import TINY_ATTACK, tiny_config
from tests.pipeline.test_cli_errors import _Marker

SCORE = ScoreSettings(epochs=4, batch_size=64, lr=3e-3, t_max=60, net={"widths": [8, 16], "blocks_per_level": 1})
PURIFIER = PurifierSettings(kinds=["fixed", "ssni_n", "ssni_l"], t_star_grid=[10, 30], bias_grid=[0.0, 10.0],
                            ddim_steps=3, max_clean_drop=0.2)


def _config(root: Path, name: str = "tiny") -> PipelineConfig:
    return replace(tiny_config(root, name), score=SCORE, purifier=PURIFIER)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> PipelineConfig:
    cfg = _config(tmp_path_factory.mktemp("purification"))
    run_pipeline(cfg)
    return cfg


def _copy(cfg: PipelineConfig, root: Path) -> PipelineConfig:
    shutil.copytree(cfg.run.dir, root / cfg.run.name)
    return replace(cfg, run=replace(cfg.run, root=str(root)))


def _test_batch(cfg: PipelineConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_datamodule(cfg, RunPaths(cfg.run.dir)).split_tensors("test")
    return x[:n], y[:n]


def test_the_pipeline_trains_the_score_model_and_writes_one_defense_per_purifier(trained: PipelineConfig) -> None:
    paths = RunPaths(trained.run.dir)
    score = json.loads(paths.done("score").read_text())
    dm = load_datamodule(trained, paths)
    assert score["train_images"] == len(dm.dataset("train"))  # the training split only: no val, calibration, test
    assert read_checkpoint(paths.product("score"), "score")["dad_networks"]["schedule"]["num_steps"] == 1000
    summary = json.loads(paths.done("purifier").read_text())
    candidates = {int(t): r for t, r in summary["fixed"]["candidates"].items()}
    budget = summary["fixed"]["classifier_clean_acc"] - PURIFIER.max_clean_drop
    assert summary["t_star"] == max(t for t, r in candidates.items() if r["clean_acc"] >= budget)
    assert summary["calibration_split"] == "val" and summary["selection_images"] == len(dm.splits.val)
    for kind, mapping in (("ssni_n", "sigmoid"), ("ssni_l", "linear")):
        assert summary[kind]["bias"] in PURIFIER.bias_grid and summary[kind]["tau"] > 0
        defense = load_defense(paths.purified_defense(kind))
        assert defense.routing == "always" and isinstance(defense.purifier, SSNIPurifier)
        assert defense.purifier.mapping == mapping and defense.purifier.purifier.t_star == summary["t_star"]
        assert defense.purifier.mu.item() == pytest.approx(summary[kind]["mu"])
    fixed = load_defense(paths.purified_defense("fixed"))
    assert type(fixed.purifier) is DiffusionPurifier
    x, _ = _test_batch(trained, 4)
    assert fixed(x).shape == (4, 10)
    before = paths.purified_defense("fixed").stat().st_mtime_ns  # a finished pipeline rebuilds nothing
    run_pipeline(trained)
    assert paths.purified_defense("fixed").stat().st_mtime_ns == before


def test_clean_images_get_smaller_timesteps_than_their_adversarial_examples(trained: PipelineConfig) -> None:
    defense = load_defense(RunPaths(trained.run.dir).purified_defense("ssni_n"))
    ssni = defense.purifier
    x, y = _test_batch(trained, 50)
    adversarial = run_attack(AttackSpec(**{**TINY_ATTACK, "steps": 10}), defense.classifier, x, y)
    with torch.no_grad():
        t_clean, t_adversarial = ssni.timesteps(x), ssni.timesteps(adversarial)
    assert float((t_clean < t_adversarial).float().mean()) >= 0.9
    assert t_clean.mean() < t_adversarial.mean()
    for t in (t_clean, t_adversarial):
        assert bool((t >= 0).all()) and bool((t <= ssni.t_max).all())


def test_the_adaptive_eps_attack_lowers_the_eps_norm(trained: PipelineConfig) -> None:
    defense = load_defense(RunPaths(trained.run.dir).purified_defense("ssni_n"))
    x, y = _test_batch(trained, 25)
    base = {**TINY_ATTACK, "threat": "defense", "steps": 5}
    plain = run_seeded(AttackSpec(**base, mmd_weight=0.0), defense, x, y, chunk=0)
    evading = run_seeded(AttackSpec(**base, objective="evade_eps", lambdas=[10.0]), defense, x, y, chunk=0)
    with torch.no_grad():
        norms = {name: defense.purifier.standardized_norms(z).mean().item()
                 for name, z in (("clean", x), ("plain", plain), ("evading", evading))}
    assert norms["evading"] < norms["plain"] - 1.0  # in clean standard deviations
    assert (evading - x).abs().max() <= 0.2 + 1e-6


class _Interrupt(pl.Callback):
    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == 10:
            raise RuntimeError("simulated crash")


def test_the_score_stage_resumes_from_its_last_checkpoint(trained: PipelineConfig, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.trainer as trainers

    cfg = _copy(trained, tmp_path)
    paths = RunPaths(cfg.run.dir)
    shutil.rmtree(paths.stage_dir("score"))
    cfg = replace(cfg, run=replace(cfg.run, checkpoint_every_n_steps=4))
    real = trainers.stage_trainer
    monkeypatch.setattr(trainers, "stage_trainer",
                        lambda c, p, stage, cbs, **kw: real(c, p, stage, [*cbs, _Interrupt()], **kw))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(cfg, "score")
    assert 0 < read_checkpoint(paths.last("score"), "score")["global_step"] < 10
    monkeypatch.setattr(trainers, "stage_trainer", real)
    run_stage(cfg, "score", ckpt_path="last")
    resumed = read_checkpoint(paths.last("score"), "score")
    reference = read_checkpoint(RunPaths(trained.run.dir).last("score"), "score")
    assert resumed["global_step"] == reference["global_step"]
    for name, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_purifier_defense_files_are_evaluated_in_the_same_harness(trained: PipelineConfig, tmp_path: Path) -> None:
    cfg = _copy(trained, tmp_path)
    attacks = {"pgd_linf": AttackSpec(**TINY_ATTACK),
               "evade_eps": AttackSpec(**{**TINY_ATTACK, "steps": 2}, threat="defense", objective="evade_eps",
                                       eot_samples=2, lambdas=[1.0])}
    cfg = replace(cfg, eval=replace(cfg.eval, attacks=attacks, defense="defense_ssni_n.pt", mixed_attacks=[],
                                    max_test=50, sanity_samples=25, random_batches=50, plots=False))
    report = evaluate(cfg)
    run = Path(cfg.run.dir)
    assert (run / "report_ssni_n.json").is_file() and (run / "eval_state_ssni_n" / "evade_eps.pt").is_file()
    assert report["purifier"]["kind"] == "ssni" and report["defense_file"] == "defense_ssni_n.pt"
    assert report["routing"] == "always" and report["variant"] == "ssni_n"
    assert "more_draws" in report["sanity"] and report["sanity"]["randomness_eot"]["passed"]
    samples = torch.load(run / "report_ssni_n_samples.pt", weights_only=True)
    assert samples["clean_acc/samples"].dtype == torch.bool and samples["clean_acc/samples"].numel() == 50

    dad = evaluate(replace(cfg, eval=replace(cfg.eval, defense="defense_fixed.pt", routing="batch",
                                             attacks={"pgd_linf": attacks["pgd_linf"]})))
    assert dad["routing"] == "batch" and dad["variant"] == "fixed_batch" and (run / "report_fixed_batch.json").is_file()


def test_defense_files_with_a_purifier_reload_exactly_and_older_files_still_load(trained: PipelineConfig,
                                                                                 tmp_path: Path) -> None:
    paths = RunPaths(trained.run.dir)
    defense = load_defense(paths.purified_defense("ssni_l"))
    defense.save(tmp_path / "again.pt")
    again = load_defense(tmp_path / "again.pt")
    x, _ = _test_batch(trained, 8)
    outputs = []
    for model in (defense, again):
        torch.manual_seed(3)
        with torch.no_grad():
            outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)

    payload = torch.load(paths.defense, weights_only=True)
    assert payload["version"] == VERSION and payload["purifier"]["kind"] == "denoiser"

    purified = torch.load(paths.purified_defense("ssni_l"), weights_only=True)
    torch.save({**purified, "purifier": {**purified["purifier"], "kind": "other"}}, tmp_path / "kind.pt")
    with pytest.raises(IncompatibleFileError, match="does not describe a defense: unknown purifier kind"):
        load_defense(tmp_path / "kind.pt")
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({**purified, "purifier": _Marker(str(marker))}))
    with pytest.raises(IncompatibleFileError, match="not a loadable DAD defense"):
        load_defense(tmp_path / "evil.pt")
    assert not marker.exists()


def test_bad_purification_settings_are_one_line_errors(trained: PipelineConfig, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="`score.t_max`=60: raise it"):
        replace(trained, purifier=replace(PURIFIER, t_star_grid=[50, 100]))
    with pytest.raises(ValueError, match="purifier.kinds"):
        PurifierSettings(kinds=["ssni"])  # type: ignore[list-item]
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(replace(trained, purifier=replace(PURIFIER, kinds=[]))))
    assert main_train(["purifier", "--config", str(config)]) == 2
    assert "`purifier.kinds` is empty" in capsys.readouterr().err
    assert main_eval(["--run", str(trained.run.dir), "--eval.defense", "defense_missing.pt"]) == 2
    assert "No saved defense" in capsys.readouterr().err
    assert main_eval(["--run", str(trained.run.dir), "--eval.defense", "../defense.pt"]) == 2
    assert "`eval.defense`" in capsys.readouterr().err


def test_a_diffusion_purifier_is_a_route_the_purifier_stage_chooses(tmp_path: Path) -> None:
    """``defense.select.routes`` naming a diffusion purifier: the defense stage leaves the choice, the purifier stage
    measures every named route on the held-out split and rewrites ``defense.pt`` with the kept one."""
    cfg = _config(tmp_path)
    select = RouteSelectionSettings(routes=["denoiser", "fixed"], attacks=["adaptive"])
    evaluation = replace(cfg.eval, attacks={"adaptive": cfg.eval.attacks["adaptive"],
                                            "pgd_linf": cfg.eval.attacks["pgd_linf"]})
    with pytest.raises(ConfigError, match="add them to `purifier.kinds`"):
        replace(cfg, data=replace(cfg.data, selection_size=50), defense=replace(cfg.defense, select=select),
                purifier=replace(PURIFIER, kinds=["ssni_n"]), eval=evaluation)
    cfg = replace(cfg, data=replace(cfg.data, selection_size=50), defense=replace(cfg.defense, select=select),
                  purifier=replace(PURIFIER, kinds=["fixed"]), eval=evaluation)
    summaries = run_pipeline(cfg)
    assert summaries["defense"]["route_selection"] is None  # left to the purifier stage
    record = summaries["purifier"]["route_selection"]
    assert set(record["routes"]) == {"denoiser", "fixed"} and all(r["n"] == 50 for r in record["routes"].values())
    assert record["routes"][record["chosen"]]["tied"]
    defense = load_defense(RunPaths(cfg.run.dir).defense)
    kinds = {"denoiser": "denoiser", "fixed": "fixed"}
    assert defense.purifier.spec()["kind"] == kinds[record["chosen"]] and defense.route_selection == record
