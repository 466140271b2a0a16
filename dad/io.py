"""Atomic file writes and checksums (a crash mid-write never leaves a half-written file behind), and the error of a
saved file this code cannot read."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["IncompatibleFileError", "read_tagged", "atomic_open", "atomic_torch_save", "atomic_write_json",
           "atomic_write_text", "sha256_file"]


class IncompatibleFileError(ValueError):
    """Raised when a file is not a saved defense or purifier, or was saved by an incompatible version."""


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it is renamed over ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through :func:`atomic_open`."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write text through :func:`atomic_open`."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(obj: Any, path: str | os.PathLike[str], default: Callable[[Any], Any] | None = None) -> None:
    """Write indented JSON through :func:`atomic_open`."""
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=False, default=default) + "\n", path)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_tagged(path: Path, tag: str, readable: tuple[int, ...], what: str, missing: str,
                map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a file written as ``{"format": tag, "version": v, ...}`` with ``weights_only=True``.

    Only tensors and plain data are accepted, so a file from elsewhere can never run code. A missing file
    raises ``FileNotFoundError(missing)``; anything else that is not a readable ``tag`` payload raises
    :class:`IncompatibleFileError` naming ``what`` (e.g. "purifier").
    """
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle errors differ by cause; all mean "not a loadable file of this kind"
        raise IncompatibleFileError(f"{path} is not a loadable {what}: {str(err).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != tag:
        raise IncompatibleFileError(f"{path} is not a saved {what} (no '{tag}' header)")
    if payload.get("version") not in readable:
        shown = readable[0] if len(readable) == 1 else readable
        raise IncompatibleFileError(f"{path} has format version {payload.get('version')}, this code reads {shown}")
    return payload
