"""One training step of a stage on a fixed global batch, in one process or under DDP (2 CPU processes).

Usage: python one_step.py {kernel,denoiser,ae} {single,ddp} RUN_CONFIG OUT_DIR

RUN_CONFIG is the ``config.yaml`` of a run whose classifier and kernel stages are done. Saves, per rank, the
loss and every parameter gradient after DDP's reduction (``kernel``/``denoiser``), or runs the paired data
module's AE generation inside the Trainer (``ae``), for tests/pipeline/test_ddp.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from dad.attacks import AttackSpec
from dad.denoisers import UNetDenoiser
from dad.distributed import release_process_group
from dad.kernels import SemanticKernel
from datamodules import DataSettings, DigitsDataModule, PairedDataModule
from lightning_modules.denoiser import DenoiserModule, DenoiserSettings
from lightning_modules.kernel import KernelModule, KernelSettings
from pipeline.config import load_config
from pipeline.paths import RunPaths
from pipeline.networks import RunNetworks

GLOBAL_BATCH = 16
ATTACK = AttackSpec(name="pgd", eps=0.2, step_size=0.05, steps=3, batch_size=8, seed=3)


class Capture(pl.Callback):
    def __init__(self, out: Path, tag: str) -> None:
        self.out, self.tag, self.grads = out, tag, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        torch.save({"loss": outputs["loss"].detach(), "grads": self.grads},
                   self.out / f"{self.tag}_rank{trainer.global_rank}.pt")


def _fixed_batch() -> TensorDataset:
    digits = load_digits()
    x = torch.tensor(digits.images[:GLOBAL_BATCH], dtype=torch.float32).div(16).unsqueeze(1)
    y = torch.tensor(digits.target[:GLOBAL_BATCH])
    signs = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).sign()
    return TensorDataset(x, (x + 0.2 * signs).clamp(0, 1), y)


def main(stage: str, mode: str, config: str, out: str) -> None:
    torch.set_num_threads(1)
    cfg = load_config(config)
    nets = RunNetworks(cfg, RunPaths(Path(config).parent))
    pl.seed_everything(0, verbose=False)
    devices = 2 if mode == "ddp" else 1
    trainer_kwargs = dict(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    out_dir = Path(out)
    if stage == "ae":
        base = DigitsDataModule(DataSettings(mmd_per_class=5, val_size=100, test_size=100, subset=700))
        paired = PairedDataModule(base, nets.classifier, "hash", ATTACK, out_dir / f"aes_{mode}", "mmd", None, 10)
        trainer = pl.Trainer(**trainer_kwargs)
        trainer.fit(KernelModule(SemanticKernel(nets.classifier)), datamodule=paired)
        return
    if stage == "kernel":
        module: pl.LightningModule = KernelModule(SemanticKernel(nets.classifier), KernelSettings(lr=1e-2))
    else:
        net = UNetDenoiser(1, enc_widths=[8, 16], enc_depths=[1, 1], dec_widths=[8], dec_depths=[1], batch_norm=False)
        module = DenoiserModule(nets.classifier, nets.kernel, net,
                                DenoiserSettings(noise_std=0.0, milestones=[], alpha=0.5))
    loader = DataLoader(_fixed_batch(), batch_size=GLOBAL_BATCH // devices, shuffle=False)
    trainer = pl.Trainer(callbacks=[Capture(out_dir, f"{stage}_{mode}")], **trainer_kwargs)
    trainer.fit(module, train_dataloaders=loader)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:5])
    finally:
        release_process_group()
