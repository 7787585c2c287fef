"""Spreading a suite's runs over processes, GPUs or a SLURM cluster.

Every launcher runs the same job, `run_spec_job`: one spec, trained, evaluated and appended to
the results table by the process that ran it (under the table's file lock), so a crashed worker
loses only its own run and the parent only has to wait.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

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


def run_spec_job(spec, suite, out_dir: str, options: dict, commit: str) -> dict:
    """Train, evaluate and append one spec; returns its row. Runs in a worker or a SLURM job."""
    import torch

    from bench.results import append_row
    from bench.runner import prepare_run_process, run_one

    prepare_run_process()
    if os.environ.get("GENBENCH_THREADS"):
        torch.set_num_threads(int(os.environ["GENBENCH_THREADS"]))
    opts = RunOptions(**options)
    row = run_one(spec, suite, Path(out_dir), opts.accelerator, opts.devices, opts.wandb_mode,
                  opts.progress, commit, opts.checkpoint_every, opts.strategy, opts.num_nodes,
                  fresh=opts.force, log=print)
    if row.pop("rank") == 0:
        append_row(Path(out_dir) / "runs.csv", row, unique=not opts.force)
    return row


def _pin_worker(slots, gpu_ids: list[int], threads: int) -> None:
    """Worker initialiser: runs before the worker imports torch, so the pinning takes."""
    slot = slots.get()
    if gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_ids[slot % len(gpu_ids)])
    os.environ["OMP_NUM_THREADS"] = os.environ["GENBENCH_THREADS"] = str(threads)


def run_parallel(specs, suite, out_dir: Path, workers: int, options: RunOptions, commit: str,
                 log=print) -> list[dict]:
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
    log(f"running {len(specs)} runs, {workers} at a time on {where}")
    rows = []
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_pin_worker,
                             initargs=(slots, gpu_ids, threads)) as pool:
        futures = {pool.submit(run_spec_job, spec, suite, str(out_dir), asdict(options), commit):
                   spec for spec in specs}
        for future in as_completed(futures):
            spec = futures[future]
            try:
                rows.append(future.result())
                log(f"  done: {spec.run_id}")
            except Exception:  # a failed worker loses only its own run
                log(f"  FAILED: {spec.run_id}\n{traceback.format_exc()}")
    return rows


@dataclass
class SlurmOptions:
    partition: str | None = None
    time_min: int = 240
    gpus_per_job: int = 1
    cpus_per_job: int = 8
    max_parallel: int = 64
    cluster: str | None = None  # None: SLURM; "local": submitit's local executor (tests)


def run_slurm(specs, suite, out_dir: Path, options: RunOptions, slurm: SlurmOptions,
              commit: str, log=print) -> list[dict]:
    """Submit the specs as one SLURM job array through submitit and wait for them. The jobs
    append their own rows to <out>/runs.csv, which must be on a shared filesystem."""
    import submitit

    folder = out_dir / "slurm" / "%j"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=slurm.cluster)
    parameters = {"timeout_min": slurm.time_min, "cpus_per_task": slurm.cpus_per_job,
                  "gpus_per_node": slurm.gpus_per_job, "tasks_per_node": 1,
                  "name": f"genbench-{suite.name}"}
    if executor.cluster == "slurm":
        parameters["slurm_array_parallelism"] = slurm.max_parallel
        if slurm.partition:
            parameters["slurm_partition"] = slurm.partition
    executor.update_parameters(**parameters)
    n = len(specs)
    jobs = executor.map_array(run_spec_job, specs, [suite] * n, [str(out_dir)] * n,
                              [asdict(options)] * n, [commit] * n)
    log(f"submitted {n} jobs to {executor.cluster} (logs in {out_dir / 'slurm'}): "
        f"{', '.join(job.job_id for job in jobs[:5])}{' ...' if n > 5 else ''}")
    rows = []
    for spec, job in zip(specs, jobs):
        try:
            rows.append(job.result())
            log(f"  done: {spec.run_id} (job {job.job_id})")
        except Exception as err:  # submitit re-raises the job's exception here
            log(f"  FAILED: {spec.run_id} (job {job.job_id}): {err}")
    return rows
