"""Callbacks the harness adds to every Trainer: throughput, divergence, and GPU net options;
and two settings that keep Lightning from slowing every optimiser step: a process setting on CPU
hosts, and a profiler that costs nothing when no profiling is asked for."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.profilers import PassThroughProfiler

from datamodules.image import is_chunk
from modules.steps import first_tensor

PROGRESS_REFRESH_STEPS = 20


def drop_failing_nvml_check() -> bool:
    """Unset PYTORCH_NVML_BASED_CUDA_CHECK where NVML cannot be loaded; True if it was unset.

    Lightning sets the variable on import so that torch.cuda.is_available() asks NVML instead of
    initialising CUDA (which would break forked workers). torch.optim.Adam asks
    torch.accelerator.current_accelerator(check_available=True) on every step, and on a host
    without the NVIDIA driver each ask dlopens libnvidia-ml.so.1, fails, and falls back to the
    CUDA runtime's count, uncached: about 90 us per optimiser step on a 2-core CPU, 6% of an MLP
    step (a plain PyTorch script, which does not import Lightning, never pays it). Without NVML
    the variable changes no answer, so it goes; with NVML (GPU hosts) it stays."""
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        return False
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
        return True
    return False


class NoProfiler(PassThroughProfiler):
    """Lightning's default profiler (which records nothing), with a `profile` context that
    costs nothing. Lightning opens `profile(...)` around every hook of every callback and of the
    module, about 15 times per optimiser step, and the default's is a generator-based context
    manager: measured on the 2-core CPU (one-weight model, 50 steps per Trainer step, best of 3),
    411 us per step with it, 393 us with this. Runs use it unless their suite names a profiler
    (`trainer: {profiler: simple}`), which then records as usual."""

    _nothing = contextlib.nullcontext()

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return self._nothing


class Diverged(RuntimeError):
    def __init__(self, step: int, values: dict[str, float | str]) -> None:
        super().__init__(f"non-finite training loss at step {step}: {values}")
        self.step = step


def trained_in_call(outputs) -> torch.Tensor | None:
    """The losses a training step returned: one per batch it trained (a chunk's batches, or
    one), or None."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return loss.detach().reshape(-1) if isinstance(loss, torch.Tensor) else None


class DivergenceGuard(L.Callback):
    """Stops a run whose training loss turns NaN or infinite, naming the training step (the
    run-wide count of batches, 1-based, as budgets count steps) of the first non-finite loss,
    whatever the steps per Trainer step. The losses are kept on the device and looked at every
    `every_n_batches` batches and at each epoch's end: one host sync per look, not per step.
    Under DDP the ranks look at the same batches and decide together (the first non-finite
    batch of any rank): a rank that stopped alone would leave the others waiting in their next
    gradient all-reduce until the collective timeout."""

    NONE = torch.iinfo(torch.long).max  # no non-finite batch

    def __init__(self, every_n_batches: int = 50) -> None:
        self.every_n_batches = every_n_batches
        self.pending: list[tuple[int, torch.Tensor]] = []  # (first batch index, its losses)

    def _check(self, trainer) -> None:
        if not self.pending:
            return
        losses = torch.cat([values for _, values in self.pending])
        indices = torch.cat([torch.arange(first, first + len(values), device=losses.device)
                             for first, values in self.pending])
        self.pending = []
        first_bad = torch.where(torch.isfinite(losses), self.NONE, indices).min()
        if trainer.world_size > 1:
            first_bad = trainer.strategy.reduce(first_bad, reduce_op="min")
        first_bad = int(first_bad)  # the host sync
        if first_bad != self.NONE:
            here = losses[indices == first_bad]
            value = float(here[0]) if len(here) else "on another rank"
            raise Diverged(first_bad + 1, {"loss": value})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        losses = trained_in_call(outputs)
        if losses is None or not len(losses):
            return
        first = pl_module.first_batch_index(batch)
        self.pending.append((first, losses))
        every = self.every_n_batches
        if (first + len(losses)) // every > first // every:
            self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer)


class TrainThroughput(L.Callback):
    """Training images per second after `warmup_batches` batches, validation time excluded.
    Hand-written: Lightning's ThroughputMonitor synchronises the device and logs every step,
    and we want one number per run from two synchronisations."""

    def __init__(self, warmup_batches: int = 20) -> None:
        self.warmup_batches = warmup_batches
        self.batches = self.images = 0
        self.start: float | None = None
        self.end: float | None = None  # stays None when training stops on an exception
        self.paused = 0.0
        self._pause_start: float | None = None

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batches >= self.warmup_batches and self.start is None:
            self._sync(pl_module)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if is_chunk(batch):  # a chunk cut short by the step budget trains only its first ones
            losses = trained_in_call(outputs)
            batches = len(batch) if losses is None else len(losses)
            images = batches * batch.source.batch_size  # training batches are full
        else:
            batches, images = 1, len(first_tensor(batch))
        self.batches += batches
        if self.start is not None:
            self.images += images
    def on_validation_start(self, trainer, pl_module) -> None:
        if self.start is not None and not trainer.sanity_checking:
            self._sync(pl_module)
            self._pause_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._pause_start is not None:
            self.paused += time.perf_counter() - self._pause_start
            self._pause_start = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Training time after warm-up, validation excluded (NaN if it never ended)."""
        if self.start is None or self.end is None:
            return float("nan")
        return self.end - self.start - self.paused

    @property
    def images_per_second(self) -> float:
        """This process's rate; a DDP run's rate is the sum over ranks (bench.runner)."""
        if not self.images:
            return float("nan")
        return self.images / self.seconds


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random stream in a DDP run of seed `seed` (rank >= 1; rank zero
    goes on with the stream a single process has)."""
    return (seed * 1_000_003 + rank) % 2**63


class RandomState(L.Callback):
    """torch's random state in every checkpoint, restored on resume, so that a resumed run draws
    the noise an uninterrupted one would (GAN latents, VAE samples, input masks, the gradient
    penalty's mixing). Lightning checkpoints no random state of its own.

    Under DDP every rank was seeded alike (so that they build the same model), and would then
    draw the same noise: the same GAN latents on every rank, i.e. one rank's worth of distinct
    fakes per step however many ranks. So at the start of training each rank above zero reseeds
    from the run's seed and its rank, and the checkpoint keeps every rank's state (CPU, and its
    own GPU's), each rank taking back its own."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.trainer: L.Trainer | None = None
        self.restored = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.trainer = trainer

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.global_rank > 0 and not self.restored:  # a resumed rank has its state back
            torch.manual_seed(rank_seed(self.seed, trainer.global_rank))

    def state_dict(self) -> dict:
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        states = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(device)
        if trainer is None or trainer.world_size == 1:
            return {name: [state] for name, state in states.items()}
        # Every rank comes here when a checkpoint is saved (Trainer.save_checkpoint). Each row is
        # copied out of the gathered tensor: torch.set_rng_state crashes on a view.
        return {name: [row.clone() for row in trainer.strategy.all_gather(state.to(device)).cpu()]
                for name, state in states.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.restored = True
        if isinstance(state_dict["torch"], torch.Tensor):  # one CPU state, from older checkpoints
            torch.set_rng_state(state_dict["torch"])
            return
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        torch.set_rng_state(state_dict["torch"][rank])
        if "cuda" in state_dict and trainer is not None:
            torch.cuda.set_rng_state(state_dict["cuda"][rank], trainer.strategy.root_device)


class NetOptions(L.Callback):
    """GPU speed options for the families' nets, off by default: `channels_last` memory format
    for conv nets, and `compile` (torch.compile each net in place with nn.Module.compile, which
    keeps state_dict keys, so checkpoints stay loadable without it). Mixed precision is the
    Trainer's own `precision` option."""

    NETS = ("encoder", "decoder", "generator", "discriminator")

    def __init__(self, channels_last: bool = False, compile: bool = False) -> None:
        self.channels_last, self.compile = channels_last, compile

    @property
    def enabled(self) -> bool:
        return self.channels_last or self.compile

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
        if self.compile:
            for name in self.NETS:
                net = getattr(pl_module, name, None)
                if isinstance(net, torch.nn.Module):
                    net.compile()


class PeriodicCheckpoint(L.Callback):
    """`<dirpath>/last.ckpt`, rewritten (whole or not at all) at the end of the Trainer step that
    completes each `every_n_steps`-th optimiser step (exactly at the multiple with one batch per
    Trainer step; with K, at the end of the step that crosses it), so that a killed run resumes
    from there.

    Hand-written: ModelCheckpoint(every_n_train_steps) saves only when global_step is an exact
    multiple, which K optimiser steps per Trainer step (and the GAN's two optimisers) jump
    over, and under manual optimisation it warns that it may pair weights with the wrong batch
    count. Ours saves after the Trainer step's last update, with the loader state counting the
    batches trained, and a resumed run ends bitwise equal to an uninterrupted one
    (tests/bench/test_faults.py)."""

    def __init__(self, dirpath, every_n_steps: int) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self.saved_at = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.saved_at = trainer.global_step  # a resumed run counts from its checkpoint

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, every = trainer.global_step, self.every_n_steps
        if every > 0 and step // every > self.saved_at // every:
            # Written beside and renamed: a kill mid-write leaves the previous checkpoint whole.
            partial = self.path.with_name(self.path.name + ".partial")
            trainer.save_checkpoint(partial)  # every rank calls it; rank zero writes
            if trainer.is_global_zero:
                os.replace(partial, self.path)
            self.saved_at = step
