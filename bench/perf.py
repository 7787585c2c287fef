"""`bench perf`: training throughput of the harness against a plain PyTorch loop.

For each family and backbone, four feeds of the same nets and the same batches:
  plain       a hand-written PyTorch loop over the tensor batches (the reference);
  harness     the harness's path: lightning.Trainer with bench run's callbacks and settings over
              tensor batches, K batches (optimiser steps) per Trainer step, K as `auto` picks it
              for this row (or --steps-per-call);
  harness_k1  the same at one batch per Trainer step;
  loader      a Trainer fed by torch.utils.data.DataLoader(TensorDataset), one batch per step and
              Lightning's automatic optimisation: the usual route.
harness/plain shows what the harness costs (target >= 0.95); loader/harness what the harness
saves. Each figure is the best of `repeats` runs of `steps` steps after `warmup` steps, the
feeds interleaved so that a busy machine slows them alike.

The harness's own costs do not shrink with the model, so they are measured apart, on a model
with one weight (`harness_costs_us`): per Trainer step (hook dispatch, progress tracking; shared
by its K optimiser steps) and per optimiser step (Lightning's wrapped backward and step). Each row
shows the best harness/plain they leave at its K (`ceiling`).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from bench.amortise import (ASSUMED_CALL_COST_US, OneWeight, choose_steps_per_call, time_plain,
                            worth_timing_the_model)
from bench.callbacks import DivergenceGuard, TrainThroughput
from bench.runner import (CHECKPOINT_EVERY_STEPS, harness_callbacks, harness_trainer_args,
                          optimizer_steps, prepare_run_process)
from datamodules import ImageDataModule, TensorBatches
from modules import MODELS

FAMILY_ARGS = {"ae": {}, "sae": {"sparsity": "topk", "k": 8}, "vae": {}, "gan": {}}


def time_trainer(model, train_batches, steps: int, warmup: int, accelerator: str,
                 progress_bar: bool) -> float:
    """Images per second through a Trainer set up as bench run sets one up; chunked batches
    (`steps_per_call`) train under manual optimisation, as a datamodule would arrange."""
    if getattr(train_batches, "steps_per_call", None) is not None:
        model.automatic_optimization = False
    throughput = TrainThroughput(warmup_batches=warmup)
    with tempfile.TemporaryDirectory() as ckpt_dir, warnings.catch_warnings():
        # the timed model's validation_step is unused here, as Lightning notes
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
        callbacks = harness_callbacks(throughput, DivergenceGuard(), Path(ckpt_dir),
                                      CHECKPOINT_EVERY_STEPS, progress_bar)
        trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False,
                            callbacks=callbacks, enable_progress_bar=progress_bar,
                            max_steps=optimizer_steps(model, warmup + steps), max_epochs=-1,
                            limit_val_batches=0, **harness_trainer_args())
        trainer.fit(model, train_dataloaders=train_batches)
    return throughput.images_per_second


PROBE_K = 16  # the second K the harness's costs are measured at


@dataclass
class HarnessCosts:
    """What the harness adds to a plain loop, in microseconds, measured on a one-weight model:
    `per_call` for each Trainer step (hooks, progress tracking: what K steps per call share)
    and `per_step` for each optimiser step (Lightning's wrapped backward and optimiser step,
    with their hooks: what K cannot share). From the step time at K = 1 and K = PROBE_K:
    t_K = plain + per_step + per_call / K."""

    plain_us: float
    per_call: float
    per_step: float

    def model_call_us(self, plain_img_per_s: float, k1_img_per_s: float,
                      batch_size: int) -> float:
        """A model's cost per Trainer step: its step through the harness at K = 1 less its
        plain step, less the cost per optimiser step; at least the one-weight model's."""
        excess = 1e6 * batch_size * (1 / k1_img_per_s - 1 / plain_img_per_s) - self.per_step
        return max(excess, self.per_call)


def harness_costs_us(batches, steps: int, warmup: int, repeats: int, accelerator: str,
                     device: torch.device, progress_bar: bool) -> HarnessCosts:
    """HarnessCosts, each step time the best of `repeats`. `batches` must be unchunked."""
    batch = len(next(iter(batches))[0])
    best = {"plain": 0.0, 1: 0.0, PROBE_K: 0.0}
    for _ in range(repeats):
        best["plain"] = max(best["plain"], time_plain(OneWeight(), batches, steps, warmup,
                                                      device))
        for k in (1, PROBE_K):
            chunked = TensorBatches(batches.images, batches.labels, batches.batch_size,
                                    shuffle=True, drop_last=True, steps_per_call=k)
            best[k] = max(best[k], time_trainer(OneWeight(), chunked, steps, warmup,
                                                accelerator, progress_bar))
    plain, t1 = 1e6 * batch / best["plain"], 1e6 * batch / best[1]
    if not best[PROBE_K] > 0:  # too few steps for a chunk after warm-up: all per call
        return HarnessCosts(plain, max(t1 - plain, 0.0), 0.0)
    tk = 1e6 * batch / best[PROBE_K]
    per_call = max(t1 - tk, 0.0) * PROBE_K / (PROBE_K - 1)
    return HarnessCosts(plain, per_call, max(tk - plain - per_call / PROBE_K, 0.0))


def ceiling(plain_img_per_s: float, batch_size: int, per_call_us: float,
            steps_per_call: int = 1, per_step_us: float = 0.0) -> float:
    """The best harness/plain the harness's costs allow: t / (t + per_step + per_call / K), t
    the plain step, K the optimiser steps per Trainer step."""
    plain_us = 1e6 * batch_size / plain_img_per_s
    return plain_us / (plain_us + max(per_step_us, 0.0) + max(per_call_us, 0.0) / steps_per_call)


def run_perf(families: list[str], backbones: list[str], dataset: str = "fashion_mnist",
             batch_size: int = 128, steps: int = 200, warmup: int = 20, repeats: int = 3,
             accelerator: str = "auto", progress_bar: bool = True,
             steps_per_call: int | str = "auto", log=print) -> pd.DataFrame:
    # As in bench run; it also makes the plain loop what a script without Lightning gets.
    prepare_run_process()
    dm = ImageDataModule(dataset, batch_size=batch_size, val_size=0)
    dm.setup()
    probe = L.Trainer(accelerator=accelerator, devices=1, logger=False)
    device = probe.strategy.root_device
    images = dm.train_images.to(device)
    labels = dm.train_labels.to(device)
    costs = harness_costs_us(
        TensorBatches(images, labels, batch_size, shuffle=True, drop_last=True),
        steps, warmup, repeats, accelerator, device, progress_bar)
    log(f"harness costs (a one-weight model, plain step {costs.plain_us:.0f} us): "
        f"{costs.per_call:.0f} us per Trainer step (shared by its K steps), "
        f"{costs.per_step:.0f} us per optimiser step")
    per_epoch = len(images) // batch_size
    records, calls = [], {}
    for family in families:
        for backbone in backbones:
            best = {"plain": 0.0, "harness_k1": 0.0, "harness": 0.0, "loader": 0.0}
            k = steps_per_call
            for repeat in range(repeats):
                for feed in best:
                    L.seed_everything(repeat, verbose=False)
                    model = MODELS[family](backbone=backbone, image_shape=dm.image_shape,
                                           **FAMILY_ARGS[family])
                    chunk = {"plain": None, "harness_k1": 1, "harness": k, "loader": None}[feed]
                    batches = TensorBatches(images, labels, batch_size, shuffle=True,
                                            drop_last=True, seed=repeat, steps_per_call=chunk)
                    if feed == "plain":
                        rate = time_plain(model, batches, steps, warmup, device)
                    elif feed == "loader":
                        # The usual route: float images in a TensorDataset, collated per item.
                        dataset_ = TensorDataset(images.float().div(255).cpu(), labels.cpu())
                        loader = DataLoader(dataset_, batch_size=batch_size, shuffle=True,
                                            drop_last=True)
                        rate = time_trainer(model, loader, steps, warmup, accelerator,
                                            progress_bar)
                    else:
                        rate = time_trainer(model, batches, steps, warmup, accelerator,
                                            progress_bar)
                    best[feed] = max(best[feed], rate)
                    if feed == "harness_k1" and steps_per_call == "auto" and repeat == 0:
                        # as `auto` picks it (bench.runner.measured_call_cost_us): this model's
                        # cost per Trainer step, at K = 1, where it is worth timing
                        step_us = 1e6 * batch_size / best["plain"]
                        call_us = (costs.model_call_us(best["plain"], rate, batch_size)
                                   if worth_timing_the_model(step_us)
                                   else ASSUMED_CALL_COST_US)
                        k = choose_steps_per_call(call_us, step_us, per_epoch, warmup + steps)
                        calls[family, backbone] = call_us
            call_us = calls.get((family, backbone), costs.per_call)
            record = {"family": family, "backbone": backbone, "steps_per_call": k,
                      "plain_img_per_s": best["plain"], "harness_img_per_s": best["harness"],
                      "harness_k1_img_per_s": best["harness_k1"],
                      "loader_img_per_s": best["loader"],
                      "harness_vs_plain": best["harness"] / best["plain"],
                      "harness_k1_vs_plain": best["harness_k1"] / best["plain"],
                      "loader_vs_harness": best["loader"] / best["harness"],
                      "ceiling": ceiling(best["plain"], batch_size, call_us, k, costs.per_step),
                      "per_call_us": call_us, "per_step_us": costs.per_step}
            records.append(record)
            log(f"{family:>4} {backbone:<5} K={k:<3} plain {best['plain']:>9,.0f}  harness "
                f"{best['harness']:>9,.0f}  (K=1 {best['harness_k1']:>9,.0f})  loader "
                f"{best['loader']:>9,.0f} img/s  harness/plain {record['harness_vs_plain']:.3f}"
                f"  (K=1 {record['harness_k1_vs_plain']:.3f})  ceiling {record['ceiling']:.3f}")
    table = pd.DataFrame(records)
    log(f"\ndevice {device}, batch {batch_size}, {steps} steps after {warmup} warm-up, best of "
        f"{repeats}, torch threads {torch.get_num_threads()}")
    return table
