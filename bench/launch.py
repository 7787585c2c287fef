"""Running a suite: which runs to do, where each one goes (this process, K worker processes or
GPUs, a SLURM job array), and the summary at the end. One run is bench.runner's `run_one`.

Every launcher runs the same job, `run_spec_job`: one spec, trained, evaluated and appended to
the results table by the process that ran it (under the table's file lock), so a crashed worker
loses only its own run and the parent only has to wait.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import re
import subprocess
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import submitit.helpers
from lightning.pytorch.utilities import rank_zero_only

from bench.errors import UserError
from bench.metrics import PER_RUN
from bench.plots import metric_bar_charts
from bench.preflight import preflight
from bench.process import prepare_run_process, progress_event
from bench.results import (append_row, done_hashes, eval_failed_rows, format_table, latest_runs,
                           made_on, read_rows)
from bench.evaluate import EvalSettings
from bench.defaults import (SLURM_CPUS, SLURM_GPUS, SLURM_MAX_PARALLEL,
                            SLURM_TIME_MIN)
from bench.runner import (STOP, RunOptions, RunResult, evaluate_checkpoint, evaluation_device,
                          git_commit, run_one)
from bench.suite import RunSpec, Suite
from bench.tracking import log_suite_summary

log = logging.getLogger(__name__)


def claim(out_dir: Path, spec):
    """A lock on one run for this process (and DDP rank), or None when another process holds
    it: two bench runs on one folder then train each run once. The lock is a file lock, which
    the kernel releases when its process ends, however it ends."""
    from filelock import FileLock, Timeout

    folder = out_dir / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / f"{spec.config_hash}.rank{rank_zero_only.rank}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def run_claimed(spec, suite, out_dir: Path, options: RunOptions, commit: str) -> dict | None:
    """Train, evaluate and append one spec under its lock; its row, or None when another
    process has the run under way or finished it meanwhile. A run whose evaluation failed
    (its row in the table says so) is evaluated again from its final checkpoint, not
    retrained, unless `options.force`."""
    lock = claim(out_dir, spec)
    if lock is None:
        log.info(f"  {spec.run_id}: under way in another process on {out_dir}; left to it")
        return None
    try:
        csv_path = out_dir / "runs.csv"
        if not options.force and spec.config_hash in done_hashes(csv_path):
            log.info(f"  {spec.run_id}: finished by another process meanwhile (in {csv_path.name})")
            return None
        failed = None if options.force else eval_failed_rows(csv_path).get(spec.config_hash)
        row = run_one(spec, suite, out_dir, options, commit,
                      trained=None if failed is None else RunResult.from_row(failed)).to_row()
        if rank_zero_only.rank == 0:  # under DDP every rank has the row; one writes it
            append_row(csv_path, row, unique=not options.force)
        return row
    finally:
        lock.release()


def run_spec_job(spec, suite, out_dir: str, options: dict, commit: str) -> dict | None:
    """Train, evaluate and append one spec; returns its row (None: left to another process).
    Runs in a worker or a SLURM job."""
    import torch

    prepare_run_process()
    STOP.install()
    if os.environ.get("GENBENCH_THREADS"):
        torch.set_num_threads(int(os.environ["GENBENCH_THREADS"]))
    return run_claimed(spec, suite, Path(out_dir), RunOptions(**options), commit)


def resumed(row: dict) -> str:
    """' (resumed at step N)' for a run that was stopped (a preemption, a time limit, a kill)
    and resumed from its checkpoint in a worker or job: the waiting process saw none of it."""
    step = row.get("resumed_step")
    return "" if step is None else f" (resumed at step {step})"


def _pin_worker(slots, gpu_ids: list[int], threads: int) -> None:
    """Worker initialiser: runs before the worker imports torch, so the pinning takes."""
    slot = slots.get()
    if gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_ids[slot % len(gpu_ids)])
    os.environ["OMP_NUM_THREADS"] = os.environ["GENBENCH_THREADS"] = str(threads)


def run_parallel(specs, suite, out_dir: Path, options: RunOptions, commit: str, *,
                 workers: int) -> list[dict]:
    """K specs at once on this machine, each worker pinned to its own GPU when there are
    GPUs, else to an equal share of the CPU cores."""
    import torch

    gpu_ids = list(range(torch.cuda.device_count()))
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # fresh processes: no forked CUDA or locks
    slots = context.Queue()
    for slot in range(workers):
        slots.put(slot)
    where = (f"GPUs {gpu_ids}" if gpu_ids else f"{threads} CPU thread(s) each")
    log.info(f"running {len(specs)} runs, {workers} at a time on {where}")
    rows = []
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_pin_worker,
                             initargs=(slots, gpu_ids, threads)) as pool:
        futures = {pool.submit(run_spec_job, spec, suite, str(out_dir), asdict(options),
                               commit): spec for spec in specs}
        for future in as_completed(futures):
            spec = futures[future]
            try:
                row = future.result()
                if row is not None:
                    rows.append(row)
                    log.info(f"  done: {spec.run_id}{resumed(row)}")
            except Exception:  # a failed worker loses only its own run
                log.error(f"  FAILED: {spec.run_id}\n{traceback.format_exc()}")
    return rows


class RequeueableSpecJob(submitit.helpers.Checkpointable):
    """`run_spec_job` as a submitit Checkpointable: on a time limit or a preemption submitit
    asks it for a checkpoint (the run has written its own at the batch under way, see
    bench.runner.StopSignals, and resumes from it) and requeues the same call."""

    def __call__(self, *args):
        return run_spec_job(*args)


def sacct_works() -> bool:
    """Whether this cluster keeps accounting: submitit reads job states with sacct, which
    fails without it (common in small labs), once per poll, with a warning each time."""
    try:
        probe = subprocess.run(["sacct", "-n", "-X", "-S", "now", "--format=JobID"],
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@dataclass
class SlurmOptions:
    partition: str | None = None
    time_min: int = SLURM_TIME_MIN
    gpus_per_job: int = SLURM_GPUS
    cpus_per_job: int = SLURM_CPUS
    max_parallel: int = SLURM_MAX_PARALLEL
    cluster: str | None = None  # None: SLURM; "local": submitit's local executor (tests)


def run_slurm(specs, suite, out_dir: Path, options: RunOptions, commit: str, *,
              slurm: SlurmOptions) -> list[dict]:
    """Submit the specs as one SLURM job array through submitit and wait for them. The jobs
    record their own rows in <out>/rows/, which must be on a shared filesystem."""
    import submitit

    folder = out_dir / "slurm" / "%j"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=slurm.cluster)
    parameters = {"timeout_min": slurm.time_min, "cpus_per_task": slurm.cpus_per_job,
                  "tasks_per_node": 1, "name": f"genbench-{suite.name}"}
    if slurm.gpus_per_job:  # none asked for none: a cluster without GPUs may refuse the option
        parameters["gpus_per_node"] = slurm.gpus_per_job
    if executor.cluster == "slurm":
        parameters["slurm_array_parallelism"] = slurm.max_parallel
        if slurm.partition:
            parameters["slurm_partition"] = slurm.partition
    executor.update_parameters(**parameters)
    accounting = executor.cluster != "slurm" or sacct_works()
    if accounting:
        return wait_for_jobs(executor, specs, suite, out_dir, options, commit, accounting)
    log.info("  sacct fails on this cluster (no accounting): a job's end is read from its result "
             "file, and from squeue for a job killed before it wrote one")
    # submitit has no option to leave sacct alone: its SLURM jobs share one class-level watcher,
    # whose command (a private method) is None when there is nothing to ask
    from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

    class NoSacct(SlurmInfoWatcher):
        def _make_command(self):  # nothing to ask: submitit reads the result files
            return None

    watcher, SlurmJob.watcher = SlurmJob.watcher, NoSacct(delay_s=600)
    try:
        return wait_for_jobs(executor, specs, suite, out_dir, options, commit, accounting)
    finally:
        SlurmJob.watcher = watcher


def wait_for_jobs(executor, specs, suite, out_dir: Path, options: RunOptions, commit: str,
                  accounting: bool = True) -> list[dict]:
    """Submit the specs as a job array and collect their rows as the jobs end."""
    n = len(specs)
    jobs = executor.map_array(RequeueableSpecJob(), specs, [suite] * n, [str(out_dir)] * n,
                              [asdict(options)] * n, [commit] * n)
    log.info(f"submitted {n} jobs to {executor.cluster} (logs in {out_dir / 'slurm'}): "
             f"{', '.join(job.job_id for job in jobs[:5])}{' ...' if n > 5 else ''}")
    rows = []
    for spec, job in zip(specs, jobs):
        try:
            if not accounting:  # whether the job is still there, squeue tells
                wait_without_accounting(job)
            row = job.result()
            if row is not None:
                rows.append(row)
                log.info(f"  done: {spec.run_id} (job {job.job_id}){resumed(row)}")
        except Exception as err:  # submitit re-raises the job's exception here
            log.error(f"  FAILED: {spec.run_id} (job {job.job_id}): {err}")
    return rows


# squeue is asked this often at most, and a job missing from it this many times in a row with
# no result file has gone (a result file written at the job's end may take a while to show on
# a shared filesystem)
SQUEUE_EVERY_S = 10
SQUEUE_ABSENT_TIMES = 2


def wait_without_accounting(job) -> None:
    """Wait for a job where sacct fails. submitit then knows a job ended only from its result
    file, and waits forever for one that a SIGKILL (out of memory, a node lost, scancel -s KILL)
    ended without writing it: a job missing from squeue, with no result file, has ended so."""
    absent = 0
    while not job.done():
        listed = subprocess.run(["squeue", "-h", "-j", str(job.job_id), "-o", "%i"],
                                capture_output=True, text=True)
        absent = absent + 1 if listed.returncode == 0 and not listed.stdout.strip() else 0
        if absent >= SQUEUE_ABSENT_TIMES and not job.done():
            raise RuntimeError(f"the job left the queue without a result (killed: out of "
                               f"memory, a lost node, scancel -s KILL?); its log: "
                               f"{job.paths.stderr}")
        deadline = time.monotonic() + SQUEUE_EVERY_S
        while time.monotonic() < deadline and not job.done():
            time.sleep(1)


def one_line(row: dict) -> str:
    """The per-run line printed after each run: the metrics declared for it that apply, and the
    time it took (a trained run evaluated again: the evaluation's)."""
    parts = [f"{k}={row[k]:.4g}" for k in PER_RUN if isinstance(row.get(k), (int, float))
             and not pd.isna(row.get(k))]
    status = {"ok": "", "eval_failed": f" [eval_failed: {row.get('error')}]"}.get(
        row["status"], f" [{row['status']} at step {row.get('diverged_step')}]")
    if "trained_commit" not in row:
        took = f"{row['wall_s']:.0f} s"
    else:  # a trained run evaluated again: the training's time is not this line's
        took = "evaluated again" + (f" in {row['eval_s']:.0f} s" if "eval_s" in row else "")
    return f"  {row['model']}/{row['variant']} on {row['dataset']} seed {row['seed']}: " + \
        " ".join(parts) + f" ({took}){status}"


def run_here(specs, suite, out_dir: Path, options: RunOptions, commit: str) -> list[dict]:
    """The specs one after another in this process (each may use several devices through DDP),
    its line after each run; a run another process has under way is left to it."""
    rows, left = [], []
    STOP.install()
    for i, spec in enumerate(specs, 1):
        log.info(f"[{i}/{len(specs)}] {spec.run_id} (config {spec.config_hash})")
        if rank_zero_only.rank == 0:
            progress_event("run_started", index=i, total=len(specs), run_id=spec.run_id)
        row = run_claimed(spec, suite, out_dir, options, commit)
        if row is None:
            left.append(spec.run_id)
            continue
        rows.append(row)
        log.info(one_line(row))
    if left:
        log.info(f"\n{len(left)} run(s) left to the process that has them under way: "
                 f"{', '.join(left)}")
    return rows


def choose_launcher(launcher: str = "local", parallel: int = 1,
                    slurm: SlurmOptions | None = None):
    """The launcher: a function (specs, suite, out_dir, options, commit) -> rows that runs
    and records each spec: here, `parallel` at a time in workers, or as a SLURM job array."""
    if launcher in ("slurm", "submitit-local"):
        slurm = replace(slurm or SlurmOptions(),
                                    cluster="local" if launcher == "submitit-local" else None)
        return functools.partial(run_slurm, slurm=slurm)
    if launcher != "local":
        raise UserError(f"unknown launcher {launcher!r}; choose one of: local, slurm, "
                        "submitit-local")
    return functools.partial(run_parallel, workers=parallel) if parallel > 1 else run_here


@dataclass
class Plan:
    """What running a suite will do, decided before anything trains: the runs selected on this
    launch, and those of them not yet in the table."""

    suite: Suite
    out_dir: Path
    specs: list[RunSpec]
    pending: list[RunSpec]

    @property
    def csv_path(self) -> Path:
        return self.out_dir / "runs.csv"


def plan_suite(suite: Suite, out_dir: Path | None = None, only: str | None = None,
               force: bool = False, devices: int | str = 1, num_nodes: int = 1) -> Plan:
    """The runs `--only` selects, on `devices` x `num_nodes`, and which are pending (all, with
    `force`); says which are skipped."""
    out_dir = Path(out_dir or Path("results") / suite.name)
    specs = [s.on(devices, num_nodes) for s in suite.specs
             if not only or re.search(only, s.run_id)]
    if not specs:
        raise UserError(f"--only {only!r} matches none of: "
                        f"{', '.join(s.run_id for s in suite.specs)}")
    if only:  # a search, not a name: `--only ae` also selects the sae and vae runs
        models = sorted({s.model for s in specs})
        log.info(f"--only {only!r} selects {len(specs)} of {len(suite.specs)} runs "
                 f"(model{'s' if len(models) > 1 else ''} {', '.join(models)})")
    done = set() if force else done_hashes(out_dir / "runs.csv")
    for i, spec in enumerate(specs, 1):
        if spec.config_hash in done:
            log.info(f"[{i}/{len(specs)}] {spec.run_id}: already in runs.csv "
                     f"(config {spec.config_hash}), skipped; --force redoes it")
    return Plan(suite, out_dir, specs, [s for s in specs if s.config_hash not in done])


def report(plan: Plan, mode: str, seconds: float) -> pd.DataFrame:
    """The suite's table (its runs' latest rows), summary.md, the bar charts and the W&B
    summary; returns the table."""
    suite, out_dir = plan.suite, plan.out_dir
    table = read_rows(plan.csv_path)
    table = table[table["config_hash"].isin({s.config_hash for s in plan.specs})] \
        if len(table) else table
    summary = f"{format_table(table)}\n\n{made_on(latest_runs(table))}"
    (out_dir / "summary.md").write_text(f"# {suite.name}\n\n{summary}\n")
    metric_bar_charts(table, out_dir / "plots")
    log_suite_summary(suite.wandb.get("project", "genbench"), suite.wandb.get("group", suite.name),
                      suite.name, table, out_dir, mode)
    log.info(f"\n{summary}\n\nsuite {suite.name} took {seconds:.0f} s; rows in {plan.csv_path}, "
             f"table in {out_dir / 'summary.md'}, plots in {out_dir / 'plots'}")
    return table


def run_suite(suite: Suite, out_dir: Path | None = None, only: str | None = None,
              options: RunOptions | None = None, parallel: int = 1, launcher: str = "local",
              slurm: SlurmOptions | None = None) -> pd.DataFrame:
    """Plan (what is pending), check it (preflight: every problem before anything trains),
    execute it through the launcher (each run as `options` say: RunOptions' defaults are
    quiet, no W&B and no bars), report. Returns this suite's rows (under DDP, a rank other
    than zero returns its own rows and reports nothing)."""
    prepare_run_process()
    # Under DDP every rank runs this function; only rank zero speaks (bench.process's handler
    # shows its lines only) and writes.
    zero = rank_zero_only.rank == 0
    options = options or RunOptions()
    run = choose_launcher(launcher, parallel, slurm)
    plan = plan_suite(suite, out_dir, only, options.force, options.devices, options.num_nodes)
    preflight(plan.pending, plan.out_dir)
    started = time.perf_counter()
    log.info(f"suite {suite.name}: {len(plan.pending)} of {len(plan.specs)} runs to do -> "
             f"{plan.csv_path} (W&B {options.wandb_mode})")
    if zero:
        progress_event("suite_planned", suite=suite.name, pending=len(plan.pending),
                       total=len(plan.specs))
    rows = run(plan.pending, suite, plan.out_dir, options, git_commit())
    if not zero:
        return pd.DataFrame(rows)
    if run is not run_here:  # the workers' and jobs' lines went to their own logs
        for row in rows:
            log.info(one_line(row))
    return report(plan, options.wandb_mode, time.perf_counter() - started)


def _slug(overrides: dict) -> str:
    text = "_".join(f"{k}-{v}" for k, v in sorted(overrides.items())) or "again"
    return "eval-" + re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:80]


def evaluate_results(results_dir: Path, overrides: dict, only: str | None = None,
                     out_dir: Path | None = None, accelerator: str = "auto") -> pd.DataFrame:
    """`bench eval`: evaluate the trained runs of a results folder again from their final
    checkpoints, with `overrides` on their `eval:` settings (another extractor, more samples, a
    larger K), without training. The new figures are new measurements (their provenance differs),
    so they go to their own table, <results>/eval-<settings>/runs.csv by default, each row with
    a config hash of its own and `evaluated_from` = the trained run's hash. Returns the table."""
    source = results_dir / "runs.csv"
    rows = latest_runs(read_rows(source))
    if rows.empty:
        raise UserError(f"{source}: no results table here (bench run writes <out>/runs.csv)")
    rows = rows[rows["status"].isin(["ok", "eval_failed"])]
    if only:
        rows = rows[[bool(re.search(only, RunSpec.from_row(r).run_id))
                     for r in rows.to_dict("records")]]
    if rows.empty:
        raise UserError(f"{source}: no trained run{' matches --only ' + only if only else ''}")
    out_dir = Path(out_dir or results_dir / _slug(overrides))
    csv_path = out_dir / "runs.csv"
    jobs = []
    for row in rows.to_dict("records"):
        trained = RunResult.from_row(row)
        spec = replace(trained.spec, eval={**trained.spec.eval, **overrides})
        EvalSettings.from_dict(spec.eval)  # a bad --set fails before any evaluation
        checkpoint = results_dir / "checkpoints" / str(row["config_hash"]) / "final.ckpt"
        jobs.append((spec, trained, checkpoint))
    missing = [str(c) for _, _, c in jobs if not c.is_file()]
    if missing:
        raise UserError(f"no final checkpoint for {len(missing)} run(s): {', '.join(missing)}; "
                         "those runs cannot be evaluated again (rerun them with bench run)")
    preflight([spec for spec, _, _ in jobs], out_dir)
    done, commit = done_hashes(csv_path), git_commit()
    log.info(f"evaluating {len(jobs)} trained run(s) of {source} again with "
             f"{overrides or 'the same'} settings -> {csv_path}")
    for i, (spec, trained, checkpoint) in enumerate(jobs, 1):
        if spec.config_hash in done:
            log.info(f"[{i}/{len(jobs)}] {spec.run_id}: already in {csv_path}, skipped")
            continue
        log.info(f"[{i}/{len(jobs)}] {spec.run_id} from {checkpoint}")
        figures, error, _ = evaluate_checkpoint(spec, checkpoint,
                                                EvalSettings.from_dict(spec.eval), accelerator)
        row = trained.evaluated_again(spec, figures, error, commit,
                                      evaluation_device(accelerator),
                                      evaluated_from=trained.spec.config_hash).to_row()
        append_row(csv_path, row)
        log.info(one_line(row))
    table = read_rows(csv_path)
    summary = format_table(table)
    (out_dir / "summary.md").write_text(f"# {results_dir.name}, evaluated again with "
                                        f"{overrides}\n\n{summary}\n")
    log.info(f"\n{summary}\n\nrows in {csv_path}, table in {out_dir / 'summary.md'}")
    return table
