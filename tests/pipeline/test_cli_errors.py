"""Bad input at the command line: one line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from evaluation.cli import main_eval
from pipeline.cli import main_train

TINY = ["--config", "configs/digits.yaml", "--trainer.enable_progress_bar", "false"]


class _Marker:
    """Unpickling this creates a file: the proof that a loader executed code from a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.path),))


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, expected: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected.lower() in err[0].lower(), err[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["kernel"], "train.py classifier"),  # a stage without the checkpoint it needs
        (["denoiser"], "No kernel checkpoint"),
        (["pipeline", "--defense.target_fpr", "1.5"], "target_fpr"),
        (["pipeline", "--kernel.batch_size", "1"], "at least 2"),
        (["pipeline", "--denoiser.batch_size", "1"], "at least 2"),
        (["pipeline", "--defense.reference_size", "10"], "reference set"),
        (["pipeline", "--attack", '{"name": "pgd", "eps": 0}'], "eps"),
        (["pipeline", "--eval.attacks", '{"x": {"name": "pgd", "eps": -0.1}}'], "eps"),
        (["pipeline", "--eval.attacks", '{"x": {"name": "nope"}}'], "registered for threat"),
        (["pipeline", "--classifier.model", "nope"], "Unknown model"),
        (["pipeline", "--no_such_flag", "1"], "no_such_flag"),
        (["pipeline", "--classifier.model_kwargs", '{"in_channels": 3}'], "channel"),
        (["pipeline", "--classifier.weights", "/nonexistent/w.pt"], "not found"),
        (["pipeline", "--trainer.max_epochs", "3"], "`classifier.epochs`, `denoiser.epochs` and `score.epochs`"),
        (["kernel", "--trainer.max_steps", "3"], "`kernel.steps`"),
        (["pipeline", "--trainer.accumulate_grad_batches", "two"], "accumulate_grad_batches"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v)[:40],
)
def test_train_bad_input(args, expected, tmp_path, capsys):
    code = main_train([args[0], *TINY, "--run.root", str(tmp_path), *args[1:]])
    _one_line_error(capsys, code, expected)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_checkpoint_of_the_wrong_stage_is_refused(tmp_path, capsys):
    from tests.conftest import tiny_config
    from pipeline.paths import RunPaths
    from pipeline.stages import run_stage

    cfg = tiny_config(tmp_path)
    run_stage(cfg, "classifier")
    wrong = RunPaths(cfg.run.dir).product("classifier")
    code = main_train(["kernel", *TINY, "--run.root", str(tmp_path), "--run.name", "other", "--ckpt_path", str(wrong)])
    _one_line_error(capsys, code, "expected a kernel checkpoint")


def test_malicious_checkpoint_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": _Marker(str(marker))}))
    code = main_train(["kernel", *TINY, "--run.root", str(tmp_path), "--ckpt_path", str(evil)])
    _one_line_error(capsys, code, "evil.ckpt")
    code = main_train(["pipeline", *TINY, "--run.root", str(tmp_path), "--classifier.weights", str(evil)])
    _one_line_error(capsys, code, "evil.ckpt")
    assert not marker.exists()


def test_eval_without_a_run(tmp_path, capsys):
    _one_line_error(capsys, main_eval(["--run", str(tmp_path / "missing")]), "config.yaml")
    _one_line_error(capsys, main_eval([]), "--run")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="target_fpr"):
        main_train(["pipeline", *TINY, "--run.root", str(tmp_path), "--defense.target_fpr", "2", "--debug"])
