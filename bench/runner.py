"""One run: build it, train it in the harness's loop on Lightning Fabric (bench.loop), save it,
evaluate it, and return its result row.

The suite-level work (what to skip, where each run goes, the summary) is bench.launch, which
calls `run_one`; nothing here imports it."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from bench.defaults import CHECKPOINT_EVERY_STEPS
from bench.errors import UserError
from bench.evaluate import EvalSettings, evaluate, explain_evaluation_error
from bench.extractor import get_extractor
from bench.machine import ENVIRONMENT_COLUMNS, hardware, versions
from bench.loop import (WARMUP_BATCHES, Diverged, LoopSettings, ManualStepDDP, Run,
                        apply_net_options, configured_optimizers, fit, rank_seed,
                        save_atomically, throughput)
from bench.plots import save_run_grids
from bench.metrics import DETAILS, DIRECTIONS, PROVENANCE_COLUMNS
from bench.suite import RunSpec, Suite
from bench.tracking import finish_run_logging, make_logger
from datamodules import ImageDataModule
from modules import MODELS
from modules.nets import count_parameters

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """How each run trains; the same for every launcher."""

    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    wandb_mode: str = "disabled"
    checkpoint_every: int = CHECKPOINT_EVERY_STEPS
    force: bool = False
    progress: bool = False
    warmup_batches: int = WARMUP_BATCHES  # before the throughput clock starts

    @property
    def multi_process(self) -> bool:
        return self.strategy == "ddp" or self.devices not in (1, "1") or self.num_nodes > 1


def git_commit() -> str:
    """The commit of the genbench checkout, with -dirty when it has uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if commit and dirty.strip() else (commit or "unknown")


def reset_peak_memory(device: torch.device) -> str:
    """Start this run's peak-memory window; returns its scope: "run", or "process" where the
    kernel does not let a process reset its peak (then the figure covers earlier runs too)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "run"
    try:  # Linux >= 4.0: "5" sets the peak resident set size (VmHWM) to the current one
        Path("/proc/self/clear_refs").write_text("5")
        return "run"
    except OSError:
        return "process"


def peak_memory_mb(device: torch.device) -> float:
    """GPU: peak allocated by torch on the device since `reset_peak_memory`. CPU: the process's
    peak resident set (VmHWM) since then, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(spec: RunSpec, image_shape):
    """The run's model: its parameters on the data's image shape, with the run's seed unless
    the parameters set one."""
    return MODELS[spec.model](**{"seed": spec.seed, **spec.params, "image_shape": image_shape})


def resumable_checkpoint(ckpt_dir: Path) -> dict | None:
    """The run's last checkpoint (bench.loop.Run.state), if it loads as plain tensors and
    numbers; a file cut short by a kill, or one that is not ours, is set aside as
    last.ckpt.unreadable and the run starts afresh."""
    path = ckpt_dir / "last.ckpt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["progress"]["batches"]  # noqa: B018 - a checkpoint of bench.loop's shape
    except Exception as err:  # a torn write fails in pickle, zip or torch's own checks
        log.info(f"  {path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:160]});"
                 f" set aside as {path.name}.unreadable, starting the run afresh")
        try:
            os.replace(path, path.with_name(path.name + ".unreadable"))
        except OSError:  # another rank set it aside first
            pass
        return None
    return state


def evaluation_device(accelerator: str) -> torch.device:
    """Where a checkpoint is evaluated outside a Trainer."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def safe_evaluate(model, dm, settings: EvalSettings, seed: int,
                  generate_here: bool) -> tuple[dict, str | None, dict]:
    """Evaluate a trained model: (figures, None, image grids). An evaluation that raises
    (weights missing, out of memory, a bug) gives ({}, the error explained, {}), never a lost
    run: the trained checkpoint is already on disk, and the next `bench run` evaluates it
    again."""
    extractor = None
    if generate_here and model.family.samples and settings.generation:
        def extractor():
            return get_extractor(settings.features, dm, settings.extractor_epochs,
                                 settings.extractor_weights, settings.inception_weights)
    try:
        metrics, grids = evaluate(model, dm, settings, extractor, seed=seed)
    except Exception as err:  # noqa: BLE001 - every failure is recorded, the suite goes on
        message = explain_evaluation_error(err, settings)
        log.info(f"  evaluation failed: {message}")
        return {}, message, {}
    return metrics, None, grids


def evaluate_checkpoint(spec: RunSpec, checkpoint: Path, settings: EvalSettings,
                        accelerator: str = "auto") -> tuple[dict, str | None, dict]:
    """Evaluate a run's final checkpoint without training, in this process (evaluation does
    not depend on the device count); returns what `safe_evaluate` returns."""
    device = evaluation_device(accelerator)
    dm = ImageDataModule(spec.dataset, seed=spec.seed, **spec.data)
    dm.setup()
    try:  # weights_only: a checkpoint's pickle cannot run code
        model = MODELS[spec.model].load_from_checkpoint(checkpoint, map_location=device,
                                                        weights_only=True)
    except Exception as err:  # a torn file, another program's, or one that would run code
        reason = str(err).strip().split("\n")[0][:160]
        raise UserError(f"{checkpoint}: not a {MODELS[spec.model].__name__} checkpoint that "
                         f"loads as plain tensors ({type(err).__name__}: {reason}); refused. "
                         "Rerun the run with bench run --force to train it again") from err
    return safe_evaluate(model.eval(), dm, settings, spec.seed, generate_here=True)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# A row's columns that RunResult keeps as its own fields (they name the run and say what became
# of it), and those of the machine that made the figures.
NAMING_COLUMNS = {"suite", "model", "variant", "dataset", "seed", "config_hash", "status", "entry",
                  "sweep_index", "config", "error", "diverged_step", "resumed_step", "git_commit",
                  "trained_commit", "timestamp", "checkpoint", "evaluated_from"}
MACHINE_COLUMNS = set(ENVIRONMENT_COLUMNS)


# Declared figures and provenance columns that training measures, not the evaluation
TRAINING_FIGURES = {"train_img_per_s", "wall_s", "peak_mem_mb", "device", "devices"}


def figure_columns() -> set[str]:
    """The evaluation's columns: every declared metric (a family may declare one at any time),
    its details and provenance, but the machine's, the data's and the training's."""
    return ((set(DIRECTIONS) | set(DETAILS) | PROVENANCE_COLUMNS) - MACHINE_COLUMNS
            - TRAINING_FIGURES - {"data_md5"})


@dataclass
class RunResult:
    """What one run gave, built in one place: `run_one` (trained and evaluated) or
    `evaluated_again` (a trained run's checkpoint evaluated anew). `to_row()` is its row of the
    results table, which is how everything after the run reads it; `from_row` reads a row back
    (`from_row(r).to_row() == r`, key order aside)."""

    spec: RunSpec
    suite: str
    diverged_step: int | None = None  # training diverged at this batch: nothing was evaluated
    error: str | None = None  # the evaluation failed, and why (the checkpoint is kept)
    resumed_step: int | None = None  # the batch a stopped or killed run resumed at
    data: dict[str, Any] = field(default_factory=dict)  # the files (ImageDataModule.provenance)
    figures: dict[str, Any] = field(default_factory=dict)  # the evaluation's (bench.metrics)
    training: dict[str, Any] = field(default_factory=dict)  # throughput, memory, steps, devices
    machine: dict[str, Any] = field(default_factory=dict)  # the figures' hardware, versions
    commit: str = "unknown"  # the figures' commit
    trained_commit: str | None = None  # the training's, when it is another evaluation's
    checkpoint: str | None = None
    evaluated_from: str | None = None  # bench eval: the config hash of the run evaluated again
    timestamp: str = field(default_factory=utc_now)

    @property
    def status(self) -> str:
        if self.diverged_step is not None:
            return "diverged"
        return "eval_failed" if self.error is not None else "ok"

    def to_row(self) -> dict[str, Any]:
        spec = self.spec
        row = {"suite": self.suite, "model": spec.model, "variant": spec.variant,
               "dataset": spec.dataset, "seed": spec.seed, "config_hash": spec.config_hash,
               "status": self.status, "diverged_step": self.diverged_step}
        if spec.sweep_index is not None:  # a sweep's point: its entry, and its place on the curve
            row |= {"entry": spec.entry, "sweep_index": spec.sweep_index}
        row |= self.data
        optional = {"resumed_step": self.resumed_step, "error": self.error}
        row |= {k: v for k, v in optional.items() if v is not None}
        row |= self.figures | self.training | self.machine
        if self.trained_commit is not None:
            row["trained_commit"] = self.trained_commit
        row |= {"git_commit": self.commit, "timestamp": self.timestamp,
                "config": json.dumps(spec.config(), sort_keys=True)}
        optional = {"checkpoint": self.checkpoint, "evaluated_from": self.evaluated_from}
        return row | {k: v for k, v in optional.items() if v is not None}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunResult:
        given = {k: v for k, v in row.items() if v is not None and v == v}  # NaN: an empty cell
        integer = lambda k: None if k not in given else int(given[k])  # noqa: E731
        figures, own = figure_columns(), NAMING_COLUMNS | MACHINE_COLUMNS
        return cls(
            spec=RunSpec.from_row(row), suite=str(given.get("suite", "")),
            diverged_step=integer("diverged_step"), error=given.get("error"),
            resumed_step=integer("resumed_step"),
            data={k: v for k, v in given.items() if k.startswith("data_")},
            figures={k: v for k, v in given.items() if k in figures},
            machine={k: v for k, v in given.items() if k in MACHINE_COLUMNS},
            training={k: v for k, v in given.items()
                      if k not in own and k not in figures and not k.startswith("data_")},
            commit=str(given.get("git_commit", "unknown")),
            trained_commit=given.get("trained_commit"), checkpoint=given.get("checkpoint"),
            evaluated_from=given.get("evaluated_from"),
            timestamp=str(given.get("timestamp", "")))

    def evaluated_again(self, spec: RunSpec, figures: dict, error: str | None, commit: str,
                        device: torch.device, evaluated_from: str | None = None) -> RunResult:
        """This trained run with a new evaluation on `device` (of `spec`: its settings may
        differ): the training's figures kept, the evaluation's and the machine's new, each
        commit named."""
        return dataclasses.replace(
            self, spec=spec, figures=figures, error=error,
            machine=hardware(device) | versions(), commit=commit,
            trained_commit=self.trained_commit or self.commit, evaluated_from=evaluated_from,
            timestamp=utc_now())


class Stopped(RuntimeError):
    """A run stopped by a signal after writing its resumable checkpoint: nothing is recorded
    as finished, and the next bench run resumes it at that batch."""

    def __init__(self, signum: int, run_id: str, batch: int, checkpoint: Path) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: {run_id} stopped after batch {batch}, with a "
                         f"resumable checkpoint in {checkpoint}; run the same bench run again "
                         "to resume it there")
        self.signum = signum


class StopSignals:
    """SIGTERM and SIGUSR1 (what SLURM and submitit send before a time limit or on preemption;
    and SIGUSR2, submitit's own) and SIGINT (Ctrl-C) ask the run under way to finish its batch,
    write a resumable checkpoint there and stop. A second Ctrl-C stops at once, as Python's
    own KeyboardInterrupt. A handler that was there before ours (submitit's, in a SLURM job)
    is called once our checkpoint is written: submitit then requeues the job."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        self.signum = None  # a new suite: an earlier stop's signal is handled
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None and signum not in self.previous:
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # Ctrl-C again: no waiting for the checkpoint
        if signum == signal.SIGINT and self.signum is None:
            print("Ctrl-C: finishing the batch and writing a resumable checkpoint (Ctrl-C "
                  "again stops at once)", file=sys.stderr, flush=True)
        self.signum = signum

    def requested(self) -> bool:
        return self.signum is not None

    def hand_on(self) -> None:
        """After the checkpoint: the earlier handler of the signal (submitit's requeue), if
        any; it does not return when it exits the job."""
        previous = self.previous.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)


STOP = StopSignals()


def build_fabric(spec: RunSpec, options: RunOptions, settings: LoopSettings,
                 logger) -> L.Fabric:
    """The run's Fabric: devices, strategy and precision from the run's options. Several
    processes train through ManualStepDDP, with a short collective timeout when asked (a
    mismatch then fails instead of hanging) and unused-parameter search where the family needs
    it (see modules/gan.py)."""
    strategy = options.strategy
    if strategy == "ddp" or (strategy == "auto" and options.multi_process):
        timeout = timedelta(seconds=int(os.environ.get("GENBENCH_DDP_TIMEOUT_S", "1800")))
        strategy = ManualStepDDP(timeout=timeout, find_unused_parameters=MODELS[
            spec.model].ddp_find_unused_parameters)
    return L.Fabric(accelerator=options.accelerator, devices=options.devices, strategy=strategy,
                    num_nodes=options.num_nodes, precision=settings.precision or "32-true",
                    loggers=[logger] if logger is not None else None)


def build_run(spec: RunSpec, fabric: L.Fabric, settings: LoopSettings, ckpt_dir: Path,
              fresh: bool) -> tuple[Run, ImageDataModule, int | None]:
    """Data on the training device, the model seeded from the run's seed, set up with Fabric,
    and its state from last.ckpt when there is one (unless `fresh`). Returns the run, its data
    and the batch it resumed at (None: a fresh start)."""
    L.seed_everything(spec.seed, verbose=False)
    dm = ImageDataModule(spec.dataset, seed=spec.seed, **spec.data)
    dm.place(fabric.device, fabric.global_rank, fabric.world_size)
    dm.setup()
    model = build_model(spec, dm.image_shape)
    apply_net_options(model, settings.channels_last, settings.compile)
    optimizers, schedules = configured_optimizers(model)
    wrapped, *optimizers = fabric.setup(model, *optimizers)
    train_batches = dm.train_dataloader()
    budget = spec.budget
    total = budget["steps"] if "steps" in budget else budget["epochs"] * len(train_batches)
    run = Run(fabric, wrapped, optimizers, schedules, train_batches,
              dm.val_dataloader() if len(dm.val_images) else None, total, settings,
              ckpt_dir / "last.ckpt")
    if fresh and fabric.is_global_zero:
        if (ckpt_dir / "last.ckpt").is_file():
            log.info(f"  --force: starting over; the checkpoint {ckpt_dir / 'last.ckpt'} is "
                     "discarded")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    fabric.barrier()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = None if fresh else resumable_checkpoint(ckpt_dir)
    if state is not None:
        run.load(state)
        log.info(f"  resuming from {run.checkpoint} (step {run.progress.batches})")
        return run, dm, run.progress.batches
    if fabric.global_rank > 0:
        # Every rank was seeded alike, so that all build the same model; from here each draws
        # its own noise (GAN latents, VAE samples, input masks), rank zero a single process's.
        torch.manual_seed(rank_seed(spec.seed, fabric.global_rank))
    return run, dm, None


def final_checkpoint(model) -> dict:
    """What Lightning's `load_from_checkpoint` reads: the weights and the constructor's
    arguments (plain types, so that it loads with weights_only)."""
    return {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": L.__version__}


def trained_for(epochs, steps) -> str:
    """'after 3 epochs (1,407 steps)', the words under a run's image grids."""
    if epochs is None or steps is None or epochs != epochs or steps != steps:  # NaN: unknown
        return ""
    epochs, steps = int(epochs), int(steps)
    return f"after {epochs} epoch{'s' if epochs != 1 else ''} ({steps:,} steps)"


def run_one(spec: RunSpec, suite: Suite, out_dir: Path, options: RunOptions,
            commit: str = "unknown", trained: RunResult | None = None) -> RunResult:
    """Train and evaluate one spec; returns its result (status ok, diverged or eval_failed).
    The run saves a checkpoint every `options.checkpoint_every` batches and resumes from it
    when rerun, unless `options.force` asks for a new start. With `trained`, the result of a
    run whose evaluation failed, its final checkpoint is evaluated again, without training."""
    ckpt_dir = out_dir / "checkpoints" / spec.config_hash
    final = ckpt_dir / "final.ckpt"
    settings = EvalSettings.from_dict(spec.eval)
    if trained is not None and final.is_file() and not options.force:
        log.info(f"  trained already ({final}): evaluating it again, no training")
        figures, error, grids = evaluate_checkpoint(spec, final, settings, options.accelerator)
        if rank_zero_only.rank == 0:
            save_run_grids(grids, out_dir / "plots", spec.run_id,
                           trained_for(trained.training.get("epochs"),
                                       trained.training.get("steps")))
        return trained.evaluated_again(spec, figures, error, commit,
                                       evaluation_device(options.accelerator))
    start = time.perf_counter()
    loop_settings = LoopSettings.from_suite(spec.trainer,
                                            checkpoint_every=options.checkpoint_every,
                                            warmup_batches=options.warmup_batches)
    logger = make_logger(suite.wandb.get("project", "genbench"),
                         suite.wandb.get("group", suite.name), spec.run_id, out_dir,
                         options.wandb_mode,
                         {**spec.config(), "suite": suite.name, "config_hash": spec.config_hash})
    # build
    fabric = build_fabric(spec, options, loop_settings, logger)
    fabric.launch()
    result = RunResult(spec, suite.name, commit=commit, checkpoint=str(final),
                       training={"peak_mem_scope": reset_peak_memory(fabric.device)})
    run, dm, result.resumed_step = build_run(spec, fabric, loop_settings, ckpt_dir, options.force)
    result.data = dm.provenance()
    model = run.module.module
    # train
    try:
        fit(run, progress_bar=options.progress, stop_requested=STOP.requested)
        if STOP.requested():
            log.info(f"  stopped by {signal.Signals(STOP.signum).name} after batch "
                          f"{run.progress.batches}: resumable checkpoint {run.checkpoint}")
            STOP.hand_on()
            raise Stopped(STOP.signum, spec.run_id, run.progress.batches, run.checkpoint)
        model.finish_training(dm)
    except Diverged as err:
        log.info(f"  diverged: {err}")
        result.diverged_step = err.step
    # save: the final state (with the AE's latent mixture), for re-evaluation
    save_atomically(fabric, final, final_checkpoint(model))
    # evaluate: generation metrics once, on rank zero, from all the samples
    images: dict[str, Path] = {}
    if result.status == "ok":
        result.figures, result.error, grids = safe_evaluate(
            model, dm, settings, spec.seed, generate_here=fabric.is_global_zero)
        if fabric.is_global_zero:
            images = save_run_grids(grids, out_dir / "plots", spec.run_id,
                                    trained_for(run.progress.epoch, run.progress.batches))
    result.training |= throughput(fabric, run.progress, peak_memory_mb(fabric.device)) | {
        "steps": run.progress.batches, "epochs": run.progress.epoch,
        "params": count_parameters(model), "wall_s": time.perf_counter() - start,
        "device": (torch.cuda.get_device_name(fabric.device)
                   if fabric.device.type == "cuda" else "cpu"),
        "devices": fabric.world_size, "num_nodes": options.num_nodes}
    result.machine, result.timestamp = hardware(fabric.device) | versions(), utc_now()
    if fabric.is_global_zero:
        finish_run_logging(logger, result.to_row(), images)
    return result
