"""`bench perf`: training throughput of the harness against a plain PyTorch loop.

For each family and backbone, three feeds of the same nets and the same batches:
  plain    a hand-written PyTorch loop over the tensor batches (the reference);
  harness  the harness's path: lightning.Trainer with bench run's callbacks and settings over the
           ImageDataModule's tensor batches (no logger: W&B is not part of the timing);
  loader   the same Trainer fed by torch.utils.data.DataLoader(TensorDataset), the usual route.
harness/plain shows Lightning's overhead (target >= 0.95); loader/harness shows what the data
path saves. Each figure is the best of `repeats` runs of `steps` steps after `warmup` steps,
the three feeds interleaved so that a busy machine slows them alike.

The Trainer's own work per step (hook dispatch, progress tracking, closures) does not shrink
with the model, so it is measured apart, on a model with one weight (`fixed_step_cost_us`), and
each row shows the best harness/plain that cost leaves (`ceiling`): plain step time over plain
step time plus the fixed cost.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bench.callbacks import DivergenceGuard, TrainThroughput
from bench.runner import (CHECKPOINT_EVERY_STEPS, HARNESS_TRAINER_ARGS, harness_callbacks,
                          optimizer_steps, prepare_run_process)
from datamodules import ImageDataModule, TensorBatches
from modules import MODELS
from modules.steps import LossSteps

FAMILY_ARGS = {"ae": {}, "sae": {"sparsity": "topk", "k": 8}, "vae": {}, "gan": {}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_step_fn(model):
    """One optimisation step written out in plain PyTorch, using the module's own losses."""
    if model.automatic_optimization:
        optimizer = torch.optim.Adam(model.parameters(), lr=model.hparams.lr)

        def step(x: torch.Tensor) -> None:
            loss = model.losses(x)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    opt_g, opt_d = (torch.optim.Adam(net.parameters(), lr=model.lr, betas=model.betas)
                    for net in (model.generator, model.discriminator))
    counter = {"batch": 0}

    def gan_step(x: torch.Tensor) -> None:
        real = x * 2 - 1
        fake = torch.tanh(model.generator(torch.randn(len(real), model.hparams.latent_dim,
                                                      device=real.device)))
        d_loss = model.discriminator_loss(real, fake.detach())["d_loss"]
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        counter["batch"] += 1
        if counter["batch"] % model.n_critic == 0:
            g_loss = model.generator_loss(fake)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
    return gan_step


def time_plain(model, batches, steps: int, warmup: int, device: torch.device) -> float:
    model.to(device).train()
    step = plain_step_fn(model)
    iterator = iter(_cycle(batches))
    for _ in range(warmup):
        step(next(iterator)[0])
    _sync(device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        x = next(iterator)[0]
        step(x)
        images += len(x)
    _sync(device)
    return images / (time.perf_counter() - start)


def _cycle(batches):
    while True:
        yield from batches


def time_trainer(model, train_batches, steps: int, warmup: int, accelerator: str,
                 progress_bar: bool) -> float:
    """Images per second through a Trainer set up as bench run sets one up."""
    throughput = TrainThroughput(warmup_batches=warmup)
    with tempfile.TemporaryDirectory() as ckpt_dir:
        callbacks = harness_callbacks(throughput, DivergenceGuard(), Path(ckpt_dir),
                                      CHECKPOINT_EVERY_STEPS, progress_bar)
        trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False,
                            callbacks=callbacks, enable_progress_bar=progress_bar,
                            max_steps=optimizer_steps(model, warmup + steps), max_epochs=-1,
                            limit_val_batches=0, **HARNESS_TRAINER_ARGS)
        trainer.fit(model, train_dataloaders=train_batches)
    return throughput.images_per_second


class OneWeight(LossSteps):
    """A model with a single weight: its training step is the harness's fixed cost per step."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.weight = nn.Parameter(torch.ones(()))

    def losses(self, x: Tensor) -> dict[str, Tensor]:
        return {"loss": (self.weight * x[:, 0, 0, 0]).square().mean()}


def fixed_step_cost_us(batches, steps: int, warmup: int, repeats: int, accelerator: str,
                       device: torch.device, progress_bar: bool) -> tuple[float, float, float]:
    """(plain, Trainer, Trainer - plain) microseconds per step for OneWeight, best of `repeats`:
    what the Trainer adds to every step whatever the model."""
    batch = len(next(iter(batches))[0])
    plain = harness = 0.0
    for _ in range(repeats):
        plain = max(plain, time_plain(OneWeight(), batches, steps, warmup, device))
        harness = max(harness, time_trainer(OneWeight(), batches, steps, warmup, accelerator,
                                            progress_bar))
    plain_us, harness_us = 1e6 * batch / plain, 1e6 * batch / harness
    return plain_us, harness_us, harness_us - plain_us


def ceiling(plain_img_per_s: float, batch_size: int, fixed_us: float) -> float:
    """The best harness/plain a fixed per-step cost allows: t / (t + fixed), t the plain step."""
    plain_us = 1e6 * batch_size / plain_img_per_s
    return plain_us / (plain_us + max(fixed_us, 0.0))


def run_perf(families: list[str], backbones: list[str], dataset: str = "fashion_mnist",
             batch_size: int = 128, steps: int = 200, warmup: int = 20, repeats: int = 3,
             accelerator: str = "auto", progress_bar: bool = True, log=print) -> pd.DataFrame:
    # As in bench run; it also makes the plain loop what a script without Lightning gets.
    prepare_run_process()
    dm = ImageDataModule(dataset, batch_size=batch_size, val_size=0)
    dm.setup()
    probe = L.Trainer(accelerator=accelerator, devices=1, logger=False)
    device = probe.strategy.root_device
    images = dm.train_images.to(device)
    labels = dm.train_labels.to(device)
    fixed = fixed_step_cost_us(
        TensorBatches(images, labels, batch_size, shuffle=True, drop_last=True),
        steps, warmup, repeats, accelerator, device, progress_bar)
    log(f"fixed cost per step (a one-weight model): plain {fixed[0]:.0f} us, harness "
        f"{fixed[1]:.0f} us, the harness's Trainer adds {fixed[2]:.0f} us")
    records = []
    for family in families:
        for backbone in backbones:
            best = {"plain": 0.0, "harness": 0.0, "loader": 0.0}
            for repeat in range(repeats):
                for feed in best:
                    L.seed_everything(repeat, verbose=False)
                    model = MODELS[family](backbone=backbone, image_shape=dm.image_shape,
                                           **FAMILY_ARGS[family])
                    batches = TensorBatches(images, labels, batch_size, shuffle=True,
                                            drop_last=True, seed=repeat)
                    if feed == "plain":
                        rate = time_plain(model, batches, steps, warmup, device)
                    elif feed == "harness":
                        rate = time_trainer(model, batches, steps, warmup, accelerator,
                                            progress_bar)
                    else:
                        # The usual route: float images in a TensorDataset, collated per item.
                        dataset_ = TensorDataset(images.float().div(255).cpu(), labels.cpu())
                        loader = DataLoader(dataset_, batch_size=batch_size, shuffle=True,
                                            drop_last=True)
                        rate = time_trainer(model, loader, steps, warmup, accelerator,
                                            progress_bar)
                    best[feed] = max(best[feed], rate)
            record = {"family": family, "backbone": backbone,
                      "plain_img_per_s": best["plain"], "harness_img_per_s": best["harness"],
                      "loader_img_per_s": best["loader"],
                      "harness_vs_plain": best["harness"] / best["plain"],
                      "loader_vs_harness": best["loader"] / best["harness"],
                      "ceiling": ceiling(best["plain"], batch_size, fixed[2]),
                      "fixed_step_us": fixed[2]}
            records.append(record)
            log(f"{family:>4} {backbone:<5} plain {best['plain']:>9,.0f}  harness "
                f"{best['harness']:>9,.0f}  loader {best['loader']:>9,.0f} img/s  "
                f"harness/plain {record['harness_vs_plain']:.3f}  "
                f"loader/harness {record['loader_vs_harness']:.3f}  "
                f"ceiling {record['ceiling']:.3f}")
    table = pd.DataFrame(records)
    log(f"\ndevice {device}, batch {batch_size}, {steps} steps after {warmup} warm-up, best of "
        f"{repeats}, torch threads {torch.get_num_threads()}")
    return table
