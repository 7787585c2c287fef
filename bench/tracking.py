"""Weights & Biases without surprises: offline unless an account is configured, never a prompt."""

from __future__ import annotations

import math
import netrc
import os
from pathlib import Path

from bench.errors import UserError

WANDB_MODES = ("online", "offline", "disabled")


def wandb_account_configured() -> bool:
    """An API key in the environment or a netrc entry for the W&B API host (what `wandb login`
    writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        hosts = netrc.netrc(path).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def choose_wandb_mode(requested: str | None = None) -> str:
    """`requested` (the --wandb option) wins, then WANDB_MODE, then online only with an account.
    Without an account and WANDB_MODE, wandb.init raises UsageError with no terminal and blocks
    on a login prompt with one, so offline is the only safe default."""
    mode = requested or os.environ.get("WANDB_MODE")
    if mode is None:
        return "online" if wandb_account_configured() else "offline"
    if mode == "dryrun":  # wandb's older spelling of offline
        return "offline"
    if mode not in WANDB_MODES:
        raise UserError(f"unknown W&B mode {mode!r}; choose one of: {', '.join(WANDB_MODES)}")
    return mode


def make_logger(project: str, group: str, name: str, save_dir: Path, mode: str, config: dict):
    """Lightning's WandbLogger for one run, or None when W&B is disabled."""
    if mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    save_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    logger = WandbLogger(project=project, group=group, name=name, save_dir=str(save_dir),
                         mode=mode, config=config, job_type="train")
    # Lightning 2.6 always hands wandb.init `anonymous=None`, and wandb >= 0.19 answers every
    # run with "The anonymous setting has no effect": leave the deprecated key out.
    if logger._wandb_init.get("anonymous") is None:
        logger._wandb_init.pop("anonymous", None)
    return logger


def finish_run_logging(logger, row: dict, images: dict[str, Path]) -> None:
    """Final metrics into the run's summary, the image grids as images, then close the run."""
    if logger is None:
        return
    numeric = {k: v for k, v in row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)
               and not (isinstance(v, float) and math.isnan(v))}
    logger.experiment.summary.update({**numeric, "status": row.get("status")})
    for key, path in images.items():
        logger.log_image(key=key, images=[str(path)])
    logger.experiment.finish()


def log_suite_summary(project: str, group: str, suite: str, rows, save_dir: Path,
                      mode: str) -> str | None:
    """The suite's result rows as a wandb.Table in a run of its own; returns the run's dir."""
    if mode == "disabled" or rows.empty:
        return None
    import wandb

    run = wandb.init(project=project, group=group, name=f"{suite}-summary", job_type="summary",
                     dir=str(save_dir), mode=mode, reinit="finish_previous")
    run.log({"runs": wandb.Table(dataframe=rows.astype(str))})
    run_dir = run.dir
    run.finish()
    return run_dir
