"""The assembled defense as a LightningModule: the undefended classifier and DAD, clean and under attack.

Randomised evaluation rule: every batch is classified ``draws`` times (R, default 3) with independent noise,
and a sample counts as correct only if the defense classifies it correctly in each draw (the worst of
several evaluations, as AutoAttack's maintainers recommend for randomised defenses); the number of correct
draws is kept too, for the mean over draws.

Mixed batches: an attack of ``mixed`` attacks ``k = round(fraction * B)`` images at a time, in a batch of
``B`` completed with clean images drawn from the other test images (the filler), so every attacked image
appears as an AE exactly once per fraction. A classifier-only attack's AEs do not depend on the batch: those of
the same attack on whole batches are judged among the filler (one crafted store); an attack through
the defense sees and scores the whole mixed batch (e.g. ``evade_clean`` keeps it below the threshold), the groups
of a batch stacked as independent runs where the attack takes them (:mod:`lightning_modules.mixed_batches`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import SumMetric

from dad.attacks import AttackSpec, chunk_seed, run_seeded, target_of
from dad.attacks.common import starting_from
from dad.attacks.judging import with_filler
from dad.attacks.registry import seeded
from dad.defense import DADDefense
from dad.runs import PassCount, counting_passes
from lightning_modules.mixed_batches import FILLER_STREAM, group_aes, mixed_groups
from lightning_modules.stores import CraftedAEs, RecordStore, stored_aes

__all__ = ["DefenseEvaluator", "CLEAN", "RecordStore", "FILLER_STREAM", "COST_FIELDS"]

CLEAN = "clean"
COST_FIELDS = ("passes", "programs", "stops")
"""What a record's attacks ran of the defense (:class:`~dad.runs.PassCount`; ``stops``: the defense batches whose
attack stopped early)."""
_COUNTS = ("n", "undefended", "dad", "dad_correct", "denoised", "batches", "flagged")


class DefenseEvaluator(pl.LightningModule):
    """Runs the defense on clean test batches, on each configured attack and on each mixed-batch attack.

    For every batch and every name it records, per sample (keyed by the sample's index in the test split), whether
    the undefended classifier, DAD (in all ``draws``) and the denoiser path are right, and per batch the detector's
    score and decision (one record store per name, see :class:`RecordStore`). The totals are torchmetrics sums,
    so they are exact under DDP. A batch already present in a given store (same batch index, same sample indices)
    is reused instead of attacked again: that is how an interrupted evaluation resumes. Validation (the defense
    stage) only counts the clean batches.

    Args:
        defense: the assembled :class:`~dad.defense.DADDefense`.
        attacks: named attacks on whole batches.
        keep_images: keep the AEs in the stores (for detection metrics on random batches and plots).
        states: the record store of every evaluated name (``clean`` too with ``with_clean``), to resume from
            and to fill; needed for testing, not for validation.
        sources: per attack name, the model a transfer attack is crafted on (moved with this module).
        with_clean: also evaluate the clean batches (under the name ``clean``).
        batch_size: the evaluation's batch size: batch indices (hence seeds and stored records) are then
            global, the same on any number of processes; mixed batches have this size.
        draws: noise draws per evaluation (a sample is correct only if correct in all of them).
        mixed: named mixed-batch attacks, ``name -> (spec, fraction of AEs per batch)``.
        filler: ``(images, labels)`` of every clean test image, indexed like the test split (mixed batches'
            filler is drawn from it, never from the batch's own images).
        crafted: per attack name, where its AEs are kept across evaluations (only for attacks that do not see this
            defense: classifier-only and transfer attacks); a batch found there is judged, not attacked again.
        starts: per attack name, the records whose AEs its runs start from (a re-run continuing the main run's
            AEs for more steps, :func:`~dad.attacks.common.starting_from`).
    """

    def __init__(
        self,
        defense: DADDefense,
        attacks: Mapping[str, AttackSpec] | None = None,
        keep_images: bool = True,
        states: Mapping[str, RecordStore] | None = None,
        sources: Mapping[str, nn.Module] | None = None,
        with_clean: bool = True,
        batch_size: int | None = None,
        draws: int = 3,
        mixed: Mapping[str, tuple[AttackSpec, float]] | None = None,
        filler: tuple[Tensor, Tensor] | None = None,
        crafted: Mapping[str, CraftedAEs] | None = None,
        starts: Mapping[str, RecordStore] | None = None,
    ) -> None:
        super().__init__()
        if draws < 1:
            raise ValueError(f"Expected `draws` >= 1, got {draws}")
        self.batch_size = batch_size
        self.defense = defense
        self.attacks = dict(attacks or {})
        self.mixed = dict(mixed or {})
        if CLEAN in self.attacks or CLEAN in self.mixed:
            raise ValueError(f"`{CLEAN}` is reserved for the clean images; rename that attack")
        if self.mixed and (filler is None or batch_size is None):
            raise ValueError("Mixed-batch attacks need the `filler` pool and the `batch_size`")
        self.filler_pool, self.draws, self.keep_images = filler, draws, keep_images
        self.names = [CLEAN] * with_clean + list(self.attacks) + list(self.mixed)
        # ModuleDict keys cannot hold every attack name (dots): counts and sources are stored by position
        self._slot = {name: f"m{i}" for i, name in enumerate(self.names)}
        if unknown := sorted(set(sources or {}) - set(self.attacks)):
            raise ValueError(f"Sources given for unknown attacks {unknown}")
        self.sources = nn.ModuleDict({self._slot[name]: model for name, model in (sources or {}).items()})
        self.counts = torch.nn.ModuleDict({f"{slot}__{key}": SumMetric(nan_strategy="disable")
                                           for slot in self._slot.values() for key in _COUNTS})
        self.states = dict(states or {})
        self.crafted, self.starts = dict(crafted or {}), dict(starts or {})
        if any(n not in self.attacks and n not in self.mixed or self._spec(n).threat == "defense"
               and n not in (sources or {}) for n in crafted or {}):
            raise ValueError("Only attacks that do not see the defense (classifier-only, transfer) reuse crafted AEs")
        self.dirty: set[str] = set()
        self._totals: dict[str, dict[str, float]] | None = None  # the counts read at the end of the last epoch
        self._cost = PassCount()  # what the attacks of the record being made ran of the defense

    def train(self, mode: bool = True) -> DefenseEvaluator:
        super().train(mode)
        self.defense.eval()
        self.sources.eval()
        return self

    @torch.no_grad()
    def _judge(self, x: Tensor, y: Tensor, filler: Tensor | None = None,
               filler_y: Tensor | None = None) -> dict[str, Tensor]:
        """The defense on the whole batch ``cat(x, filler)`` in ``draws`` draws; per-sample results for ``x``."""
        n = len(y)
        out = self.defense.forward_draws(with_filler(x, filler), self.draws)
        predicted = out.logits.argmax(2)
        correct = (predicted[:, :n] == y).long().sum(0)
        denoised = (self.defense.logits_of_runs(self.defense.purify_runs(x, self.draws)).argmax(2) == y).all(0)
        filler_acc = (predicted[:, n:] == filler_y).float().mean() if filler is not None else torch.tensor(float("nan"))
        return {"undefended": self.defense.classifier(x).argmax(1) == y, "dad": correct == self.draws,
                "dad_correct": correct, "denoised": denoised, "score": out.score.detach().reshape(()),
                "flagged": out.flags.float().mean(), "filler_acc": filler_acc}

    def _record(self, x_adv: Tensor, y: Tensor, index: Tensor, judged: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"index": index, "x_adv": x_adv.detach() if self.keep_images else x_adv.new_empty(0),
                "batches": torch.tensor(1.0), **judged}

    def _count(self, name: str, record: dict[str, Tensor]) -> None:
        c, slot = self.counts, self._slot[name]
        c[f"{slot}__n"].update(float(record["index"].numel()))
        for key in ("undefended", "dad", "dad_correct", "denoised"):
            c[f"{slot}__{key}"].update(record[key].sum().float().to(self.device))
        c[f"{slot}__batches"].update(record["batches"].float().to(self.device))
        c[f"{slot}__flagged"].update(record["flagged"].float().to(self.device) * record["batches"].to(self.device))

    def attack(self, spec: AttackSpec, x: Tensor, y: Tensor, batch_idx: int, source: nn.Module | None = None,
               filler: Tensor | None = None, start: Tensor | None = None) -> Tensor:
        """AEs of one batch under ``spec``, seeded by its seed and the batch index (:func:`~dad.attacks.run_seeded`)
        exactly as training AEs are: a classifier-threat attack targets the classifier (or ``source``); its runs
        start from ``start`` if given. What it ran of the defense is added to the batch's cost (:mod:`dad.runs`)."""
        with counting_passes() as count, starting_from(start) as warm:
            x_adv = run_seeded(spec, target_of(spec, self.defense, source), x, y, chunk=batch_idx, filler=filler)
        if warm is not None and not warm.used:
            raise ValueError(f"The {spec.name} attack ({spec.threat}) cannot start from stored AEs")
        self._cost.passes += count.passes
        self._cost.programs += count.programs
        self._cost.stops += count.stops > 0
        return x_adv

    def _spec(self, name: str) -> AttackSpec:
        return self.attacks[name] if name in self.attacks else self.mixed[name][0]

    def _mixed(self, name: str, x: Tensor, y: Tensor, index: Tensor, batch_idx: int) -> dict[str, Tensor]:
        """Attack ``x`` in groups of ``round(fraction * B)`` images, each in a batch of ``B`` with clean filler
        (:mod:`lightning_modules.mixed_batches`); an attack with a crafted store (classifier-only: its AEs do not
        depend on the batch) judges the whole batch's AEs of that store among the filler, crafting them if absent."""
        spec, fraction = self.mixed[name]
        groups = mixed_groups(self.filler_pool, index, x, y, int(self.batch_size),  # type: ignore[arg-type]
                              fraction, spec.seed, batch_idx)
        if name in self.crafted:
            whole = self._crafted_or_attack(name, x, y, index, batch_idx)
            aes = [whole[group.rows] for group in groups]
        else:
            aes = group_aes(spec, self.defense, self.attack, x, y, groups)
        parts: dict[str, list[Tensor]] = {}
        for group, x_adv in zip(groups, aes):
            with seeded(chunk_seed(spec.seed, group.chunk, stream=1), x):
                judged = self._judge(x_adv, y[group.rows], group.filler, group.filler_y)
            for key, value in {"x_adv": x_adv, **judged}.items():
                parts.setdefault(key, []).append(value)
        per_sample = {key: torch.cat(parts[key]) for key in ("x_adv", "undefended", "dad", "dad_correct", "denoised")}
        groups_run = float(len(parts["score"]))
        return {"index": index, **per_sample, "x_adv": per_sample["x_adv"] if self.keep_images else x.new_empty(0),
                "score": torch.stack(parts["score"]).mean(), "flagged": torch.stack(parts["flagged"]).mean(),
                "filler_acc": torch.stack(parts["filler_acc"]).mean(), "batches": torch.tensor(groups_run)}

    @staticmethod
    def _unpack(batch: tuple[Tensor, ...], batch_idx: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, y, index)``; loaders without indices get consecutive ones (valid for unshuffled equal batches)."""
        if len(batch) == 3:
            return batch[0], batch[1], batch[2]
        x, y = batch
        return x, y, torch.arange(len(y), device=y.device) + batch_idx * len(y)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y, index = self._unpack(batch, batch_idx)
        record = self._record(x, y, index, self._judge(x, y))
        self._count(CLEAN, record)
        self.log("val/dad_clean_acc", record["dad"].float().mean(), batch_size=len(y), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._totals = self._read_counts()

    def run_batch(self, name: str, x: Tensor, y: Tensor, index: Tensor, batch_idx: int) -> dict[str, Tensor]:
        """The record of one batch under ``name`` (clean, an attack or a mixed-batch attack), with the seconds it
        took (its device's queued work finished) and what its attacks ran of the defense (:data:`COST_FIELDS`)."""
        start, self._cost = time.perf_counter(), PassCount()
        if name in self.mixed:
            record = self._mixed(name, x, y, index, batch_idx)
        else:
            x_adv = x if name == CLEAN else self._crafted_or_attack(name, x, y, index, batch_idx)
            # the evaluation's noise (stream 1) is never the noise the attack saw (stream 0)
            seed = 0 if name == CLEAN else self.attacks[name].seed
            with seeded(chunk_seed(seed, batch_idx, stream=1), x):
                record = self._record(x_adv, y, index, self._judge(x_adv, y))
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        record["seconds"] = torch.tensor(time.perf_counter() - start)
        return {**record, **{key: torch.tensor(float(getattr(self._cost, key))) for key in COST_FIELDS}}

    def _crafted_or_attack(self, name: str, x: Tensor, y: Tensor, index: Tensor, batch_idx: int) -> Tensor:
        """The AEs of attack ``name`` on the batch: read from its crafted store if there, else crafted (and kept)."""
        store = self.crafted.get(name)
        x_adv = store.load(batch_idx, index, x) if store is not None else None
        if x_adv is None:
            source = self.sources[self._slot[name]] if self._slot[name] in self.sources else None
            x_adv = self.attack(self._spec(name), x, y, batch_idx, source,
                                start=stored_aes(self.starts.get(name), batch_idx, index, x))
            if store is not None:
                store.save(batch_idx, index, x_adv)
        return x_adv

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y, index = self._unpack(batch, batch_idx)
        if self.batch_size:  # the global batch number: the same seeds and state keys on any number of ranks
            batch_idx = int(index[0]) // self.batch_size
        for name in self.names:
            state = self.states[name]
            record = state.batches.get(batch_idx)
            if record is None or not torch.equal(record["index"], index.cpu()):
                record = self.run_batch(name, x, y, index, batch_idx)
                state.add(batch_idx, record)
                self.dirty.add(name)
            self._count(name, record)

    def _merge_ranks(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        shares: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shares, {name: (state.key, state.batches) for name, state in self.states.items()})
        for share in shares:
            for name, (key, batches) in share.items():
                self.states[name].merge_batches(key, batches)

    def on_test_epoch_end(self) -> None:
        """Under DDP, give every rank the records of all ranks (each evaluated a share of the batches); then read
        the totals, while the Trainer is live (the counts sync across ranks on the module's device)."""
        self._merge_ranks()
        self._totals = self._read_counts()

    @property
    def scores(self) -> dict[str, Tensor]:
        """The detector's score of every evaluated batch, per name (the mean over a record's mixed batches)."""
        return {name: state.per_batch("score") for name, state in self.states.items() if state.batches}

    def _read_counts(self) -> dict[str, dict[str, float]]:
        return {name: {key: self.counts[f"{slot}__{key}"].compute().item() for key in _COUNTS}
                for name, slot in self._slot.items()}

    def results(self, names: list[str] | None = None) -> dict[str, dict[str, float]]:
        """Accuracies and the detection rate per name (``clean`` and each attack), as fractions, from the counts
        read at the end of the last test or validation epoch (read now if none has ended: a sync across ranks).

        ``dad`` counts a sample only if it was right in every draw; ``dad_mean`` is the mean over draws.
        """
        totals = self._totals if self._totals is not None else self._read_counts()
        out: dict[str, dict[str, float]] = {}
        for name in names or self.names:
            total = totals[name]
            n = max(total["n"], 1.0)
            out[name] = {
                "n": int(total["n"]),
                "undefended": total["undefended"] / n,
                "dad": total["dad"] / n,
                "dad_mean": total["dad_correct"] / (n * self.draws),
                "denoised": total["denoised"] / n,
                "detection_rate": total["flagged"] / max(total["batches"], 1.0),
                "batches": int(total["batches"]),
            }
        return out

    def configure_optimizers(self) -> Any:
        return None
