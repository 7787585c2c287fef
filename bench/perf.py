"""`bench perf`: training throughput of the harness's loop against a plain PyTorch loop.

For each family and backbone, four ways to train the same nets on the same batches:
  plain    a hand-written PyTorch loop over the tensor batches, with the family's own optimisers
           (its configure_optimizers) and step (its losses, or the GAN's train_on_batch): the
           reference, which cannot drift from the module;
  harness  bench run's loop on Lightning Fabric (bench.loop.fit), one batch per optimiser step;
  trainer  the family under lightning.Trainer over the same tensor batches, one batch per step:
           what `bench fit` users get;
  loader   lightning.Trainer fed by torch.utils.data.DataLoader(TensorDataset): the usual route.
harness/plain is what the harness costs (target >= 0.95). Each figure is the best of `repeats`
runs of `steps` batches after `warmup`, the four interleaved so that a busy machine slows them
alike.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from bench.defaults import PERF_REPEATS, PERF_STEPS, PERF_WARMUP
from bench.errors import UserError
from bench.loop import LoopSettings, Run, configured_optimizers, fit
from bench.process import prepare_run_process
from datamodules import ImageDataModule, TensorBatches
from datamodules.image import BATCH_SIZE
from modules import MODELS

log = logging.getLogger(__name__)

FEEDS = ("plain", "harness", "trainer", "loader")


def plain_step_fn(model):
    """One batch in plain PyTorch, from the family's own optimisers and step."""
    optimizers, _ = configured_optimizers(model)
    if not model.automatic_optimization:  # the GAN: its own step, with Tensor.backward
        opt_g, opt_d = optimizers

        def gan_step(x: torch.Tensor, index: int) -> None:
            model.train_on_batch(x, index, opt_g, opt_d, torch.Tensor.backward)
        return gan_step

    [optimizer] = optimizers

    def step(x: torch.Tensor, index: int) -> None:
        loss = model.losses(x)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_plain(model, batches: TensorBatches, steps: int, warmup: int,
               device: torch.device) -> float:
    """Images per second of `plain_step_fn(model)` over `steps` batches after `warmup`."""
    model.to(device).train()
    step = plain_step_fn(model)
    epoch, index, images, start = 0, 0, 0, None
    while index < warmup + steps:
        for x, _ in batches.epoch_batches(epoch):
            if index == warmup:
                _sync(device)
                start = time.perf_counter()
            step(x, index)
            index += 1
            images += len(x) if index > warmup else 0
            if index == warmup + steps:
                break
        epoch += 1
    _sync(device)
    return images / (time.perf_counter() - start)


def time_harness(fabric: L.Fabric, model, batches: TensorBatches, steps: int,
                 warmup: int, progress_bar: bool) -> float:
    """Images per second through bench.loop.fit, as bench run trains (no checkpoints, logs or
    validation: a run writes a checkpoint every thousand batches)."""
    optimizers, schedules = configured_optimizers(model)
    wrapped, *optimizers = fabric.setup(model, *optimizers)
    settings = LoopSettings(checkpoint_every=10**9, warmup_batches=warmup)
    run = Run(fabric, wrapped, optimizers, schedules, batches, None, warmup + steps, settings,
              Path("unused.ckpt"))
    progress = fit(run, progress_bar=progress_bar)
    return progress.timed_images / progress.timed_seconds


class _Clock(L.Callback):
    """Times a Trainer's batches after `warmup` of them, and stops it after `warmup + steps`."""

    def __init__(self, steps: int, warmup: int, device: torch.device) -> None:
        self.steps, self.warmup, self.device = steps, warmup, device
        self.batches = self.images = 0
        self.start = self.seconds = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batches == self.warmup:
            _sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if self.batches > self.warmup:
            self.images += len(batch[0])
        if self.batches == self.warmup + self.steps:
            _sync(self.device)
            self.seconds = time.perf_counter() - self.start
            trainer.should_stop = True


def time_trainer(model, train_batches, steps: int, warmup: int, accelerator: str,
                 device: torch.device, progress_bar: bool) -> float:
    """Images per second of the family under lightning.Trainer, one batch per step."""
    clock = _Clock(steps, warmup, device)
    with warnings.catch_warnings():
        # the timed model's validation_step is unused here, as Lightning notes
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
        trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, callbacks=[clock],
                            enable_progress_bar=progress_bar, enable_model_summary=False,
                            enable_checkpointing=False, num_sanity_val_steps=0,
                            limit_val_batches=0, max_epochs=-1)
        trainer.fit(model, train_dataloaders=train_batches)
    return clock.images / clock.seconds


def run_perf(families: list[str], backbones: list[str], dataset: str = "fashion_mnist",
             batch_size: int = BATCH_SIZE, steps: int = PERF_STEPS, warmup: int = PERF_WARMUP,
             repeats: int = PERF_REPEATS,
             accelerator: str = "auto", progress_bar: bool = True) -> pd.DataFrame:
    unknown = [f for f in families if f not in MODELS]
    if unknown:
        raise UserError(f"--families: unknown {', '.join(unknown)}; choose from: "
                        f"{', '.join(MODELS)}")
    prepare_run_process()  # as in bench run
    dm = ImageDataModule(dataset, batch_size=batch_size, val_size=0)
    dm.setup()
    fabric = L.Fabric(accelerator=accelerator, devices=1)
    device = fabric.device
    images, labels = dm.train_images.to(device), dm.train_labels.to(device)
    records = []
    for family in families:
        for backbone in backbones:
            best = dict.fromkeys(FEEDS, 0.0)
            for repeat in range(repeats):
                for feed in FEEDS:
                    L.seed_everything(repeat, verbose=False)
                    model = MODELS[family](backbone=backbone, image_shape=dm.image_shape,
                                           **MODELS[family].family.perf_params)
                    batches = TensorBatches(images, labels, batch_size, shuffle=True,
                                            drop_last=True, seed=repeat)
                    if feed == "plain":
                        rate = time_plain(model, batches, steps, warmup, device)
                    elif feed == "harness":
                        rate = time_harness(fabric, model, batches, steps, warmup, progress_bar)
                    elif feed == "trainer":
                        rate = time_trainer(model, batches, steps, warmup, accelerator, device,
                                            progress_bar)
                    else:  # the usual route: float images in a TensorDataset, collated per item
                        loader = DataLoader(TensorDataset(images.float().div(255).cpu(),
                                                          labels.cpu()),
                                            batch_size=batch_size, shuffle=True, drop_last=True)
                        rate = time_trainer(model, loader, steps, warmup, accelerator, device,
                                            progress_bar)
                    best[feed] = max(best[feed], rate)
            record = {"family": family, "backbone": backbone,
                      **{f"{feed}_img_per_s": best[feed] for feed in FEEDS},
                      **{f"{feed}_vs_plain": best[feed] / best["plain"] for feed in FEEDS[1:]}}
            records.append(record)
            log.info(f"{family:>4} {backbone:<5} plain {best['plain']:>9,.0f}  harness "
                     f"{best['harness']:>9,.0f}  trainer {best['trainer']:>9,.0f}  loader "
                     f"{best['loader']:>9,.0f} img/s  harness/plain "
                     f"{record['harness_vs_plain']:.3f}  trainer/plain "
                     f"{record['trainer_vs_plain']:.3f}")
    log.info(f"\ndevice {device}, batch {batch_size}, {steps} steps after {warmup} warm-up, "
             f"best of {repeats}, torch threads {torch.get_num_threads()}")
    return pd.DataFrame(records)
