"""Run a suite: for each spec, train with a Lightning Trainer, evaluate, append one row."""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
import pandas as pd
import torch

from bench.callbacks import (PROGRESS_REFRESH_STEPS, Diverged, DivergenceGuard, NetOptions,
                             TrainThroughput, drop_failing_nvml_check)
from bench.evaluate import EvalSettings, evaluate
from bench.extractor import get_extractor
from bench.launch import (CHECKPOINT_EVERY_STEPS, RunOptions, SlurmOptions, run_parallel,
                          run_slurm)
from bench.plots import metric_bar_charts, save_run_grids
from bench.results import append_row, done_hashes, format_table, read_rows
from bench.suite import RunSpec, Suite
from bench.tracking import choose_wandb_mode, finish_run_logging, log_suite_summary, make_logger
from datamodules import ImageDataModule
from modules import MODELS
from modules.nets import count_parameters


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


def peak_memory_mb(device: torch.device) -> float:
    """GPU: peak allocated by torch on the device during this run. CPU: the process's peak
    resident set so far (Linux reports KiB), which covers earlier runs of the same process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(spec: RunSpec, image_shape):
    cls = MODELS[spec.model]
    kwargs = {**spec.params, "image_shape": image_shape}
    if "seed" in inspect.signature(cls.__init__).parameters:
        kwargs.setdefault("seed", spec.seed)
    return cls(**kwargs)


def optimizer_steps(model, batches: int) -> int:
    """Lightning's max_steps counts optimiser steps: one per batch, except for the GAN, which
    takes a discriminator step per batch plus a generator step every n_critic batches."""
    if model.automatic_optimization:
        return batches
    return batches + batches // model.n_critic


def trainer_budget(spec: RunSpec, model) -> dict[str, int]:
    """Epochs, or steps counted as training batches."""
    if "epochs" in spec.budget:
        return {"max_epochs": spec.budget["epochs"]}
    return {"max_steps": optimizer_steps(model, spec.budget["steps"]), "max_epochs": -1}


NET_OPTIONS = ("channels_last", "compile")  # keys of a suite's `trainer:` that NetOptions takes


# The Trainer settings of every run that matter for speed; `bench perf` times the same.
HARNESS_TRAINER_ARGS = {"enable_model_summary": False, "num_sanity_val_steps": 0,
                        "log_every_n_steps": 50}


def harness_callbacks(throughput: TrainThroughput, guard: DivergenceGuard, ckpt_dir: Path,
                      checkpoint_every: int, progress: bool,
                      net_options: NetOptions | None = None) -> list[L.Callback]:
    """The callbacks of every run: throughput, divergence guard, a resumable checkpoint every
    `checkpoint_every` steps (<ckpt_dir>/last.ckpt), GPU net options when any is on, and a
    progress bar that refreshes every PROGRESS_REFRESH_STEPS steps (each refresh costs a host
    sync)."""
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1,
                                 every_n_train_steps=checkpoint_every,
                                 enable_version_counter=False)
    callbacks: list[L.Callback] = [throughput, guard, checkpoint]
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


def run_one(spec: RunSpec, suite: Suite, out_dir: Path, accelerator: str = "auto",
            devices: int | str = 1, wandb_mode: str = "disabled", progress: bool = False,
            commit: str = "unknown", checkpoint_every: int = CHECKPOINT_EVERY_STEPS,
            strategy: str = "auto", num_nodes: int = 1, fresh: bool = False, log=print) -> dict:
    """Train and evaluate one spec; returns its result row (status ok or diverged). The run
    saves a checkpoint every `checkpoint_every` steps and resumes from it when rerun, unless
    `fresh` (the --force redo) asks for a new start."""
    start = time.perf_counter()
    settings = EvalSettings.from_dict(spec.eval)
    L.seed_everything(spec.seed, verbose=False)
    dm = ImageDataModule(spec.dataset, seed=spec.seed, **spec.data)
    model = build_model(spec, dm.image_shape)
    throughput, guard = TrainThroughput(), DivergenceGuard()
    project = suite.wandb.get("project", "genbench")
    group = suite.wandb.get("group", suite.name)
    logger = make_logger(project, group, spec.run_id, out_dir, wandb_mode,
                         {**spec.config(), "suite": suite.name, "config_hash": spec.config_hash})
    ckpt_dir = out_dir / "checkpoints" / spec.config_hash
    trainer_args = {k: v for k, v in spec.trainer.items() if k not in NET_OPTIONS}
    if strategy == "ddp":  # a short collective timeout turns a mismatch into an error, not a hang
        timeout = timedelta(seconds=int(os.environ.get("GENBENCH_DDP_TIMEOUT_S", "1800")))
        strategy = DDPStrategy(timeout=timeout)
    callbacks = harness_callbacks(
        throughput, guard, ckpt_dir, checkpoint_every, progress,
        NetOptions(**{k: v for k, v in spec.trainer.items() if k in NET_OPTIONS}))
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy,
                        num_nodes=num_nodes, logger=logger or False, callbacks=callbacks,
                        **HARNESS_TRAINER_ARGS, enable_progress_bar=progress,
                        **trainer_budget(spec, model), **trainer_args)
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
    row: dict = {"suite": suite.name, "model": spec.model, "variant": spec.variant,
                 "dataset": spec.dataset, "seed": spec.seed, "config_hash": spec.config_hash,
                 "status": "ok", "diverged_step": None}
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
        extractor = None
        # Generation metrics are computed once, on rank zero, from all the samples.
        if zero and hasattr(model, "sample") and settings.generation:
            extractor = get_extractor(settings.features, dm, settings.extractor_epochs,
                                      settings.extractor_weights, settings.inception_weights,
                                      log=log)
        metrics, grids = evaluate(model, dm, settings, extractor, seed=spec.seed, log=log,
                                  rank=trainer.global_rank, world_size=trainer.world_size)
        if zero:
            images = save_run_grids(grids, out_dir / "plots", spec.run_id)
    device = trainer.strategy.root_device
    row |= metrics
    row |= {"train_img_per_s": throughput.images_per_second, "steps": throughput.batches,
            "epochs": trainer.current_epoch, "params": count_parameters(model),
            "wall_s": time.perf_counter() - start, "peak_mem_mb": peak_memory_mb(device),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "devices": trainer.world_size, **versions(), "git_commit": commit,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": json.dumps(spec.config(), sort_keys=True),
            "checkpoint": str(ckpt_dir / "final.ckpt")}
    if zero:
        finish_run_logging(logger, row, images)
    row["rank"] = trainer.global_rank
    return row


def one_line(row: dict) -> str:
    """The per-run line printed after each run: the metrics that apply, in a fixed order."""
    shown = ["recon_mse", "l0", "dead_fraction", "elbo", "iw_nll", "fid", "isc_mean",
             "precision", "recall", "train_img_per_s"]
    parts = [f"{k}={row[k]:.4g}" for k in shown if isinstance(row.get(k), (int, float))
             and not pd.isna(row.get(k))]
    status = "" if row["status"] == "ok" else f" [{row['status']} at step {row['diverged_step']}]"
    return f"  {row['model']}/{row['variant']} on {row['dataset']} seed {row['seed']}: " + \
        " ".join(parts) + f" ({row['wall_s']:.0f} s){status}"


def prepare_run_process() -> None:
    """Set up a process that trains runs: no per-run device banner, no warnings that say nothing
    about the run, and no NVML probe on every optimiser step where NVML is missing."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    drop_failing_nvml_check()
    for noise in (".*smaller than the logging interval.*", ".*LeafSpec.*is deprecated.*",
                  ".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=noise)


def run_suite(suite: Suite, out_dir: Path | None = None, only: str | None = None,
              force: bool = False, accelerator: str = "auto", devices: int | str = 1,
              wandb_mode: str | None = None, progress: bool | None = None,
              checkpoint_every: int = CHECKPOINT_EVERY_STEPS, strategy: str = "auto",
              num_nodes: int = 1, parallel: int = 1,
              launcher: str = "local", slurm: SlurmOptions | None = None,
              log=print) -> pd.DataFrame:
    """Run every spec not already in <out_dir>/runs.csv, one after another (each run may use
    several devices through DDP), `parallel` at a time, or as a SLURM job array; then write the
    summary table and plots. Returns this suite's rows."""
    out_dir = Path(out_dir or Path("results") / suite.name)
    csv_path = out_dir / "runs.csv"
    prepare_run_process()
    # Under DDP every rank runs this function; only rank zero speaks and writes.
    zero = rank_zero_only.rank == 0
    say = log if zero else (lambda message: None)
    mode = choose_wandb_mode(wandb_mode)
    if progress is None:  # a bar per run on a terminal; in a log file it is only noise
        progress = sys.stderr.isatty()
    specs = [s for s in suite.specs if not only or re.search(only, s.run_id)]
    if not specs:
        raise ValueError(f"--only {only!r} matches none of: "
                         f"{', '.join(s.run_id for s in suite.specs)}")
    done = set() if force else done_hashes(csv_path)
    pending = []
    for i, spec in enumerate(specs, 1):
        if spec.config_hash in done:
            say(f"[{i}/{len(specs)}] {spec.run_id}: already in {csv_path.name} "
                f"(config {spec.config_hash}), skipped; --force redoes it")
        else:
            pending.append(spec)
    commit = git_commit()
    options = RunOptions(accelerator, devices, strategy, num_nodes, mode, checkpoint_every, force,
                         progress)
    suite_start = time.perf_counter()
    say(f"suite {suite.name}: {len(pending)} of {len(specs)} runs to do -> {csv_path} "
        f"(W&B {mode})")
    if launcher in ("slurm", "submitit-local"):
        slurm = slurm or SlurmOptions()
        slurm.cluster = "local" if launcher == "submitit-local" else None
        rows = run_slurm(pending, suite, out_dir, options, slurm, commit, say)
    elif launcher != "local":
        raise ValueError(f"unknown launcher {launcher!r}; choose one of: local, slurm, "
                         "submitit-local")
    elif parallel > 1:
        rows = run_parallel(pending, suite, out_dir, parallel, options, commit, say)
    else:
        rows = []
        for i, spec in enumerate(pending, 1):
            say(f"[{i}/{len(pending)}] {spec.run_id} (config {spec.config_hash})")
            row = run_one(spec, suite, out_dir, accelerator, devices, mode, progress, commit,
                          checkpoint_every, strategy, num_nodes, fresh=force, log=say)
            if row.pop("rank") == 0:
                append_row(csv_path, row, unique=not force)
            rows.append(row)
            say(one_line(row))
    if not zero:
        return pd.DataFrame(rows)
    if parallel > 1 or launcher != "local":
        for row in rows:
            say(one_line(row))
    table = read_rows(csv_path)
    table = table[table["config_hash"].isin({s.config_hash for s in specs})] if len(table) \
        else table
    summary = format_table(table)
    (out_dir / "summary.md").write_text(f"# {suite.name}\n\n{summary}\n")
    metric_bar_charts(table, out_dir / "plots")
    log_suite_summary(suite.wandb.get("project", "genbench"), suite.wandb.get("group", suite.name),
                      suite.name, table, out_dir, mode)
    say(f"\n{summary}\n\nsuite {suite.name} took {time.perf_counter() - suite_start:.0f} s; "
        f"rows in {csv_path}, table in {out_dir / 'summary.md'}, plots in {out_dir / 'plots'}")
    return table
