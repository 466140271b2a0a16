"""Adversarial examples generated once, cached on disk with a manifest, reused while it matches.

The manifest records what produced the file (attack spec, seeding protocol, classifier checkpoint hash,
split digest, sample count) and the file's own SHA-256. A cache is used only if all of them match; a changed
configuration, another classifier, another split or a truncated/corrupted file regenerates it.

Generation is sharded over the ranks of a distributed run: the samples are cut into fixed chunks in
global index order, rank ``r`` attacks chunks ``r, r + W, ...``, each chunk seeded by its own index
(:func:`~dad.attacks.run_seeded`, exactly as the evaluation seeds its batches), so the result does not
depend on the number of processes. Rank 0 merges the shards and writes the cache. The attack runs on the
``device`` it is given (the Trainer's, from :class:`~datamodules.paired.PairedDataModule`'s ``setup``), where
the classifier is moved for the generation and from where it is moved back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from dad.attacks import AttackSpec, run_seeded
from dad.distributed import rank_and_world
from dad.io import atomic_torch_save, atomic_write_json, sha256_file

__all__ = ["load_or_generate", "manifest_for", "cache_is_valid"]

log = logging.getLogger(__name__)

PROTOCOL = 2
"""Version of how chunks are seeded (1: before the attack registry); part of the manifest."""
DEFAULT_CHUNK = 256
"""Images per chunk when the attack spec leaves ``batch_size`` unset."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def manifest_for(attack: AttackSpec, classifier_hash: str, split_digest: str, split: str, num: int) -> dict[str, Any]:
    """The manifest a cache must carry to be reused (without the file checksum)."""
    return {
        "attack": attack.as_dict(),
        "protocol": PROTOCOL,
        "classifier_sha256": classifier_hash,
        "split_digest": split_digest,
        "split": split,
        "num_samples": num,
    }


def cache_is_valid(path: Path, expected: dict[str, Any]) -> bool:
    """Whether ``path`` and its manifest exist, match ``expected`` and the file's checksum."""
    manifest_path = path.with_suffix(".json")
    if not (path.is_file() and manifest_path.is_file()):
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return False
    stored = {k: v for k, v in manifest.items() if k != "file_sha256"}
    if stored != json.loads(json.dumps(expected)):
        log.info("AE cache %s was made with another configuration: regenerating", path)
        return False
    if manifest.get("file_sha256") != sha256_file(path):
        log.warning("AE cache %s is corrupted or truncated (checksum mismatch): regenerating", path)
        return False
    return True


@contextmanager
def _placed(module: nn.Module, device: torch.device | None) -> Iterator[torch.device]:
    """Run the block with ``module`` on ``device`` (its own device when None), moved back after."""
    home = next(module.parameters()).device
    module.to(device or home)
    try:
        yield device or home
    finally:
        module.to(home)


def _generate_chunks(
    classifier: nn.Module, images: Tensor, labels: Tensor, attack: AttackSpec, chunks: list[int], desc: str,
    device: torch.device,
) -> dict[int, Tensor]:
    out: dict[int, Tensor] = {}
    size = attack.batch_size or DEFAULT_CHUNK
    for c in tqdm(chunks, desc=desc, leave=False, disable=not chunks):
        x = images[c * size : (c + 1) * size].to(device)
        y = labels[c * size : (c + 1) * size].to(device)
        out[c] = run_seeded(attack, classifier, x, y, chunk=c).cpu()
    return out


def load_or_generate(
    classifier: nn.Module,
    images: Tensor,
    labels: Tensor,
    attack: AttackSpec,
    path: str | Path,
    classifier_hash: str,
    split_digest: str,
    split: str,
    device: torch.device | None = None,
) -> Tensor:
    """Adversarial examples of ``images`` under ``attack`` on ``classifier``, from ``path`` if valid.

    Every rank of a distributed run must call this together (it synchronises with barriers), within a Trainer's
    life. ``device``: where the attack runs (None: the classifier's device); the AEs are returned on the CPU.
    """
    path = Path(path)
    expected = manifest_for(attack, classifier_hash, split_digest, split, len(labels))
    rank, world = rank_and_world()
    if not cache_is_valid(path, expected):
        num_chunks = -(-len(labels) // (attack.batch_size or DEFAULT_CHUNK))
        mine = list(range(rank, num_chunks, world))
        with _placed(classifier, device) as where:
            shard = _generate_chunks(classifier, images, labels, attack, mine, f"AEs {split} ({attack.name})", where)
        if rank > 0:
            atomic_torch_save(shard, path.with_name(f"{path.stem}.shard{rank}.pt"))
        _barrier()
        if rank == 0:
            parts = dict(shard)
            for r in range(1, world):
                other = path.with_name(f"{path.stem}.shard{r}.pt")
                parts.update(torch.load(other, map_location="cpu", weights_only=True))
                other.unlink()
            if sorted(parts) != list(range(num_chunks)):
                raise RuntimeError(f"AE generation lost chunks: got {sorted(parts)} of {num_chunks}")
            adv = torch.cat([parts[c] for c in range(num_chunks)])
            atomic_torch_save({"adv": adv}, path)
            atomic_write_json({**expected, "file_sha256": sha256_file(path)}, path.with_suffix(".json"))
        _barrier()
    adv = torch.load(path, map_location="cpu", weights_only=True)["adv"]
    if adv.shape != images.shape:
        raise RuntimeError(f"AE cache {path} holds shape {tuple(adv.shape)}, expected {tuple(images.shape)}")
    return adv
