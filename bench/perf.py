"""`bench perf`: training throughput of the harness against a plain PyTorch loop.

For each family and backbone, three feeds of the same nets and the same batches:
  plain    a hand-written PyTorch loop over the tensor batches (the reference);
  harness  the harness's path: lightning.Trainer over the ImageDataModule's tensor batches;
  loader   the same Trainer fed by torch.utils.data.DataLoader(TensorDataset), the usual route.
harness/plain shows Lightning's overhead (target >= 0.95); loader/harness shows what the data
path saves. Each figure is the best of `repeats` runs of `steps` steps after `warmup` steps,
the three feeds interleaved so that a busy machine slows them alike.
"""

from __future__ import annotations

import time

import lightning as L
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning.pytorch.callbacks import TQDMProgressBar

from bench.callbacks import PROGRESS_REFRESH_STEPS, TrainThroughput
from bench.runner import optimizer_steps
from datamodules import ImageDataModule, TensorBatches
from modules import MODELS

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

    opt_g, opt_d = (torch.optim.Adam(net.parameters(), lr=model.hparams.lr,
                                     betas=tuple(model.hparams.betas))
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
                 trainer_args: dict) -> float:
    throughput = TrainThroughput(warmup_batches=warmup)
    max_steps = optimizer_steps(model, warmup + steps)
    callbacks = [throughput]
    if trainer_args.get("enable_progress_bar"):
        callbacks.append(TQDMProgressBar(refresh_rate=PROGRESS_REFRESH_STEPS))
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=max_steps, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
                        **trainer_args)
    trainer.fit(model, train_dataloaders=train_batches)
    return throughput.images_per_second


def run_perf(families: list[str], backbones: list[str], dataset: str = "fashion_mnist",
             batch_size: int = 128, steps: int = 200, warmup: int = 20, repeats: int = 3,
             accelerator: str = "auto", progress_bar: bool = True, log=print) -> pd.DataFrame:
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers).*")
    dm = ImageDataModule(dataset, batch_size=batch_size, val_size=0)
    dm.setup()
    probe = L.Trainer(accelerator=accelerator, devices=1, logger=False)
    device = probe.strategy.root_device
    images = dm.train_images.to(device)
    labels = dm.train_labels.to(device)
    # The harness's trainer settings that matter for speed, as bench run sets them.
    trainer_args = {"enable_progress_bar": progress_bar, "log_every_n_steps": 50}
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
                                            trainer_args)
                    else:
                        # The usual route: float images in a TensorDataset, collated per item.
                        dataset_ = TensorDataset(images.float().div(255).cpu(), labels.cpu())
                        loader = DataLoader(dataset_, batch_size=batch_size, shuffle=True,
                                            drop_last=True)
                        rate = time_trainer(model, loader, steps, warmup, accelerator,
                                            trainer_args)
                    best[feed] = max(best[feed], rate)
            record = {"family": family, "backbone": backbone,
                      "plain_img_per_s": best["plain"], "harness_img_per_s": best["harness"],
                      "loader_img_per_s": best["loader"],
                      "harness_vs_plain": best["harness"] / best["plain"],
                      "loader_vs_harness": best["loader"] / best["harness"]}
            records.append(record)
            log(f"{family:>4} {backbone:<5} plain {best['plain']:>9,.0f}  harness "
                f"{best['harness']:>9,.0f}  loader {best['loader']:>9,.0f} img/s  "
                f"harness/plain {record['harness_vs_plain']:.3f}  "
                f"loader/harness {record['loader_vs_harness']:.3f}")
    table = pd.DataFrame(records)
    log(f"\ndevice {device}, batch {batch_size}, {steps} steps after {warmup} warm-up, best of "
        f"{repeats}, torch threads {torch.get_num_threads()}")
    return table
