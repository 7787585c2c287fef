"""One run: train a spec with a Lightning Trainer, evaluate it, and return its result row.

The suite-level work (what to skip, where each run goes, the summary) is bench.launch, which
calls `run_one`; nothing here imports it."""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only

from bench.amortise import ASSUMED_CALL_COST_US, AutoStepsPerCall
from bench.callbacks import (PROGRESS_REFRESH_STEPS, Diverged, DivergenceGuard, NetOptions,
                             NoProfiler, PeriodicCheckpoint, RandomState, TrainThroughput,
                             drop_failing_nvml_check)
from bench.compare import PROVENANCE
from bench.evaluate import EvalSettings, evaluate, explain_evaluation_error
from bench.extractor import get_extractor
from bench.plots import save_run_grids
from bench.results import DIRECTIONS
from bench.suite import RunSpec, Suite
from bench.tracking import finish_run_logging, make_logger
from datamodules import ImageDataModule, TensorBatches
from modules import MODELS
from modules.nets import count_parameters

# Steps between resumable checkpoints. A save costs about 12 ms for the MLP families on a 2-core
# CPU: every 200 steps that was 4% of their training time, every 1000 under 1%; a crash loses at
# most 1000 steps (under 30 s for the conv families on that CPU).
CHECKPOINT_EVERY_STEPS = 1000


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


def versions() -> dict[str, str]:
    import lightning
    import torch_fidelity
    import torchmetrics

    return {"torch": torch.__version__, "lightning": lightning.__version__,
            "torchmetrics": torchmetrics.__version__, "torch_fidelity": torch_fidelity.__version__}


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


def whole_run_figures(trainer: L.Trainer, throughput: TrainThroughput,
                      peak_mb: float) -> dict[str, float]:
    """The run's figures over all its processes: training images per second = all ranks'
    images over the slowest rank's time, and the largest peak memory of any rank."""
    local = torch.tensor([throughput.images, throughput.seconds, peak_mb], dtype=torch.float64,
                         device=trainer.strategy.root_device)
    every = trainer.strategy.all_gather(local).reshape(-1, 3) if trainer.world_size > 1 \
        else local[None]
    images, seconds, peak = every[:, 0].sum(), every[:, 1].max(), every[:, 2].max()
    rate = float(images / seconds) if images > 0 and seconds > 0 else float("nan")
    return {"train_img_per_s": rate, "peak_mem_mb": float(peak)}


def build_model(spec: RunSpec, image_shape):
    cls = MODELS[spec.model]
    kwargs = {**spec.params, "image_shape": image_shape}
    if "seed" in inspect.signature(cls.__init__).parameters:
        kwargs.setdefault("seed", spec.seed)
    return cls(**kwargs)


def optimizer_steps(model, batches: int) -> int:
    """Lightning's max_steps counts optimiser steps: one per batch, except for the GAN, which
    takes a discriminator step per batch plus a generator step every n_critic batches."""
    n_critic = getattr(model, "n_critic", None)
    return batches if n_critic is None else batches + batches // n_critic


def budget_batches(spec: RunSpec) -> int:
    """Training batches the run's budget allows (an epoch budget counted without the data:
    the datasets' smallest training split, 45,000 CIFAR-10 images, over the batch size)."""
    if "steps" in spec.budget:
        return spec.budget["steps"]
    batch_size = spec.data.get("batch_size", 128)
    images = spec.data.get("train_subset") or 45_000
    return spec.budget["epochs"] * (images // batch_size)


def trainer_budget(spec: RunSpec, model) -> dict[str, int]:
    """Epochs, or steps counted as training batches."""
    if "epochs" in spec.budget:
        return {"max_epochs": spec.budget["epochs"]}
    return {"max_steps": optimizer_steps(model, spec.budget["steps"]), "max_epochs": -1}


NET_OPTIONS = ("channels_last", "compile")  # keys of a suite's `trainer:` that NetOptions takes
# Training batches (optimiser steps) per Trainer step unless a suite's `trainer:` says otherwise.
DEFAULT_STEPS_PER_CALL = "auto"
# Runs shorter than this assume the Trainer's cost (bench.amortise.ASSUMED_CALL_COST_US) rather
# than measure it.
MEASURE_FROM_BATCHES = 2000


def measured_call_cost_us(spec: RunSpec, accelerator: str, steps: int = 48,
                          warmup: int = 16) -> tuple[float, float]:
    """(Trainer cost per Trainer step, the model's plain step), microseconds, measured on a copy
    of the run's model and data: its plain-loop step, and its step through the harness at one
    batch per Trainer step, whose excess over the plain step, less Lightning's cost per
    optimiser step (bench.perf.harness_costs_us), is what K steps per call share. Measured on
    the model itself because that cost grows with it on a CPU (0.2 ms for a one-weight model,
    0.45-0.6 ms for the MLP AE, about five times for the MLP VAE; its first step in a chunk is
    no slower than the rest, so it is the Trainer's own work that slows). A step of 25 ms or more (a conv net on a CPU) is not timed through a Trainer: the
    assumed cost stands for it (bench.amortise.worth_timing_the_model). The random state is
    left as it was."""
    from bench.amortise import model_step_us, time_plain, worth_timing_the_model
    from bench.perf import harness_costs_us, time_trainer

    probe = ImageDataModule(spec.dataset, seed=spec.seed, **spec.data)
    probe.setup()
    device = L.Trainer(accelerator=accelerator, devices=1, logger=False).strategy.root_device
    images = probe.train_images.to(device)
    batch_size = probe.hparams.batch_size
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = build_model(spec, probe.image_shape)
        step_us = model_step_us(model, images, batch_size)
        if not worth_timing_the_model(step_us):
            return ASSUMED_CALL_COST_US, step_us
        costs = _HARNESS_COSTS.get(accelerator)
        if costs is None:
            generator = torch.Generator().manual_seed(0)
            noise = torch.randint(0, 256, (128 * 64, 1, 28, 28), dtype=torch.uint8,
                                  generator=generator).to(device)
            costs = _HARNESS_COSTS[accelerator] = harness_costs_us(
                TensorBatches(noise, torch.zeros(len(noise), dtype=torch.long, device=device),
                              128, shuffle=True, drop_last=True),
                steps=96, warmup=32, repeats=1, accelerator=accelerator, device=device,
                progress_bar=False)
        labels = torch.zeros(len(images), dtype=torch.long, device=device)
        n = min(len(images), batch_size * (steps + warmup))
        plain = time_plain(build_model(spec, probe.image_shape), TensorBatches(
            images[:n], labels[:n], batch_size, shuffle=True, drop_last=True), steps, warmup,
            device)
        try:
            harness = time_trainer(build_model(spec, probe.image_shape), TensorBatches(
                images[:n], labels[:n], batch_size, shuffle=True, drop_last=True,
                steps_per_call=1), steps, warmup, accelerator, progress_bar=False)
        except Diverged:  # the run itself will say so; the timing is of no use then
            return costs.per_call, 1e6 * batch_size / plain
    return costs.model_call_us(plain, harness, batch_size), 1e6 * batch_size / plain


_HARNESS_COSTS: dict = {}


def harness_trainer_args(**suite_args) -> dict:
    """The Trainer settings of every run that matter for speed (`bench perf` times the same),
    under a suite's own `trainer:` settings, which win. `enable_checkpointing=False` turns off
    only Lightning's default ModelCheckpoint; ours is PeriodicCheckpoint (harness_callbacks)."""
    return {"enable_model_summary": False, "num_sanity_val_steps": 0, "log_every_n_steps": 50,
            "enable_checkpointing": False, "profiler": NoProfiler(), **suite_args}


def harness_callbacks(throughput: TrainThroughput, guard: DivergenceGuard, ckpt_dir: Path,
                      checkpoint_every: int, progress: bool,
                      net_options: NetOptions | None = None, seed: int = 0) -> list[L.Callback]:
    """The callbacks of every run: throughput, divergence guard, a resumable checkpoint every
    `checkpoint_every` optimiser steps (<ckpt_dir>/last.ckpt) with the random state of the run
    of `seed`, GPU net options when any is on, and a progress bar that refreshes every
    PROGRESS_REFRESH_STEPS Trainer steps (each refresh costs a host sync)."""
    checkpoint = PeriodicCheckpoint(ckpt_dir, checkpoint_every)
    callbacks: list[L.Callback] = [throughput, guard, checkpoint, RandomState(seed)]
    if net_options is not None and net_options.enabled:  # each callback costs ~10 us a step
        callbacks.append(net_options)
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=PROGRESS_REFRESH_STEPS))
    return callbacks


def resumable_checkpoint(ckpt_dir: Path, log=print) -> tuple[Path, int] | None:
    """The run's last checkpoint and its step, if it loads; a file cut short by a kill is
    removed."""
    path = ckpt_dir / "last.ckpt"
    if not path.is_file():
        return None
    try:
        step = torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    except Exception as err:  # a torn write fails in pickle, zip or torch's own checks
        log(f"  {path} is unreadable ({type(err).__name__}); starting the run afresh")
        path.unlink()
        return None
    return path, step


def evaluation_device(accelerator: str) -> torch.device:
    """Where a checkpoint is evaluated outside a Trainer."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def safe_evaluate(model, dm, settings: EvalSettings, seed: int, generate_here: bool,
                  log=print) -> tuple[dict, dict]:
    """Evaluate a trained model. An evaluation that raises (weights missing, out of memory, a
    bug) gives status eval_failed and the error explained, never a lost run: the trained
    checkpoint is already on disk, and the next `bench run` evaluates it again."""
    extractor = None
    if generate_here and hasattr(model, "sample") and settings.generation:
        def extractor():
            return get_extractor(settings.features, dm, settings.extractor_epochs,
                                 settings.extractor_weights, settings.inception_weights, log=log)
    try:
        metrics, grids = evaluate(model, dm, settings, extractor, seed=seed, log=log)
    except Exception as err:  # noqa: BLE001 - every failure is recorded, the suite goes on
        message = explain_evaluation_error(err, settings)
        log(f"  evaluation failed: {message}")
        return {"status": "eval_failed", "error": message}, {}
    return {"status": "ok"} | metrics, grids


def evaluate_checkpoint(spec: RunSpec, checkpoint: Path, settings: EvalSettings,
                        accelerator: str = "auto", log=print) -> tuple[dict, dict]:
    """Evaluate a run's final checkpoint without training, in this process (evaluation does
    not depend on the device count); returns (status and metrics, image grids)."""
    device = evaluation_device(accelerator)
    dm = ImageDataModule(spec.dataset, seed=spec.seed, **spec.data)
    dm.setup()
    model = MODELS[spec.model].load_from_checkpoint(checkpoint, map_location=device)
    return safe_evaluate(model.eval(), dm, settings, spec.seed, generate_here=True, log=log)


# Columns of a row that come from evaluation (every metric but the training's figures, and
# every provenance column but the device's); the rest describe the training.
TRAINING_FIGURES = {"train_img_per_s", "wall_s", "peak_mem_mb", "device", "devices"}
EVALUATION_COLUMNS = ({"status", "error", "features_acc", "isc_std", "kid_std"}
                      | set(DIRECTIONS) | {c for cs in PROVENANCE.values() for c in cs}) \
    - TRAINING_FIGURES


def evaluated_row(trained: dict, spec: RunSpec, metrics: dict, commit: str) -> dict:
    """A row for a trained run evaluated again: the training's columns from its earlier row, the
    new evaluation's figures, and the commit of each."""
    row = {k: v for k, v in trained.items() if k not in EVALUATION_COLUMNS}
    return row | metrics | {
        "config_hash": spec.config_hash, "config": json.dumps(spec.config(), sort_keys=True),
        "trained_commit": trained.get("trained_commit", trained.get("git_commit")),
        "git_commit": commit, **versions(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def run_one(spec: RunSpec, suite: Suite, out_dir: Path, accelerator: str = "auto",
            devices: int | str = 1, wandb_mode: str = "disabled", progress: bool = False,
            commit: str = "unknown", checkpoint_every: int = CHECKPOINT_EVERY_STEPS,
            strategy: str = "auto", num_nodes: int = 1, fresh: bool = False,
            trained: dict | None = None, log=print) -> dict:
    """Train and evaluate one spec; returns its result row (status ok, diverged or
    eval_failed). The run saves a checkpoint every `checkpoint_every` steps and resumes from it
    when rerun, unless `fresh` (the --force redo) asks for a new start. With `trained`, the row
    of a run whose evaluation failed, its final checkpoint is evaluated again, without
    training."""
    final = out_dir / "checkpoints" / spec.config_hash / "final.ckpt"
    if trained is not None and final.is_file() and not fresh:
        log(f"  trained already ({final}): evaluating it again, no training")
        metrics, grids = evaluate_checkpoint(spec, final, EvalSettings.from_dict(spec.eval),
                                             accelerator, log)
        if rank_zero_only.rank == 0:
            save_run_grids(grids, out_dir / "plots", spec.run_id)
        return evaluated_row(trained, spec, metrics, commit) | {"rank": rank_zero_only.rank}
    start = time.perf_counter()
    settings = EvalSettings.from_dict(spec.eval)
    steps_per_call = spec.trainer.get("steps_per_call", DEFAULT_STEPS_PER_CALL)
    multi_process = strategy == "ddp" or devices not in (1, "1") or num_nodes > 1
    auto = None
    if steps_per_call == "auto":
        # Otherwise the model's step is timed at the start of fit, against an assumed cost.
        auto = AutoStepsPerCall(ASSUMED_CALL_COST_US, spec.budget.get("steps"))
        if not multi_process and budget_batches(spec) >= MEASURE_FROM_BATCHES:
            auto.call_us, auto.step_us = measured_call_cost_us(spec, accelerator)
    L.seed_everything(spec.seed, verbose=False)
    dm = ImageDataModule(spec.dataset, seed=spec.seed, steps_per_call=steps_per_call,
                         **spec.data)
    model = build_model(spec, dm.image_shape)
    throughput, guard = TrainThroughput(), DivergenceGuard()
    project = suite.wandb.get("project", "genbench")
    group = suite.wandb.get("group", suite.name)
    logger = make_logger(project, group, spec.run_id, out_dir, wandb_mode,
                         {**spec.config(), "suite": suite.name, "config_hash": spec.config_hash})
    ckpt_dir = out_dir / "checkpoints" / spec.config_hash
    trainer_args = {k: v for k, v in spec.trainer.items()
                    if k not in NET_OPTIONS and k != "steps_per_call"}
    if strategy == "ddp":  # a short collective timeout turns a mismatch into an error, not a hang
        timeout = timedelta(seconds=int(os.environ.get("GENBENCH_DDP_TIMEOUT_S", "1800")))
        # Each family says whether some parameters get no gradient in a backward pass (the GAN's
        # discriminator step leaves the generator without one); only then does DDP search the
        # autograd graph after every backward, which costs time (see modules/gan.py).
        strategy = DDPStrategy(timeout=timeout, find_unused_parameters=getattr(
            model, "ddp_find_unused_parameters", False))
    callbacks = harness_callbacks(
        throughput, guard, ckpt_dir, checkpoint_every, progress,
        NetOptions(**{k: v for k, v in spec.trainer.items() if k in NET_OPTIONS}), spec.seed)
    if auto is not None:
        callbacks.append(auto)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy,
                        num_nodes=num_nodes, logger=logger or False, callbacks=callbacks,
                        enable_progress_bar=progress, **trainer_budget(spec, model),
                        **harness_trainer_args(**trainer_args))
    row: dict = {"suite": suite.name, "model": spec.model, "variant": spec.variant,
                 "dataset": spec.dataset, "seed": spec.seed, "config_hash": spec.config_hash,
                 "status": "ok", "diverged_step": None,
                 "peak_mem_scope": reset_peak_memory(trainer.strategy.root_device)}
    metrics: dict = {}
    images: dict[str, Path] = {}
    if fresh and trainer.is_global_zero:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    found = None if fresh else resumable_checkpoint(ckpt_dir, log)
    resume = None
    if found is not None:
        resume, row["resumed_step"] = found
        log(f"  resuming from {resume} (step {row['resumed_step']})")
    try:
        trainer.fit(model, dm, ckpt_path=resume)
    except Diverged as err:
        log(f"  diverged: {err}")
        row |= {"status": "diverged", "diverged_step": err.step}
    # The final state (with the AE's latent mixture), for re-evaluation; every rank must call.
    trainer.save_checkpoint(ckpt_dir / "final.ckpt")
    zero = trainer.is_global_zero
    if row["status"] == "ok":
        # Generation metrics are computed once, on rank zero, from all the samples.
        metrics, grids = safe_evaluate(model, dm, settings, spec.seed, generate_here=zero,
                                       log=log)
        if zero:
            images = save_run_grids(grids, out_dir / "plots", spec.run_id)
    device = trainer.strategy.root_device
    row |= metrics
    row |= whole_run_figures(trainer, throughput, peak_memory_mb(device))
    # every batch of the run, those before a resume too (global_step is checkpointed)
    row |= {"steps": model.batches_trained(), "steps_per_call": dm.steps_per_call or 1,
            "epochs": trainer.current_epoch, "params": count_parameters(model),
            "wall_s": time.perf_counter() - start,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "devices": trainer.world_size, "num_nodes": trainer.num_nodes, **versions(),
            "git_commit": commit,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": json.dumps(spec.config(), sort_keys=True),
            "checkpoint": str(ckpt_dir / "final.ckpt")}
    if zero:
        finish_run_logging(logger, row, images)
    row["rank"] = trainer.global_rank
    return row


def prepare_run_process() -> None:
    """Set up a process that trains runs: no per-run device banner, no warnings that say nothing
    about the run, and no NVML probe on every optimiser step where NVML is missing."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    drop_failing_nvml_check()
    for noise in (".*smaller than the logging interval.*", ".*LeafSpec.*is deprecated.*",
                  ".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=noise)
