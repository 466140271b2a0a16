"""What every benchmark records beside its numbers (the machine, the software, the threads, and peak memory), and
the start every bench on a trained run shares (its command line, configuration and device)."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import logging
import platform
import re
import subprocess
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from dad.io import atomic_write_json
from pipeline.config import PipelineConfig
from pipeline.saved_config import load_saved_config
from pipeline.paths import RunPaths
from pipeline.trainer import quiet_third_party, run_device

__all__ = ["machine_description", "write_result", "stage_summary", "stage_seconds", "pct", "PeakMemory",
           "configure_threads", "synchronize", "median_ms", "parse_with_overrides", "load_run", "start_run_bench"]

RESULTS = Path(__file__).resolve().parent / "results"

_OVERRIDE = re.compile(r"--\w+(\.[\w-]+)+(=.*)?", re.DOTALL)
"""A configuration override's option: ``--<section>.<option>`` (nested options allowed), its value after ``=`` or
in the next argument."""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1])
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: leave torch's default) and return the number in use."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"Expected `threads` >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA runs it asynchronously), so that a timer reads the work's time,
    not its launch's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device = torch.device("cpu")) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after one untimed call, each call's work on ``device``
    finished before its time is read."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def parse_with_overrides(parser: argparse.ArgumentParser,
                         argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """``parser``'s arguments in ``argv`` (None: the command line) and the others, configuration overrides
    ``--<section>.<option> VALUE`` as ``train.py`` takes them (the trainer flags ``--trainer.accelerator gpu
    --trainer.devices 1`` ...); anything else is ``parser``'s error, so that a mistyped option of the bench is
    reported as such instead of reaching the configuration."""
    args, overrides = parser.parse_known_args(argv)
    wrong = [arg for i, arg in enumerate(overrides)
             if (i == 0 or arg.startswith("--")) and not _OVERRIDE.fullmatch(arg)]
    if wrong:
        parser.error(f"unrecognized arguments: {' '.join(wrong)} (configuration overrides take the form "
                     "--<section>.<option> VALUE, e.g. --trainer.accelerator gpu)")
    return args, overrides


def machine_description(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, memory, GPU, torch version and thread settings of this process."""
    try:
        cores_available = len(os.sched_getaffinity(0))
    except AttributeError:
        cores_available = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_available": cores_available,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "git_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return info


def write_result(name: str, payload: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    """Write ``payload`` as ``<out_dir>/<name>.json`` and return the path."""
    path = out_dir / f"{name}.json"
    atomic_write_json(json.loads(json.dumps(payload, default=str)), path)
    return path


def _release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so the next block's growth shows in the RSS."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a code block above what was in use when it started.

    On CUDA: ``torch.cuda.max_memory_allocated`` (reset at entry). On CPU: the process's resident set size,
    sampled every ``interval`` seconds by a background thread (Linux ``/proc``), after freed heap memory was
    returned to the OS at entry; spikes between two samples can be missed, and memory the allocator still
    holds from earlier blocks is reused without showing, so the figure is a lower bound of the block's need.
    """

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device = device
        self.interval = interval
        self.peak_mib: float = float("nan")
        self._stop = threading.Event()
        self._peak = 0
        self._base = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif Path("/proc/self/statm").is_file():
            _release_free_memory()
            self._base = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.peak_mib = (self._peak - self._base) / 2**20


def stage_summary(run: Path, stage: str) -> dict[str, Any]:
    """What a run's stage recorded in its ``done.json`` (empty when the stage has not finished)."""
    done = RunPaths(run).done(stage)
    return json.loads(done.read_text()) if done.is_file() else {}


def stage_seconds(run: Path, stage: str) -> float:
    """The seconds a run's stage took (0 when it has not finished or did not record them)."""
    return float(stage_summary(run, stage).get("seconds") or 0.0)


def pct(value: float | None) -> str:
    """A share as a percentage with one decimal, ``-`` for none (the result tables' cells)."""
    return "-" if value is None else f"{100 * value:.1f}"


def load_run(run: Path, overrides: Sequence[str] = ()) -> tuple[PipelineConfig, RunPaths]:
    """A trained run's saved configuration with ``overrides`` on top (``--<section>.<option> VALUE``, as ``train.py``
    takes them: the trainer flags of the machine benched on ...), pointed at ``run`` wherever it now lives, and its
    paths."""
    cfg = load_saved_config(run / "config.yaml", overrides)
    return replace(cfg, run=replace(cfg.run, root=str(run.parent), name=run.name)), RunPaths(run)


def start_run_bench(run: Path, threads: int | None,
                    overrides: Sequence[str] = ()) -> tuple[int, PipelineConfig, RunPaths, torch.device]:
    """The start of a bench on a trained run: threads set, INFO logging, third-party chatter off, the run loaded
    with ``overrides`` (see :func:`load_run`), and its device (the one a Trainer of its ``trainer`` section would
    place the defense on, :func:`~pipeline.trainer.run_device`), where the bench does its tensor work."""
    used = configure_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_third_party()
    cfg, paths = load_run(run, overrides)
    return used, cfg, paths, run_device(cfg.trainer)
