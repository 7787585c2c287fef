"""One run over two processes (DDP on CPU with gloo), and several runs at once."""

import os
import subprocess
import sys

import pytest
import torch

from bench.evaluate import EvalSettings, evaluate
from bench.extractor import get_extractor
from bench.results import read_rows
from bench.suite import load_suite
from datamodules import ImageDataModule, TensorBatches
from modules import MODELS
from modules.steps import FitsLatentDensity
from tests.data_files import write_mnist_suite
from tests.slurm_cluster import unavailable as slurm_unavailable

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


# Every family and variant, mlp and conv: (variant name, model, params).
VARIANTS = [(f"{name}-{backbone}", model, {"backbone": backbone, **params})
            for backbone in ("mlp", "conv")
            for name, model, params in [
                ("ae", "ae", {}), ("sae-l1", "sae", {"sparsity": "l1"}),
                ("sae-kl", "sae", {"sparsity": "kl"}),
                ("sae-topk", "sae", {"sparsity": "topk", "k": 2, "aux_k": 4,
                                     "latent_dim": 16}),
                ("sae-batchtopk", "sae", {"sparsity": "batchtopk,matryoshka", "k": 2,
                                          "aux_k": 4, "latent_dim": 16}),
                ("sae-jumprelu", "sae", {"sparsity": "jumprelu"}),
                ("sae-mask", "sae", {"sparsity": "input_mask"}), ("vae", "vae", {}),
                ("vae-iwae", "vae", {"objective": "iwae", "samples": 3}),
                ("gan-ns", "gan", {}), ("gan-wgan-gp", "gan", {"loss": "wgan-gp"}),
                ("gan-sngan-ema", "gan", {"loss": "hinge", "spectral_norm": "discriminator",
                                          "ema_decay": 0.99}),
                ("gan-r1", "gan", {"r1_weight": 1.0, "r1_every": 2}),
                ("vqvae", "vqvae", {"code_dim": 2, "codebook_size": 8}),
                ("vqvae-loss-restart", "vqvae", {"code_dim": 2, "codebook_size": 8,
                                                 "codebook": "loss", "restart_below": 0.5})]]
DATA = {"val_size": 40, "batch_size": 20, "eval_batch_size": 25, "own_files": True}


@pytest.fixture(scope="module")
def ddp_suite(tmp_path_factory):
    """One 2-process DDP run of every variant (gloo on CPU), with a mixture fitted on fewer
    codes than the training split holds, so that a wrong gather would show."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    tiny = {"hidden": 16, "latent_dim": 4, "width": 4}
    mixture = {"gmm_components": 2, "gmm_max_samples": 150}  # 150 of 361 training images
    runs = [{"model": model, "variant": name,
             "params": tiny | params | (mixture if model in ("ae", "sae") else {})}
            for name, model, params in VARIANTS]
    # a seed at which some top-k unit fires in one rank's shard of the test split only (seen;
    # see the dead_fraction test below)
    next(run for run in runs if run["variant"] == "sae-topk-conv")["seeds"] = [1]
    suite = write_mnist_suite(tmp_path, runs, n_train=401, n_test=121, eval=EVAL, data=DATA)
    done = bench("run", "--suite", str(suite), "--out", str(tmp_path / "out"),
                 "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                 "--wandb", "disabled", "--no-progress", tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp_path, read_rows(tmp_path / "out" / "runs.csv"), done.stdout


@pytest.mark.slow
def test_every_variant_trains_under_ddp_and_rank_zero_alone_reports(ddp_suite):
    tmp_path, rows, stdout = ddp_suite
    assert sorted(rows["variant"]) == sorted(name for name, _, _ in VARIANTS)
    assert (rows["status"] == "ok").all() and (rows["devices"] == 2).all()
    assert stdout.count("suite tiny:") == 1  # only rank zero speaks
    assert (rows["n_fake"] == 200).all() and rows["fid"].gt(0).all()  # generated on rank zero


@pytest.mark.slow
def test_a_ddp_run_is_another_experiment_than_the_single_device_run(ddp_suite, monkeypatch):
    tmp_path, rows, _ = ddp_suite
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    single = {s.variant: s.config_hash for s in load_suite(str(tmp_path / "suite.yaml")).specs}
    assert not set(rows["config_hash"]) & set(single.values())
    assert all('"launch": {"devices": 2, "num_nodes": 1}' in c for c in rows["config"])


@pytest.mark.slow
@pytest.mark.parametrize("variant, model", [(name, model) for name, model, _ in VARIANTS])
def test_ddp_figures_equal_a_single_process_evaluation_of_the_checkpoint(ddp_suite, variant,
                                                                         model, monkeypatch):
    tmp_path, rows, _ = ddp_suite
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    row = rows.set_index("variant").loc[variant]
    net = MODELS[model].load_from_checkpoint(row["checkpoint"]).eval()
    dm = ImageDataModule("mnist", data_dir=str(tmp_path / "data"), **DATA)
    dm.setup()
    if isinstance(net, FitsLatentDensity):  # DDP fitted the density a single process fits
        fitted = {k: v.clone() for k, v in net.state_dict().items()
                  if k.startswith(("gmm_", "prior_"))}
        net.fit_latent_density(dm.ordered_train_dataloader())
        for key, value in fitted.items():
            assert torch.allclose(net.state_dict()[key], value, rtol=1e-4, atol=1e-5), key
    settings = EvalSettings(**EVAL)
    extractor = get_extractor(settings.features, dm)
    single, _ = evaluate(net, dm, settings, extractor, seed=int(row["seed"]))
    for metric in MODELS[model].family.figures():  # what the family's row holds
        assert row[metric] == pytest.approx(single[metric], rel=1e-4, abs=1e-6), metric


@pytest.mark.slow
def test_some_topk_unit_fires_on_one_rank_only_so_the_dead_fraction_reduction_matters(ddp_suite):
    """The equality test above can only see a wrong cross-process reduction of `dead_fraction`
    (a mean of the ranks' ever-active flags instead of their max) if some unit is active in one
    rank's shard of the test split and never in the other's."""
    tmp_path, rows, _ = ddp_suite
    row = rows.set_index("variant").loc["sae-topk-conv"]
    net = MODELS["sae"].load_from_checkpoint(row["checkpoint"]).eval()
    dm = ImageDataModule("mnist", data_dir=str(tmp_path / "data"), **DATA)
    dm.setup()
    active = []
    for rank in (0, 1):
        shard = TensorBatches(dm.test_images, dm.test_labels, 25, shuffle=False, drop_last=False,
                              rank=rank, world_size=2)
        with torch.no_grad():
            active.append(torch.cat([net.encode(x) for x, _ in shard]).ne(0).any(0))
    assert 0 < row["l0"] <= 2  # at most k = 2 of 16 units: really sparse
    assert (active[0] ^ active[1]).any(), "no unit tells max from mean"


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
@pytest.mark.skipif(slurm_unavailable() is None,
                    reason="a real SLURM runs the job array here (tests/bench/test_slurm.py)")
def test_slurm_launcher_runs_the_job_array_and_collects_rows(tmp_path):
    """Where no real SLURM can be brought up, submitit's local executor stands in for it: the
    same job array, the same pickled jobs."""
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


@pytest.fixture(scope="module")
def ddp_state(tmp_path_factory):
    """What tests/ddp_state.py's two processes save."""
    out = tmp_path_factory.mktemp("ddp-state")
    done = subprocess.run([sys.executable, "-m", "tests.ddp_state", str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_spectral_norms_power_iteration_vectors_agree_on_every_rank(ddp_state):
    """Rank 1's vectors start elsewhere and each rank sees its own data: the strategy's buffer
    broadcast must bring them to rank 0's, so that both ranks normalise by the same estimate."""
    vectors = torch.load(ddp_state / "vectors.pt")
    assert vectors.shape[0] == 2 and torch.equal(vectors[0], vectors[1])


@pytest.mark.slow
def test_the_vqvaes_codebook_over_two_processes_equals_one_processs(ddp_state):
    """The EMA codebook's statistics, its data initialisation and its restarts each see every
    process's vectors: two processes on half a batch each end where one does on the whole."""
    from tests.ddp_state import train_vqvae
    single = train_vqvae().state_dict()
    ddp = torch.load(ddp_state / "vqvae.pt")
    assert single.keys() == ddp.keys()
    for name, tensor in single.items():
        assert torch.allclose(ddp[name], tensor, rtol=1e-5, atol=1e-6), name
