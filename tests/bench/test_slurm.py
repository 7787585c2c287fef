"""On a real SLURM (tests/slurm_cluster.py brings up one node of its own; skipped, saying why,
where it cannot): a suite as a job array, a preempted job requeued and resumed exactly, a DDP
run under srun, and the error for `srun --ntasks`."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench.results import read_rows
from tests.data_files import write_mnist_suite
from tests.slurm_cluster import LocalSlurm, unavailable

pytestmark = pytest.mark.slow
TINY = {"backbone": "mlp", "hidden": 16, "latent_dim": 4}
# about 4,000 steps: long enough to be preempted after its first checkpoint
LONG = {"model": "ae", "variant": "long", "params": TINY, "budget": {"epochs": 160}}
SHORT = {"model": "sae", "variant": "short", "params": {**TINY, "sparsity": "topk", "k": 2}}
SLURM_ARGS = ["--launcher", "slurm", "--slurm-partition", "debug", "--slurm-gpus", "0",
              "--slurm-cpus", "1", "--slurm-time", "30", "--checkpoint-every", "200"]


@pytest.fixture(scope="module")
def cluster():
    reason = unavailable()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    cluster = LocalSlurm().start()
    yield cluster
    cluster.cleanup()


def bench_env(cluster, tmp_path) -> dict:
    return {**cluster.env, "OMP_NUM_THREADS": "1", "GENBENCH_CACHE": str(tmp_path / "cache"),
            "GENBENCH_DDP_TIMEOUT_S": "60"}


def bench(*args, env, timeout=300, prefix=()):
    return subprocess.run([*prefix, sys.executable, "-m", "bench.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def job_array(cluster, tmp_path_factory):
    """The two-run suite as a job array, uninterrupted."""
    tmp_path = tmp_path_factory.mktemp("array")
    suite = write_mnist_suite(tmp_path, [LONG, SHORT])
    done = bench("run", "--suite", str(suite), "--out", str(tmp_path / "out"), "--wandb",
                 "disabled", "--no-progress", *SLURM_ARGS, env=bench_env(cluster, tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp_path, suite, done


def final_weights(out, config_hash):
    return torch.load(out / "checkpoints" / config_hash / "final.ckpt",
                      weights_only=True)["state_dict"]


def release_requeued(cluster, job: str) -> subprocess.CompletedProcess:
    """Start a requeued job (held two minutes by SLURM) now, though not within the second of its
    requeue: started again in that second, a batch job finds the credential of its last start
    revoked and fails at once (slurmctld: "Killing non-startable batch JobId=N: Job credential
    revoked"), leaving the queue without a result, which is what the hold avoids. A later
    StartTime instead of the pause would wait for the scheduler's next periodic pass."""
    time.sleep(2)
    return cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")


def long_run_at_its_first_checkpoint(cluster, suite, out, tmp_path):
    """`bench run` of the long run as a job, in the background, once it has a checkpoint; and
    the time by which the rest of the test must have happened."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", "--suite", str(suite), "--out", str(out),
         "--only", "^ae-long", "--wandb", "disabled", "--no-progress", *SLURM_ARGS],
        env=bench_env(cluster, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    deadline = time.monotonic() + 180
    while not list(out.glob("checkpoints/*/last.ckpt")):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            pytest.fail(f"no checkpoint came: {process.communicate()[0][-3000:]}")
        time.sleep(0.2)
    return process, deadline


def test_a_suite_as_a_job_array_records_every_run_once(job_array):
    tmp_path, _, done = job_array
    rows = read_rows(tmp_path / "out" / "runs.csv")
    assert sorted(rows["variant"]) == ["long", "short"] and (rows["status"] == "ok").all()
    assert rows["config_hash"].is_unique
    assert "submitted 2 jobs to slurm" in done.stdout


def test_the_job_script_asks_for_what_the_options_say(job_array):
    tmp_path, _, _ = job_array
    scripts = list((tmp_path / "out" / "slurm").rglob("*_submission.sh"))
    text = scripts[0].read_text()
    for line in ("--partition=debug", "--cpus-per-task=1", "--time=30", "--signal=USR2@90",
                 "--array=0-1"):
        assert f"#SBATCH {line}" in text, line
    assert "gpus" not in text


def test_a_cluster_without_accounting_is_said_once_and_sacct_not_polled(job_array):
    _, _, done = job_array
    output = done.stdout + done.stderr
    assert "Bypassing sacct" not in output and "accounting storage is disabled" not in output
    assert output.count("sacct fails on this cluster (no accounting)") == 1


def test_a_preempted_job_is_requeued_and_ends_bitwise_equal_to_an_uninterrupted_one(
        cluster, job_array, tmp_path):
    reference, suite, _ = job_array
    out = tmp_path / "out"
    process, deadline = long_run_at_its_first_checkpoint(cluster, suite, out, tmp_path)
    try:
        jobs = cluster.run("squeue", "-h", "-o", "%A").stdout.split()
        assert len(jobs) == 1, jobs
        assert cluster.run("scancel", "--signal=USR2", jobs[0]).returncode == 0
        # SLURM holds a requeued batch job for two minutes (its BeginTime): released sooner
        while "BeginTime" not in cluster.run("squeue", "-h", "-o", "%r").stdout:
            assert time.monotonic() < deadline and process.poll() is None, "not requeued"
            time.sleep(0.2)
        assert release_requeued(cluster, jobs[0]).returncode == 0
        output, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    rows = read_rows(out / "runs.csv")
    assert len(rows) == 1, output[-3000:]
    row = rows.iloc[0]
    assert row["status"] == "ok" and row["resumed_step"] > 0  # it resumed, mid-run
    assert f"(resumed at step {row['resumed_step']})" in output  # and the waiting run says so
    expected = final_weights(reference / "out", row["config_hash"])
    got = final_weights(out, row["config_hash"])
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_a_ddp_run_under_srun_equals_the_local_two_process_run(cluster, tmp_path):
    suite = write_mnist_suite(tmp_path, [{"model": "ae", "variant": "ddp", "params": TINY}],
                              budget={"epochs": 1})
    env = bench_env(cluster, tmp_path)
    common = ["--suite", str(suite), "--accelerator", "cpu", "--devices", "2", "--strategy",
              "ddp", "--wandb", "disabled", "--no-progress"]
    under_srun = bench("run", *common, "--out", str(tmp_path / "srun"), env=env,
                       prefix=("srun", "--nodes", "1", "--ntasks-per-node", "2",
                               "--cpus-per-task", "1"))
    assert under_srun.returncode == 0, under_srun.stdout[-3000:] + under_srun.stderr[-3000:]
    local_env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    local = bench("run", *common, "--out", str(tmp_path / "local"), env=local_env)
    assert local.returncode == 0, local.stderr[-3000:]
    rows = [read_rows(tmp_path / out / "runs.csv").iloc[0] for out in ("srun", "local")]
    assert rows[0]["devices"] == rows[1]["devices"] == 2
    assert rows[0]["config_hash"] == rows[1]["config_hash"]
    assert rows[0]["recon_mse"] == rows[1]["recon_mse"]
    weights = [final_weights(tmp_path / out, rows[0]["config_hash"]) for out in ("srun", "local")]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_srun_with_ntasks_is_refused_with_the_option_to_write_instead(cluster, tmp_path):
    suite = write_mnist_suite(tmp_path, [{"model": "ae", "variant": "x", "params": TINY}])
    done = bench("run", "--suite", str(suite), "--out", str(tmp_path / "out"), "--devices", "2",
                 "--strategy", "ddp", env=bench_env(cluster, tmp_path), prefix=("srun", "-n", "2"))
    assert done.returncode != 0
    assert done.stderr.count("write `srun --ntasks-per-node 2` instead") == 2  # each task says it
    assert not os.path.exists(tmp_path / "out" / "rows")


def test_a_job_killed_without_a_result_is_reported_instead_of_awaited(cluster, job_array,
                                                                      tmp_path):
    """Without accounting submitit learns that a job ended from its result file only; a job
    SIGKILLed (out of memory, a lost node) writes none, and bench run must not wait forever."""
    _, suite, _ = job_array
    out = tmp_path / "out"
    process, deadline = long_run_at_its_first_checkpoint(cluster, suite, out, tmp_path)
    try:
        # the job's Python, as the out-of-memory killer would (one node: a process here)
        task = subprocess.run(["pgrep", "-f", rf"^\S*python\S* -u -m submitit.core._submit {out}"],
                              capture_output=True, text=True).stdout.split()
        assert len(task) == 1, task
        os.kill(int(task[0]), signal.SIGKILL)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert "FAILED: ae-long-mnist-s0" in output and "left the queue without a result" in output, \
        output
    assert not (out / "rows").exists()


@pytest.mark.skipif(not os.environ.get("GENBENCH_SLURM_TIME_LIMIT"),
                    reason="minutes long: set GENBENCH_SLURM_TIME_LIMIT=1 to run it")
def test_a_job_at_its_time_limit_is_requeued_until_done_and_ends_bitwise_equal(cluster,
                                                                               tmp_path):
    """A 2-minute limit: SLURM sends USR2 90 s before it (submitit's --signal=USR2@90), so
    each attempt trains about 20 s, checkpoints and is requeued, until the run is done."""
    suite = write_mnist_suite(tmp_path, [{**LONG, "budget": {"epochs": 3000}}])
    env = bench_env(cluster, tmp_path)
    common = ["--suite", str(suite), "--wandb", "disabled", "--no-progress",
              *SLURM_ARGS[:-4], "--checkpoint-every", "100000"]
    whole = bench("run", *common, "--out", str(tmp_path / "whole"), "--slurm-time", "30",
                  env=env, timeout=600)
    assert whole.returncode == 0, whole.stdout[-3000:]
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", *common, "--out", str(tmp_path / "limited"),
         "--slurm-time", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    requeues, deadline = 0, time.monotonic() + 900
    while process.poll() is None and time.monotonic() < deadline:
        if "BeginTime" in cluster.run("squeue", "-h", "-o", "%r").stdout:  # held 2 minutes
            job = cluster.run("squeue", "-h", "-o", "%A").stdout.split()[0]
            release_requeued(cluster, job)
            requeues += 1
        time.sleep(1)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 0 and requeues >= 1, output[-3000:]
    row = read_rows(tmp_path / "limited" / "runs.csv").iloc[0]
    assert row["resumed_step"] > 0
    expected = final_weights(tmp_path / "whole", row["config_hash"])
    got = final_weights(tmp_path / "limited", row["config_hash"])
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
