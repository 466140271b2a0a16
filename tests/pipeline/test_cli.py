"""The command line as a user drives it: any Trainer argument, added loggers and callbacks, the saved config."""

from __future__ import annotations

import yaml

from pipeline.cli import main_train
from pipeline.config import load_config

TINY = ["--config", "configs/digits.yaml", "--trainer.enable_progress_bar", "false", "--data.subset", "500",
        "--data.val_size", "100", "--data.test_size", "100", "--data.mmd_per_class", "5"]


def test_trainer_arguments_callbacks_and_loggers_from_the_command_line(tmp_path):
    code = main_train(["classifier", *TINY, "--run.root", str(tmp_path), "--run.name", "cli", "--classifier.epochs",
                       "1", "--trainer.max_time", "00:00:05:00", "--trainer.limit_train_batches", "3",
                       "--trainer.callbacks+=LearningRateMonitor", "--trainer.logger", "CSVLogger",
                       "--trainer.logger.save_dir", str(tmp_path / "csv")])
    assert code == 0
    run = tmp_path / "cli"
    saved = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert saved["max_time"] == "00:00:05:00" and saved["limit_train_batches"] == 3
    assert saved["callbacks"][0]["class_path"].endswith("LearningRateMonitor")
    assert list((run / "logs" / "classifier").glob("events.out.tfevents.*"))  # the run's own logger stays
    assert list((tmp_path / "csv").rglob("metrics.csv"))  # and the user's is added
    assert (run / "classifier" / "best.ckpt").is_file()
    reloaded = load_config(run / "config.yaml")
    assert reloaded.trainer["callbacks"] == saved["callbacks"] and reloaded.classifier.epochs == 1
