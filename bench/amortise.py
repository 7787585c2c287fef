"""How many optimiser steps each Trainer step takes (`steps_per_call`), and how `auto` picks it.

A Trainer step costs time of its own (hooks, progress tracking, the loop's bookkeeping): 0.2-1 ms
on a 2-core CPU, more with a larger model, and more than a small MLP's whole step on a GPU.
K steps per Trainer step pay it once per K steps. `auto` takes that cost per Trainer step and the
model's plain step, both measured on a copy of the run's model before it trains
(bench.runner.measured_call_cost_us), and picks the smallest K for which the cost is at most
`TARGET_SHARE` of K steps, capped so that an epoch (and the step budget) still has `MIN_CALLS`
Trainer steps. Any K trains the same batches in the same order to the same weights
(modules/steps.py), so K changes speed only.
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from torch import Tensor, nn

from modules.steps import LossSteps

# The fixed cost's most share of a Trainer step's time. 1%, not the 3% issue 12 first asked
# for: the harness also costs time per optimiser step that K cannot share (Lightning's wrapped
# backward and step, 4-5% of an MLP step on a CPU), and the measured cost per Trainer step
# moves by a factor of two between runs on a busy machine (330-1,220 us for the same MLP rows);
# at 3% the MLP rows' harness/plain sat at 0.83-0.92, below the 0.95 target.
TARGET_SHARE = 0.01
MIN_CALLS = 8  # Trainer steps an epoch (or a step budget) keeps at least
# The Trainer's cost per Trainer step that `auto` assumes where it is not measured: under DDP,
# where a second Trainer would join the process group, for runs too short to repay the
# measurement, and for models whose step is long enough (worth_timing_the_model). About what one
# process measures for the MLP families on the 2-core CPU (bench perf), which DDP's own per-step
# work only adds to.
ASSUMED_CALL_COST_US = 1000.0


def choose_steps_per_call(call_us: float, step_us: float, batches_per_epoch: int,
                          budget_batches: int | None = None) -> int:
    """The smallest K with call / (call + K * step) <= TARGET_SHARE, i.e.
    K >= call (1 - s) / (s * step), s = TARGET_SHARE, `call` the cost of a Trainer step; at
    least 1, and at most the batches of an epoch (or of the budget, if smaller) over MIN_CALLS."""
    share = TARGET_SHARE
    if not step_us > 0:  # not measured (NaN): no basis for more than one
        return 1
    wanted = math.ceil(max(call_us, 0.0) * (1 - share) / (share * step_us))
    room = min(batches_per_epoch, budget_batches or batches_per_epoch)
    return max(1, min(wanted, room // MIN_CALLS))


def worth_timing_the_model(step_us: float) -> bool:
    """Whether `auto` should time a model's own cost per Trainer step (bench.runner
    .measured_call_cost_us): only where the assumed cost would give K > 4. The timing takes
    about 130 of the model's steps; where the assumed cost gives K <= 4 (steps of 25 ms or more,
    a conv net on a CPU) a better figure would move the run's speed by a percent or two."""
    return choose_steps_per_call(ASSUMED_CALL_COST_US, step_us, 10**6) > 4


def plain_step_fn(model):
    """One optimisation step written out in plain PyTorch, using the module's own losses: the
    reference the harness is timed against, and the step `auto` times."""
    if not hasattr(model, "discriminator"):  # one loss, one optimiser
        optimizer = torch.optim.Adam(model.parameters(), lr=model.hparams.lr)

        def step(x: Tensor) -> None:
            loss = model.losses(x)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    opt_g, opt_d = (torch.optim.Adam(net.parameters(), lr=model.lr, betas=model.betas)
                    for net in (model.generator, model.discriminator))
    counter = {"batch": 0}

    def gan_step(x: Tensor) -> None:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycle(batches):
    while True:
        yield from batches


def time_plain(model, batches, steps: int, warmup: int, device: torch.device) -> float:
    """Images per second of `plain_step_fn(model)` over `steps` batches after `warmup`."""
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


def model_step_us(module: L.LightningModule, images: Tensor, batch_size: int,
                  steps: int = 10, warmup: int = 3) -> float:
    """Microseconds per plain-loop step of a copy of `module` on the first batches of `images`
    (uint8, on the training device); the run's module, its weights and the random state are
    left as they were."""
    from datamodules.image import TensorBatches

    device = images.device
    sample = images[: batch_size * (steps + warmup)]
    batches = TensorBatches(sample, torch.zeros(len(sample), dtype=torch.long, device=device),
                            batch_size, shuffle=False, drop_last=True)
    if not len(batches):
        return float("nan")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        copy = type(module)(**module.hparams)  # its initialisation draws from the forked state
        copy.load_state_dict(module.state_dict())
        rate = time_plain(copy, batches, steps, warmup, device)
    return 1e6 * batch_size / rate


class OneWeight(LossSteps):
    """A model with a single weight: its training step is the harness's fixed cost per step."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.weight = nn.Parameter(torch.ones(()))

    def losses(self, x: Tensor) -> dict[str, Tensor]:
        return {"loss": (self.weight * x[:, 0, 0, 0]).square().mean()}


class AutoStepsPerCall(L.Callback):
    """Resolves a datamodule's `steps_per_call="auto"` at the start of fit, before the training
    batches are built, with `choose_steps_per_call` from the Trainer's cost per Trainer step
    (`call_us`, measured by the runner on the model, or assumed) and the model's plain step
    (`step_us`, timed here when not given). Under DDP every rank takes rank zero's choice. The
    choice is kept in the checkpoint, so a resumed run goes on with the K it started with (an
    epoch's chunks depend on it)."""

    def __init__(self, call_us: float, budget_batches: int | None = None) -> None:
        self.call_us, self.budget_batches = call_us, budget_batches
        self.step_us: float | None = None
        self.chosen: int | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        if getattr(datamodule, "steps_per_call", None) != "auto":
            return
        if self.chosen is None:
            batch_size = datamodule.hparams.batch_size
            if self.step_us is None:
                self.step_us = model_step_us(pl_module, datamodule.train_images, batch_size)
            per_epoch = len(datamodule.train_images) // trainer.world_size // batch_size
            self.chosen = trainer.strategy.broadcast(choose_steps_per_call(
                self.call_us, self.step_us, per_epoch, self.budget_batches))
        datamodule.steps_per_call = self.chosen

    def state_dict(self) -> dict:
        return {"steps_per_call": self.chosen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.chosen = state_dict["steps_per_call"]
