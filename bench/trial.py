"""`bench run --suite S --try`: every pending entry of a suite trained for a few batches and
evaluated on a small sample, through the whole path (its own model, data, trainer and
evaluation settings), into a scratch folder; then the full suite's time on this machine,
extrapolated from what each entry took.

What it scales: seconds per training batch after warm-up, times the entry's budget in batches;
the evaluation's seconds per generated (and real) image, times the full sample counts; its
seconds per importance sample, times the full K x test images; and, as measured, what does not
grow with either (the reconstruction metrics over the test split, building the run).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import platform
import tempfile
from pathlib import Path

import pandas as pd

from bench.defaults import TRY_BATCHES, TRY_SAMPLE
from bench.evaluate import EvalSettings
from bench.process import only_lines_of, prepare_run_process
from bench.runner import RunOptions, run_one
from bench.suite import RunSpec, Suite
from datamodules.image import BATCH_SIZE

log = logging.getLogger(__name__)

# IW-NLL's cost per importance sample falls as its batches fill (the decoder runs on images x
# samples at once): at the default sample the trial takes at least this many samples in all
# (at least one image), so that its per-sample cost is the full evaluation's; a smaller
# --try-sample takes proportionally fewer.
TRY_IW_SAMPLES = 10_000


def trial_spec(spec: RunSpec, batches: int, sample: int = TRY_SAMPLE) -> RunSpec:
    """The entry with a budget of `batches` training batches and its evaluation on `sample`
    generated and `sample` real images, IW-NLL on a few test images (at the entry's own K,
    extractor and batch sizes)."""
    settings = EvalSettings.from_dict(spec.eval)
    small = {"n_fake": min(settings.n_fake, sample),
             "n_real": min(settings.n_real or math.inf, sample),
             "kid_subset_size": min(settings.kid_subset_size, sample // 2)}
    if settings.iw_k:  # enough images for TRY_IW_SAMPLES samples, scaled with the sample
        least_images = -(-TRY_IW_SAMPLES * sample // (TRY_SAMPLE * settings.iw_k))
        small["iw_images"] = min(settings.iw_images or math.inf, least_images)
    return dataclasses.replace(spec, budget={"steps": batches}, eval={**spec.eval, **small})


def seedless(spec: RunSpec) -> str:
    """What an entry is apart from its seed: the seeds of one entry train the same shapes under
    the same settings, so one of them is tried for all."""
    return dataclasses.replace(spec, seed=0).config_hash


def budget_batches(spec: RunSpec) -> int:
    """Training batches of the entry's full budget (an epoch counted on its own data)."""
    if "steps" in spec.budget:
        return spec.budget["steps"]
    from datamodules import ImageDataModule

    dm = ImageDataModule(spec.dataset, seed=spec.seed, **spec.data)
    dm.setup()
    return spec.budget["epochs"] * len(dm.train_dataloader())


def estimate(spec: RunSpec, row: dict, tried_batches: int, warmup: int) -> dict:
    """Seconds per batch and per evaluated item in the trial, and the full entry's seconds."""
    settings = EvalSettings.from_dict(spec.eval)
    batch_size = spec.data.get("batch_size", BATCH_SIZE)
    per_batch = batch_size / row["train_img_per_s"]
    train_s = per_batch * budget_batches(spec)
    eval_s = row.get("eval_s", 0.0) or 0.0
    generation_s = row.get("generation_s") or 0.0
    iw_s = row.get("iw_s") or 0.0
    test_images = int(row.get("test_images") or 0)
    per_image = per_sample = math.nan
    full_eval = eval_s - generation_s - iw_s
    if generation_s:
        tried = row["n_fake"] + row["n_real"]
        per_image = generation_s / tried
        full_eval += per_image * (settings.n_fake + (settings.n_real or test_images))
    if iw_s and row.get("iw_k"):
        tried = row["iw_k"] * row["iw_images"]
        per_sample = iw_s / tried
        full_eval += per_sample * settings.iw_k * (settings.iw_images or test_images)
    fixed = max(row["wall_s"] - eval_s - per_batch * tried_batches, 0.0)
    return {"s_per_batch": per_batch, "eval_s_per_image": per_image,
            "eval_s_per_iw_sample": per_sample, "est_train_s": train_s,
            "est_eval_s": full_eval, "est_total_s": train_s + full_eval + fixed}


def machine() -> str:
    """This machine in words: the GPU, or the CPU model and torch's threads."""
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} torch thread(s)"


def makespan(seconds: list[float], workers: int) -> float:
    """Wall time of the entries on `workers` at once, longest first to the least loaded."""
    loads = [0.0] * max(workers, 1)
    for s in sorted(seconds, reverse=True):
        heapq.heapreplace(loads, loads[0] + s)
    return max(loads)


def clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return ""
    minutes, s = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{s:02d}"


def run_try(suite: Suite, out_dir: Path | None = None, only: str | None = None,
            batches: int = TRY_BATCHES, sample: int | None = None, parallel: int = 1,
            options: RunOptions | None = None) -> pd.DataFrame:
    """`bench run --try`: the pending runs planned as bench run plans them (`--only`, the table
    at `out_dir`, the devices of `options`), checked by preflight, each entry tried
    (`try_suite`); nothing is recorded. `parallel` only sets the estimate's runs at once."""
    from bench.launch import plan_suite
    from bench.preflight import preflight
    from bench.runner import git_commit

    prepare_run_process()
    options = options or RunOptions()
    plan = plan_suite(suite, out_dir, only, False, options.devices, options.num_nodes)
    preflight(plan.pending, plan.out_dir)
    if parallel > 1:
        log.info(f"--try runs the entries one after another; --parallel {parallel} only sets the "
                 "estimate's number of runs at once")
    sample = sample or TRY_SAMPLE
    entries = len({seedless(spec) for spec in plan.pending})
    log.info(f"trying {entries} entr{'y' if entries == 1 else 'ies'} of suite {suite.name} "
             f"({len(plan.pending)} pending run(s); one seed each) for {batches} batches, "
             f"evaluated on {sample} generated and real images (nothing is recorded)")
    return try_suite(suite, plan.pending, options, git_commit(), batches, parallel, sample)


def try_suite(suite: Suite, specs: list[RunSpec], options: RunOptions, commit: str,
              batches: int = TRY_BATCHES, parallel: int = 1,
              sample: int = TRY_SAMPLE) -> pd.DataFrame:
    """Try each entry (one seed for all its pending seeds; a line each as it goes), then print
    the table and the suite's estimated time; returns the table (status "ok" or the error in
    one line; `runs`: the pending seeds the entry's estimate stands for)."""
    warmup = max(1, min(batches // 3, 8))
    options = dataclasses.replace(options, wandb_mode="disabled", force=True,
                                  checkpoint_every=10**9, warmup_batches=warmup)
    entries: dict[str, list[RunSpec]] = {}
    for spec in specs:
        entries.setdefault(seedless(spec), []).append(spec)
    records = []
    with tempfile.TemporaryDirectory(prefix="genbench-try-") as scratch:
        for i, seeds in enumerate(entries.values(), 1):
            spec = seeds[0]
            record = {"entry": spec.run_id, "runs": len(seeds), "status": "ok"}
            try:
                with only_lines_of(__name__):  # the entry's own line below says how it went
                    row = run_one(trial_spec(spec, batches, sample), suite,
                                  Path(scratch) / spec.config_hash, options, commit).to_row()
                if row["status"] != "ok":
                    record["status"] = f"{row['status']}: {row.get('error') or ''}".strip(": ")
                else:
                    record |= estimate(spec, row, batches, warmup)
            except Exception as err:  # noqa: BLE001 - an entry that fails is named, the rest run
                record["status"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            records.append(record)
            shown = (f"{record['s_per_batch'] * 1000:.1f} ms/batch, est. "
                     f"{clock(record['est_total_s'])}") if "est_total_s" in record else ""
            also = f" (for {len(seeds)} seeds)" if len(seeds) > 1 else ""
            log.info(f"[{i}/{len(entries)}] {spec.run_id}{also}: {record['status']}  {shown}")
    table = pd.DataFrame(records)
    shown = table.copy()
    for column in ("est_train_s", "est_eval_s", "est_total_s"):
        if column in shown:
            shown[column] = shown[column].map(lambda v: clock(v) if pd.notna(v) else "")
    log.info("\n" + shown.to_markdown(index=False, floatfmt=".4g"))
    if "est_total_s" in table:
        tried = table.dropna(subset=["est_total_s"])
        totals = [s for s, n in zip(tried["est_total_s"], tried["runs"]) for _ in range(n)]
        line = (f"\nestimated on {machine()}: the suite's {len(totals)} run(s) "
                f"{clock(sum(totals))} one after another")
        if parallel > 1:
            line += f", {clock(makespan(totals, parallel))} with --parallel {parallel}"
        log.info(line)
    failed = (table["status"] != "ok").sum()
    log.info(f"{len(table) - failed} of {len(table)} entries ok" + (f"; {failed} failed" if failed
                                                                    else ""))
    return table
