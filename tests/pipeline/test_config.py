"""Every shipped configuration parses and builds its data module and networks; outside weights are kept;
the saved configuration reloads exactly; the whole Trainer is on the command line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dad.denoisers import UNetDenoiser
from dad.models import create_model
from datamodules.registry import build_datamodule
from lightning_modules.classifier import ClassifierSettings
from pipeline.config import PipelineConfig, dump_config, load_config
from pipeline.paths import RunPaths
from pipeline.networks import RunNetworks
from pipeline.stages import run_stage
from tests.conftest import tiny_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(p.name for p in CONFIGS.glob("*.yaml"))
PAPER_CIFAR = ["cifar10_wrn28.yaml", "cifar10_wrn70.yaml"]


def _class_folders(root: Path, classes: int = 10, size: tuple[int, int] = (32, 32)) -> Path:
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        Image.fromarray(np.full((*size, 3), 10 * c, dtype=np.uint8)).save(root / f"class{c}" / "0.png")
    return root


def test_the_expected_configs_are_shipped():
    assert {"digits.yaml", "cifar10_wrn28.yaml", "cifar10_wrn70.yaml", "imagenet_rn50.yaml",
            "cifar10_cpu.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_config_parses_and_builds_its_data_module(name, tmp_path):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.attack.threat == "classifier" and cfg.eval.attacks
    data = cfg.data
    if data.dataset == "imagefolder":
        assert data.root is None, "the data folder is given on the command line, never in a shipped config"
        data = replace(data, root=str(_class_folders(tmp_path / "data",
                                                     size=(40, 50) if name == "imagenet_rn50.yaml" else (32, 32))))
    dm = build_datamodule(data, cfg.run.seed)
    expected_shape = (1, 8, 8) if name.startswith("digits") else {"imagenet_rn50.yaml": (3, 224, 224)}.get(
        name, (3, 32, 32))
    assert dm.image_shape == expected_shape
    assert dm.num_classes == 10


def _pipeline_classifier(cfg: PipelineConfig, num_classes: int, in_channels: int) -> torch.nn.Module:
    """The classifier as the pipeline's classifier stage builds it (weights are not loaded here)."""
    c = cfg.classifier
    return create_model(c.model, **{"num_classes": num_classes, "in_channels": in_channels, **c.model_kwargs})


@pytest.mark.parametrize("name", SHIPPED)
def test_config_builds_its_networks(name):
    cfg = load_config(CONFIGS / name)
    channels, size = (1, 8) if cfg.data.dataset == "digits" else (3, 32)
    num_classes = 1000 if name == "imagenet_rn50.yaml" else 10
    x = torch.rand(2, channels, size, size)
    classifier = _pipeline_classifier(cfg, num_classes, channels).eval()
    phi = classifier
    if cfg.kernel.feature_extractor:
        phi = create_model(cfg.kernel.feature_extractor, **cfg.kernel.feature_extractor_kwargs).eval()
    denoiser = UNetDenoiser(**{"in_channels": channels, **cfg.denoiser.net})
    with torch.no_grad():
        if name != "cifar10_wrn70.yaml":  # a WRN-70-16 forward pass costs seconds on a CPU: built, not run
            assert classifier(x).shape == (2, num_classes)
        assert phi.forward_features(x).shape == (2, phi.num_features)
        assert denoiser(x).shape == x.shape


@pytest.mark.parametrize("name", PAPER_CIFAR)
def test_paper_cifar_configs_hold_the_published_settings(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.data.dataset == "cifar10" and cfg.data.mmd_per_class == 50 and cfg.data.test_size == 0
    assert cfg.classifier.model == {"cifar10_wrn28.yaml": "wrn28_10", "cifar10_wrn70.yaml": "wrn70_16"}[name]
    assert cfg.classifier.weights  # loaded from a file, not trained
    attack = cfg.attack
    assert (attack.name, attack.norm, attack.steps, attack.k) == ("mma", "linf", 10, 3)
    assert attack.eps == pytest.approx(8 / 255) and attack.step_size == pytest.approx(2 / 255)
    k = cfg.kernel
    assert (k.steps, k.lr, k.batch_size, k.feature_extractor) == (200, 2e-4, None, "cifar_resnet18_small")
    assert k.feature_extractor_ckpt
    d = cfg.denoiser
    assert (d.epochs, d.batch_size, d.lr, d.milestones, d.gamma, d.alpha, d.noise_std) == (
        60, 100, 1e-3, [45], 0.1, 0.01, 0.25)
    assert UNetDenoiser(**d.net).config == UNetDenoiser().config  # the HGD widths and depths
    assert (cfg.defense.batch_size, cfg.defense.reference_size, cfg.defense.target_fpr) == (100, 100, 0.05)
    attacks = cfg.eval.attacks.values()
    adaptive = [a for a in attacks if a.threat == "defense" and a.objective == "adaptive" and a.name == "pgd"]
    assert {a.norm for a in adaptive} == {"linf", "l2"}  # the published PGD+EOT adaptive attack
    assert all((a.steps, a.eot_samples, a.eps) == (200, 20, {"linf": 8 / 255, "l2": 0.5}[a.norm]) for a in adaptive)
    assert any(a.objective.startswith("evade") for a in attacks)  # beyond the paper: detector evasion
    # calibration on official test images phi never trained on; the other 8,000 evaluated
    assert (cfg.data.calibration_from, cfg.data.calibration_size) == ("test", 2000)


def test_imagenet_config_holds_the_published_settings():
    cfg = load_config(CONFIGS / "imagenet_rn50.yaml")
    assert cfg.classifier.model == "resnet50" and cfg.classifier.weights
    attack = cfg.attack
    assert attack.eps == pytest.approx(4 / 255) and attack.step_size == pytest.approx(1 / 255)
    assert cfg.denoiser.batch_size == 128 and cfg.data.options["image_size"] == 224
    assert cfg.data.calibration_from == "test"  # calibrated on val/ images the ImageNet-trained phi never saw


def test_cpu_config_trains_its_classifier_and_holds_out_a_test_split():
    cfg = load_config(CONFIGS / "cifar10_cpu.yaml")
    assert cfg.classifier.weights is None and cfg.classifier.model == "cifar_resnet18_small"
    assert cfg.kernel.feature_extractor is None  # phi is the classifier: the detector reuses its forward pass
    assert cfg.data.test_size >= 1000 and (cfg.eval.max_test or cfg.data.test_size) >= 1000
    # thresholds from a large clean pool of their own, the FPR measured on a large test pool
    assert cfg.data.calibration_size >= 5000 and cfg.data.test_size >= 5000
    per_class = cfg.data.options["max_per_class"]
    held_out = cfg.data.test_size + cfg.data.calibration_size + cfg.data.val_size
    assert 10 * per_class > held_out + 10 * cfg.data.mmd_per_class
    assert any(a.threat == "classifier" and a.norm == "linf" and a.eps == pytest.approx(8 / 255)
               for a in cfg.eval.attacks.values())
    assert any(a.threat == "defense" for a in cfg.eval.attacks.values())


def test_classifier_weights_from_a_file_are_loaded_and_kept(tmp_path):
    cfg = tiny_config(tmp_path)
    source = create_model("small_cnn", num_classes=10, in_channels=1)
    with torch.no_grad():
        source.head.weight.fill_(0.125)  # unlike any initialisation: proves these very weights were loaded
    weights = tmp_path / "outside.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, weights)  # as DataParallel saves it
    cfg = replace(cfg, classifier=ClassifierSettings(model="small_cnn", weights=str(weights)))
    summary = run_stage(cfg, "classifier")
    assert summary["weights"] == str(weights) and 0.0 <= summary["val_acc"] <= 1.0
    loaded = RunNetworks(cfg, RunPaths(cfg.run.dir)).classifier
    assert loaded.spec["name"] == "small_cnn"
    expected = source.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_saved_config_reloads_exactly(tmp_path):
    cfg = replace(tiny_config(tmp_path), trainer={
        "accelerator": "cpu", "max_time": "00:00:10:00", "accumulate_grad_batches": 2,
        "callbacks": [{"class_path": "pytorch_lightning.callbacks.LearningRateMonitor",
                       "init_args": {"logging_interval": "step"}}]})
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert cfg.trainer["callbacks"][0]["init_args"]["log_momentum"] is False  # completed as the parser reads it
    for name in SHIPPED:
        shipped = load_config(CONFIGS / name)
        path.write_text(dump_config(shipped))
        assert load_config(path) == shipped, name


def test_every_trainer_argument_reaches_the_trainer_and_user_loggers_are_added(tmp_path):
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from callbacks import ResumeState
    from pipeline.trainer import build_trainer

    trainer = build_trainer(
        {"accelerator": "cpu", "max_time": "00:00:10:00", "accumulate_grad_batches": 3, "profiler": "simple",
         "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
         "callbacks": [{"class_path": "pytorch_lightning.callbacks.LearningRateMonitor"}]},
        str(tmp_path), "classifier", [], max_epochs=2)
    assert trainer.accumulate_grad_batches == 3 and trainer.max_epochs == 2
    assert trainer.fit_loop.max_steps == -1 and trainer.profiler.__class__.__name__ == "SimpleProfiler"
    assert [type(lg) for lg in trainer.loggers] == [TensorBoardLogger, CSVLogger]
    kinds = [type(c) for c in trainer.callbacks]
    assert ResumeState in kinds and LearningRateMonitor in kinds


@pytest.mark.parametrize(("name", "owner"), [("max_epochs", "classifier.epochs"), ("max_steps", "kernel.steps"),
                                             ("default_root_dir", "run.root"), ("nope", "Unknown Trainer argument")])
def test_stage_owned_and_unknown_trainer_arguments_are_refused(name, owner, tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=owner):
        replace(tiny_config(tmp_path), trainer={name: 3})


def test_a_moved_option_fails_in_one_line_naming_its_new_key_and_saved_runs_move_it(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.saved_config import prune_config

    old = tmp_path / "old.yaml"
    old.write_text("classifier:\n  training: trades\n  trades_beta: 4.0\n")
    with pytest.raises(ConfigError, match=r"`classifier.trades_beta` moved to `classifier.method.beta`"):
        load_config(old)
    saved = {"classifier": {"training": "trades", "trades_beta": 4.0, "fat_omega": 0.001, "gairat_lambda": -1.0}}
    data, dropped = prune_config(saved)
    assert data["classifier"] == {"training": "trades", "method": {"beta": 4.0}}
    assert dropped == ["classifier.fat_omega", "classifier.gairat_lambda"]  # TRADES never read them
    data, _ = prune_config({"classifier": {"training": "gair_fat", "fat_omega": 0.0, "gairat_lambda": -2.0}})
    assert data["classifier"]["method"] == {"omega": 0.0, "lam": -2.0}


def test_benchmarks_read_an_earlier_versions_saved_run_as_eval_py_does(tmp_path):
    """``bench.machine.load_run`` (every bench on a trained run) moves the moved options of a saved config."""
    from bench.machine import load_run

    run = tmp_path / "old_run"
    run.mkdir()
    (run / "config.yaml").write_text("classifier:\n  training: trades\n  trades_beta: 4.0\n  fat_omega: 0.1\n")
    cfg, _ = load_run(run, ["--kernel.steps", "7"])
    assert cfg.classifier.training == "trades" and cfg.classifier.method == {"beta": 4.0}
    assert cfg.kernel.steps == 7 and cfg.run.name == "old_run"
