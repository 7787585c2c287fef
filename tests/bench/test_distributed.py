"""One run over two processes (DDP on CPU with gloo), and several runs at once."""

import os
import subprocess
import sys

import pytest

from bench.evaluate import EvalSettings, evaluate
from bench.results import read_rows
from datamodules import ImageDataModule
from modules import MODELS
from tests.data_files import write_mnist_suite

EVAL = {"n_fake": 200, "kid_subset_size": 100, "features": "classifier",
        "iw_k": 4, "iw_images": 50, "generation": True}


def write_suite(tmp_path, models: dict[str, str], **params):
    runs = [{"model": model, "variant": variant, "params": params}
            for variant, model in models.items()]
    return write_mnist_suite(tmp_path, runs, n_train=401, n_test=121, eval=EVAL,
                             data={"val_size": 40, "batch_size": 20, "eval_batch_size": 25},
                             params={"hidden": 16, "latent_dim": 4, "width": 4})


def bench(*args, tmp_path, timeout=400):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENBENCH_CACHE": str(tmp_path / "cache"),
           "GENBENCH_DDP_TIMEOUT_S": "60"}
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], env=env, timeout=timeout,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_ddp_run_matches_single_process_evaluation_of_its_checkpoint(tmp_path):
    suite = write_suite(tmp_path, {"mlp": "ae"}, gmm_components=2)
    done = bench("run", "--suite", str(suite), "--out", str(tmp_path / "out"),
                 "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                 "--wandb", "disabled", "--no-progress", tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = read_rows(tmp_path / "out" / "runs.csv")
    assert len(rows) == 1, "rank one must not write rows"
    row = rows.iloc[0]
    assert row["devices"] == 2 and row["status"] == "ok"
    assert row["n_fake"] == 200 and row["fid"] > 0  # generated once, on rank zero
    assert done.stdout.count("suite tiny:") == 1  # only rank zero speaks

    model = MODELS["ae"].load_from_checkpoint(row["checkpoint"]).eval()
    dm = ImageDataModule("mnist", data_dir=str(tmp_path / "data"), val_size=40,
                         batch_size=20, eval_batch_size=25)
    dm.setup()
    single, _ = evaluate(model, dm, EvalSettings(**{**EVAL, "generation": False}))
    for metric in ("recon_mse", "psnr", "ssim", "l0", "dead_fraction", "hoyer"):
        assert row[metric] == pytest.approx(single[metric], rel=1e-5), metric


@pytest.mark.slow
def test_parallel_runs_each_append_one_row(tmp_path):
    suite = write_suite(tmp_path, {"v0": "ae", "v1": "vae", "v2": "gan"})
    done = bench("run", "--suite", str(suite), "--out", str(tmp_path / "out"), "--parallel", "2",
                 "--accelerator", "cpu", "--wandb", "disabled", "--no-progress",
                 tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = read_rows(tmp_path / "out" / "runs.csv")
    assert sorted(rows["variant"]) == ["v0", "v1", "v2"] and rows["config_hash"].is_unique
    assert (rows["status"] == "ok").all()
    assert "| model / variant" in done.stdout


@pytest.mark.slow
def test_slurm_launcher_runs_the_job_array_and_collects_rows(tmp_path):
    """submitit's local executor stands in for SLURM: same job array, same pickled jobs."""
    suite = write_suite(tmp_path, {"a": "ae", "b": "sae"})
    done = bench("run", "--suite", str(suite), "--out", str(tmp_path / "out"),
                 "--launcher", "submitit-local", "--slurm-gpus", "0", "--slurm-cpus", "1",
                 "--accelerator", "cpu", "--wandb", "disabled", "--no-progress",
                 tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = read_rows(tmp_path / "out" / "runs.csv")
    assert sorted(rows["variant"]) == ["a", "b"] and (rows["status"] == "ok").all()
    assert "submitted 2 jobs to local" in done.stdout
    assert list((tmp_path / "out" / "slurm").glob("*/*_result.pkl"))
