"""The harness's training loop, on lightning.Fabric: one batch per optimiser step.

Fabric brings the devices, DDP and multi-node, precision plugins and loggers; the loop itself is
ours, because the families are small enough that a framework's cost per step is a large share of
their step (lightning.Trainer spends it on hooks and progress tracking). It reads top to bottom:

    for each epoch, for each batch of this rank's shard:
        training_step                      the family's step (bench.loop.training_step)
        every N batches: divergence look   one host sync, all ranks decide together
        every log_every_n_steps: logs      through Fabric's loggers
        every checkpoint_every: last.ckpt  everything a resumed run needs to go on bitwise
    at each epoch's end: validation (check_val_every_n_epoch), epoch-interval LR schedulers

The families stay LightningModules: under Fabric a module gets `self.optimizers()` and
`manual_backward` (through `fabric.backward`), so the same `training_step` serves `bench fit`'s
lightning.Trainer.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.fabric.strategies import DDPStrategy
from lightning.pytorch.overrides.distributed import prepare_for_backward
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt
from torch import Tensor

from bench.defaults import CHECKPOINT_EVERY_STEPS
from bench.errors import UserError, unknown_key
from bench.settings import check_settings

try:  # the values Fabric's precision takes: Lightning has no public name for the list, and with
    # it a suite's bad precision is refused when the suite loads, not when its run starts
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT as FabricPrecision
except ImportError:  # a Lightning that moved it: Fabric refuses a bad value itself, later
    FabricPrecision = str | int
from datamodules.image import stream_seed

PROGRESS_REFRESH_BATCHES = 20  # each refresh reads the loss: a host sync
DIVERGENCE_EVERY_BATCHES = 50  # a look at the losses kept on the device: one host sync
WARMUP_BATCHES = 20  # batches before the throughput clock starts (allocator, caches)


class Diverged(RuntimeError):
    def __init__(self, step: int, values: dict[str, float | str]) -> None:
        super().__init__(f"non-finite training loss at step {step}: {values}")
        self.step = step


# Suite `trainer:` keys that are gone, and what to do instead.
GONE_TRAINER_SETTINGS = {
    "steps_per_call": "it is gone: the harness's own loop on Lightning Fabric runs one batch per "
                      "optimiser step at the speed of a plain PyTorch loop, so there is nothing "
                      "left to amortise; remove the key",
}


@dataclass
class LoopSettings:
    """How the loop trains a run: the suite's `trainer:` settings (TRAINER_SETTINGS, the fields
    down to `compile`) and the harness's cadences (the rest, from bench run's options), each
    field's type what it takes (checked by bench.settings)."""

    precision: FabricPrecision | None = None  # Fabric's precision plugin (None: 32-true)
    log_every_n_steps: PositiveInt = 50  # training terms to the loggers every N batches
    check_val_every_n_epoch: PositiveInt | None = 1  # validation every N epochs (None: never)
    gradient_clip_val: NonNegativeFloat | None = None  # families with one optimiser
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"
    accumulate_grad_batches: PositiveInt = 1  # an optimiser step every N batches (one optimiser)
    channels_last: bool = False  # channels-last memory format for conv nets (a GPU option)
    compile: bool = False  # torch.compile each net in place (a GPU option; same state_dict keys)
    checkpoint_every: PositiveInt = CHECKPOINT_EVERY_STEPS
    warmup_batches: NonNegativeInt = WARMUP_BATCHES
    divergence_every: PositiveInt = DIVERGENCE_EVERY_BATCHES

    @classmethod
    def from_suite(cls, trainer: dict, **harness) -> LoopSettings:
        """The suite's `trainer:` section and the harness's options (bench run's), checked."""
        gone = [k for k in trainer if k in GONE_TRAINER_SETTINGS]
        if gone:
            raise UserError("; ".join(f"{k}: {GONE_TRAINER_SETTINGS[k]}" for k in gone))
        unknown = sorted(set(map(str, trainer)) - set(TRAINER_SETTINGS))
        if unknown:
            raise UserError(unknown_key(unknown[0], TRAINER_SETTINGS) + " (the harness's loop)")
        check_settings(cls, trainer, "trainer")
        check_settings(cls, harness, "RunOptions")
        return cls(**trainer, **harness)


# The suite's `trainer:` keys: LoopSettings' fields but the harness's own cadences
HARNESS_SETTINGS = ("checkpoint_every", "warmup_batches", "divergence_every")
TRAINER_SETTINGS = tuple(f.name for f in fields(LoopSettings) if f.name not in HARNESS_SETTINGS)


@dataclass
class Schedule:
    """An LR scheduler as Lightning's configure_optimizers describes it."""

    scheduler: torch.optim.lr_scheduler.LRScheduler
    interval: str = "epoch"  # or "step": after every optimiser step
    frequency: int = 1


def configured_optimizers(module) -> tuple[list[torch.optim.Optimizer], list[Schedule]]:
    """The optimisers and schedulers of `module.configure_optimizers()`, in the forms Lightning
    documents: one optimiser, a list or tuple of them, or a dict with "optimizer" and
    "lr_scheduler" (a scheduler, or a dict with "scheduler", "interval", "frequency").
    Hand-written: Lightning parses these inside its Trainer only."""
    configured = module.configure_optimizers()
    if isinstance(configured, torch.optim.Optimizer):
        return [configured], []
    if isinstance(configured, dict):
        schedule = configured.get("lr_scheduler")
        if schedule is None:
            return [configured["optimizer"]], []
        if not isinstance(schedule, dict):
            schedule = {"scheduler": schedule}
        return [configured["optimizer"]], [Schedule(**{k: v for k, v in schedule.items()
                                                       if k in ("scheduler", "interval",
                                                                "frequency")})]
    return list(configured), []


class ManualStepDDP(DDPStrategy):
    """Fabric's DDP, which also prepares DDP's gradient reducer before each backward of a family
    that steps its own optimisers (the GAN), as lightning.Trainer does under manual
    optimisation: such a family backpropagates inside the DDP forward (its training_step), twice
    per batch, before DDP would prepare for it, and its gradients would not be averaged."""

    def __init__(self, *args, **kwargs) -> None:
        # DDP's default, relied on: each forward takes rank 0's buffers (BatchNorm statistics,
        # spectral norm's power-iteration vectors, AuxK's and BatchTopK's counters), so that
        # every rank computes with the same ones. torch 2.13 renamed the argument (the old name
        # warns on every run); both sync the buffers at the start too
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        named = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else "broadcast_buffers")
        super().__init__(*args, **{named: True, **kwargs})

    def setup_module(self, module):
        self.ddp_module = super().setup_module(module)
        return self.ddp_module

    def backward(self, tensor: Tensor, module, *args, **kwargs) -> None:
        ddp = getattr(self, "ddp_module", None)
        if ddp is not None and not ddp.module.automatic_optimization:
            prepare_for_backward(ddp, tensor)
        super().backward(tensor, module, *args, **kwargs)


def apply_net_options(module, channels_last: bool = False, compile: bool = False) -> None:
    """GPU speed options, off by default: channels-last memory format for conv nets, and
    torch.compile of each net in place (nn.Module.compile keeps the state_dict keys, so
    checkpoints load without it). Mixed precision is Fabric's `precision`."""
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if compile:
        for name in ("encoder", "decoder", "generator", "discriminator"):
            net = getattr(module, name, None)
            if isinstance(net, torch.nn.Module):
                net.compile()


@dataclass
class Progress:
    """Where a run stands; all of it goes into the resumable checkpoint."""

    epoch: int = 0  # the epoch under way
    batch_in_epoch: int = 0  # its batches done
    batches: int = 0  # the run's batches done
    timed_images: int = 0  # throughput: images and seconds after warm-up, this rank
    timed_seconds: float = 0.0


class DivergenceWatch:
    """The training losses since the last look, kept on the device in one buffer (a list of
    the losses themselves would keep a small allocation alive per step between the step's large
    ones, and on a CPU the allocator then hands each step fresh pages). `look` finds the first
    non-finite one; under DDP the ranks decide together (the first of any rank), since a rank
    that stopped alone would leave the others waiting in their next all-reduce."""

    NONE = torch.iinfo(torch.long).max

    def __init__(self, fabric: L.Fabric, size: int = DIVERGENCE_EVERY_BATCHES) -> None:
        self.fabric = fabric
        self.values = torch.empty(size, device=fabric.device)
        self.first_index = self.count = 0

    def add(self, index: int, loss: Tensor) -> None:
        if self.count == len(self.values):
            self.look()
        if self.count == 0:
            self.first_index = index
        self.values[self.count].copy_(loss.detach())
        self.count += 1

    def look(self) -> None:
        losses = self.values[: self.count]
        indices = torch.arange(self.first_index, self.first_index + self.count,
                               device=losses.device)
        self.count = 0
        first_bad = torch.where(torch.isfinite(losses), self.NONE, indices).min() \
            if len(losses) else torch.tensor(self.NONE, device=losses.device)
        if self.fabric.world_size > 1:
            first_bad = self.fabric.all_reduce(first_bad, reduce_op="min")
        first_bad = int(first_bad)  # the host sync
        if first_bad != self.NONE:
            here = losses[indices == first_bad]
            raise Diverged(first_bad + 1, {"loss": float(here[0]) if len(here)
                                           else "on another rank"})


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random stream in a DDP run of seed `seed` (rank >= 1; rank zero
    goes on with the stream a single process has)."""
    return stream_seed(seed, "rank", rank)


def random_states(fabric: L.Fabric) -> dict[str, list[Tensor]]:
    """torch's random state of every rank (CPU, and its own GPU's), for the checkpoint: every
    rank calls this; each row is copied out of the gathered tensor (torch.set_rng_state
    crashes on a view)."""
    states = {"torch": torch.get_rng_state()}
    if fabric.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(fabric.device)
    if fabric.world_size == 1:
        return {name: [state] for name, state in states.items()}
    return {name: [row.clone() for row in fabric.all_gather(state.to(fabric.device)).cpu()]
            for name, state in states.items()}


def restore_random_state(fabric: L.Fabric, states: dict[str, list[Tensor]]) -> None:
    rank = fabric.global_rank
    torch.set_rng_state(states["torch"][rank])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"][rank], fabric.device)


def save_atomically(fabric: L.Fabric, path: Path, state: dict) -> None:
    """fabric.save to a file beside `path`, renamed over it: a kill mid-write leaves the previous
    file whole. Every rank calls it; rank zero writes."""
    partial = path.with_name(path.name + ".partial")
    try:
        fabric.save(partial, state)
    except OSError as err:  # a full disk, most often
        partial.unlink(missing_ok=True)
        kept = "the previous one is whole" if path.exists() else "there was none before"
        raise OSError(err.errno, f"{path}: the checkpoint could not be written "
                      f"({err.strerror or err}); {kept}: free the space and run bench run "
                      "again") from err
    if fabric.is_global_zero:
        os.replace(partial, path)
    fabric.barrier()


@dataclass
class Run:
    """What one run trains: the Fabric-wrapped module, its optimisers and schedules, its
    shard of the training batches and the validation batches (None: no validation)."""

    fabric: L.Fabric
    module: object  # the module as fabric.setup returned it
    optimizers: list
    schedules: list[Schedule]
    train_batches: object  # datamodules.TensorBatches
    val_batches: object | None
    total_batches: int  # the run's budget, in training batches per rank
    settings: LoopSettings
    checkpoint: Path  # last.ckpt
    progress: Progress = field(default_factory=Progress)

    def state(self) -> dict:
        return {"module": self.module.state_dict(),
                "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.scheduler.state_dict() for s in self.schedules],
                "progress": asdict(self.progress), "random_state": random_states(self.fabric)}

    def load(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for schedule, saved in zip(self.schedules, state["schedulers"], strict=True):
            schedule.scheduler.load_state_dict(saved)
        self.progress = Progress(**state["progress"])
        restore_random_state(self.fabric, state["random_state"])


def validate(run: Run) -> dict[str, float]:
    """Each validation term averaged over the images of every rank's shard."""
    module = run.module.module  # the bare module: evaluation needs no DDP forward
    module.eval()
    sums: dict[str, Tensor] = {}
    images = 0
    with torch.no_grad():
        for i, batch in enumerate(run.val_batches):
            terms = module.validation_step(batch, i)
            n = len(batch[0])
            for name, value in terms.items():
                sums[name] = sums.get(name, 0) + value.detach().double() * n
            images += n
    module.train()
    if not sums:
        return {}
    names = sorted(sums)
    totals = torch.stack([sums[k] for k in names] + [torch.tensor(
        float(images), dtype=torch.float64, device=sums[names[0]].device)])
    if run.fabric.world_size > 1:
        totals = run.fabric.all_reduce(totals, reduce_op="sum")
    return {f"val/{k}": float(totals[j] / totals[-1]) for j, k in enumerate(names)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Training throughput: the images and seconds of the batches after `warmup` of them (counted
    from where this process started the run), into the run's progress. A host sync at each
    start and stop only."""

    def __init__(self, fabric: L.Fabric, progress: Progress, warmup: int,
                 batch_size: int) -> None:
        self.fabric, self.progress = fabric, progress
        self.warmup, self.batch_size = warmup, batch_size
        self.started_at = progress.batches
        self.since: float | None = None  # perf_counter at the start, None while stopped
        self.timed_from = 0

    def start(self) -> None:
        if self.since is None and self.progress.batches - self.started_at >= self.warmup:
            _sync(self.fabric.device)
            self.since, self.timed_from = time.perf_counter(), self.progress.batches

    def stop(self) -> None:
        if self.since is not None:
            _sync(self.fabric.device)
            self.progress.timed_seconds += time.perf_counter() - self.since
            self.progress.timed_images += ((self.progress.batches - self.timed_from)
                                           * self.batch_size)
            self.since = None


class Loop:
    """One run's training on Fabric, as Lightning's build-your-own-trainer example has it: the
    Trainer's semantics for every setting the loop takes (TRAINER_SETTINGS), each step a small
    method. Where it differs from the Trainer, and why:

    - the budget counts training batches (the Trainer's max_steps counts optimiser steps); with
      gradient accumulation the run's last batch also steps, so no gradient is left unapplied;
    - no sanity validation before training (the Trainer's num_sanity_val_steps), which would
      draw from the random stream of a family whose validation samples (the VAE);
    - the family's terms go to the loggers every log_every_n_steps batches as they are (under
      a Trainer, through `self.log`), validation's as the image-weighted mean over every rank.
    """

    def __init__(self, run: Run, progress_bar: bool = False,
                 stop_requested: Callable[[], bool] = lambda: False) -> None:
        self.run, self.fabric, self.settings = run, run.fabric, run.settings
        self.progress = run.progress
        self.per_epoch = len(run.train_batches)
        if self.per_epoch == 0:
            raise UserError(f"no full training batch on a rank: {len(run.train_batches.images)} "
                            f"images, batch_size {run.train_batches.batch_size}, "
                            f"{self.fabric.world_size} process(es); use a smaller batch_size")
        self.stop_requested = stop_requested
        self.stopped = False
        self.watch = DivergenceWatch(self.fabric, self.settings.divergence_every)
        self.clock = Clock(self.fabric, self.progress, self.settings.warmup_batches,
                           run.train_batches.batch_size)
        self.bar = None
        if progress_bar and self.fabric.is_global_zero:
            from tqdm import tqdm

            self.bar = tqdm(total=run.total_batches, initial=self.progress.batches,
                            unit="batch", dynamic_ncols=True, leave=False)

    def fit(self) -> Progress:
        """Train from where the progress stands to the budget, or until a stop is asked for."""
        self.run.module.train()
        try:
            while self.progress.batches < self.run.total_batches and self.train_epoch():
                pass
            if not self.stopped:
                self.watch.look()
        finally:
            self.clock.stop()
            if self.bar is not None:
                self.bar.close()
        return self.progress

    def train_epoch(self) -> bool:
        """The epoch under way, from its next batch; False when training ends inside it."""
        progress = self.progress
        for batch in self.run.train_batches.epoch_batches(progress.epoch,
                                                          progress.batch_in_epoch):
            self.train_batch(batch)
            if self.stopped:
                return False
            if progress.batches >= self.run.total_batches:
                break
        if progress.batch_in_epoch < self.per_epoch:  # the budget ended inside the epoch
            return False
        self.end_epoch()
        return True

    def train_batch(self, batch) -> None:
        """One batch and what follows it: the divergence look, logs, the progress bar, the
        periodic checkpoint and a stop when one is asked for."""
        progress, settings = self.progress, self.settings
        self.clock.start()
        index = progress.batches
        terms = self.training_step(batch, index)
        progress.batches += 1
        progress.batch_in_epoch += 1
        self.watch.add(index, terms["loss"])
        if progress.batches % settings.divergence_every == 0:
            self.watch.look()
        if progress.batches % settings.log_every_n_steps == 0 and self.fabric.loggers:
            self.fabric.log_dict({f"train/{k}": v.detach() for k, v in terms.items()},
                                 step=index)
        if self.bar is not None and progress.batches % PROGRESS_REFRESH_BATCHES == 0:
            loss = float(terms["loss"].detach())
            self.bar.set_postfix(loss=f"{loss:.4g}", epoch=progress.epoch, refresh=False)
            self.bar.update(progress.batches - self.bar.n)
        if settings.checkpoint_every and progress.batches % settings.checkpoint_every == 0:
            self.checkpoint()
        if self.stopping():
            self.watch.look()
            self.checkpoint()
            self.stopped = True

    def training_step(self, batch, index: int) -> dict[str, Tensor]:
        """The family's `training_step` with no host sync and, for a family Lightning would
        optimise automatically, backward (divided by `accumulate_grad_batches`, as Lightning
        divides it) and the optimiser step when it is due. A family with
        `automatic_optimization = False` (the GAN) steps its own optimisers. Returns the step's
        terms; "loss" is the one the divergence look reads."""
        module = self.run.module
        if not module.automatic_optimization:
            with self.fabric.autocast():
                return module.training_step(batch, index)
        steps_now = self.optimizer_step_due()
        with self.fabric.no_backward_sync(module, enabled=not steps_now):
            with self.fabric.autocast():
                terms = module.training_step(batch, index)
            accumulate = self.settings.accumulate_grad_batches
            self.fabric.backward(terms["loss"] / accumulate if accumulate > 1 else terms["loss"])
        if steps_now:
            self.optimizer_step()
        return terms

    def optimizer_step_due(self) -> bool:
        """After the batch under way: every `accumulate_grad_batches` batches of the epoch and
        at its last batch, as the Trainer steps, and at the run's last batch."""
        batch = self.progress.batch_in_epoch + 1  # 1-based, in the epoch
        return (batch % self.settings.accumulate_grad_batches == 0 or batch == self.per_epoch
                or self.progress.batches + 1 == self.run.total_batches)

    def optimizer_step(self) -> None:
        """Clip (by norm or by value) when asked, step, zero the gradients, and step each
        step-interval scheduler whose frequency divides the batch's 1-based index in the epoch
        (the Trainer's count)."""
        optimizer, settings = self.run.optimizers[0], self.settings
        if settings.gradient_clip_val:
            clip = {"max_norm" if settings.gradient_clip_algorithm == "norm" else "clip_val":
                    settings.gradient_clip_val}
            self.fabric.clip_gradients(self.run.module, optimizer, **clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for schedule in self.run.schedules:
            if (schedule.interval == "step"
                    and (self.progress.batch_in_epoch + 1) % schedule.frequency == 0):
                schedule.scheduler.step()

    def end_epoch(self) -> None:
        """The divergence look, validation every `check_val_every_n_epoch` epochs, the
        epoch-interval schedulers, and the next epoch."""
        progress, every = self.progress, self.settings.check_val_every_n_epoch
        self.watch.look()
        if self.run.val_batches is not None and every and (progress.epoch + 1) % every == 0:
            self.clock.stop()
            metrics = validate(self.run)
            if metrics and self.fabric.loggers:
                self.fabric.log_dict(metrics | {"epoch": progress.epoch},
                                     step=progress.batches - 1)
        for schedule in self.run.schedules:
            if schedule.interval == "epoch" and (progress.epoch + 1) % schedule.frequency == 0:
                schedule.scheduler.step()
        progress.epoch += 1
        progress.batch_in_epoch = 0

    def checkpoint(self) -> None:
        """The resumable checkpoint at this batch, off the throughput clock."""
        self.clock.stop()
        save_atomically(self.fabric, self.run.checkpoint, self.run.state())
        self.clock.start()

    def stopping(self) -> bool:
        """One process: asked after every batch. Several: the ranks decide together at each
        divergence look (one all-reduce), since a rank that stopped alone would hang the
        others; a signal may reach only some of them."""
        if self.fabric.world_size == 1:
            return self.stop_requested()
        if self.progress.batches % self.settings.divergence_every:
            return False
        flag = torch.tensor(float(self.stop_requested()), device=self.fabric.device)
        return bool(self.fabric.all_reduce(flag, reduce_op="max"))


def fit(run: Run, progress_bar: bool = False,
        stop_requested: Callable[[], bool] = lambda: False) -> Progress:
    """Train `run` from where its progress stands to its budget (`Loop`). Raises Diverged at the
    first non-finite loss (every rank together). `stop_requested` is asked after each batch
    (under DDP, every divergence_every batches, all ranks together): when it says yes, the loop
    writes a resumable checkpoint at that batch and returns early."""
    return Loop(run, progress_bar, stop_requested).fit()


def throughput(fabric: L.Fabric, progress: Progress, peak_mb: float) -> dict[str, float]:
    """The run's figures over all its processes: training images per second = all ranks'
    images over the slowest rank's time, and the largest peak memory of any rank."""
    local = torch.tensor([progress.timed_images, progress.timed_seconds, peak_mb],
                         dtype=torch.float64, device=fabric.device)
    every = fabric.all_gather(local).reshape(-1, 3) if fabric.world_size > 1 else local[None]
    images, seconds, peak = every[:, 0].sum(), every[:, 1].max(), every[:, 2].max()
    rate = float(images / seconds) if images > 0 and seconds > 0 else math.nan
    return {"train_img_per_s": rate, "peak_mem_mb": float(peak)}
