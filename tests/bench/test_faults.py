"""Faults a long suite meets: a killed process, and malformed suite files."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.results import holds_table, read_rows
from bench.launch import run_suite
from bench.runner import RunOptions
from bench.suite import SuiteError, load_suite
from tests.data_files import write_mnist_suite


@pytest.mark.slow
def test_a_killed_suite_loses_no_row_and_resumes_from_its_checkpoint(tmp_path, caplog):
    suite_path = write_mnist_suite(
        tmp_path, [{"model": "ae", "variant": "short", "budget": {"epochs": 1}},
                   {"model": "ae", "variant": "long", "budget": {"epochs": 120}}],
        params={"hidden": 16, "latent_dim": 4})
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENBENCH_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", "--suite", str(suite_path), "--out", str(out),
         "--wandb", "disabled", "--no-progress", "--checkpoint-every", "20"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    long_hash = load_suite(str(suite_path)).specs[1].config_hash
    checkpoint = out / "checkpoints" / long_hash / "last.ckpt"
    deadline = time.monotonic() + 120
    try:
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # let it train past the first checkpoint
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert checkpoint.exists(), "the long run never wrote a checkpoint"
    before = read_rows(out / "runs.csv")
    assert before["variant"].tolist() == ["short"]  # killed inside the second run

    run_suite(load_suite(str(suite_path)), out)
    messages = caplog.messages
    rows = read_rows(out / "runs.csv")
    assert rows["variant"].tolist() == ["short", "long"] and rows["config_hash"].is_unique
    # the finished row is unchanged (the resumed row may add a column, resumed_step)
    pd.testing.assert_frame_equal(rows.iloc[:1][before.columns], before, check_dtype=False)
    assert any("resuming from" in m for m in messages)
    resumed = rows.set_index("variant").loc["long"]
    assert resumed["status"] == "ok" and resumed["resumed_step"] >= 20
    final = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert final["progress"]["epoch"] == 119  # the whole budget was trained, not restarted


def start_and_kill_after_first_checkpoint(suite_path, out, checkpoint, every: int, tmp_path):
    """Run the suite in a subprocess and SIGKILL it as soon as `checkpoint` exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENBENCH_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", "--suite", str(suite_path), "--out", str(out),
         "--wandb", "disabled", "--no-progress", "--checkpoint-every", str(every)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert checkpoint.exists(), "the run never wrote a checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("model, params, data, trainer", [
    ("vae", {}, {"binarize": True}, {}),  # dynamic binarisation, a posterior sample per image
    ("gan", {"backbone": "mlp"}, {}, {}),  # generator noise, two optimisers
    ("sae", {"sparsity": "input_mask"}, {}, {}),  # random input masks
    # power iterations of both nets, the generator EMA, a lazy R1 every third batch, DiffAugment
    ("gan", {"backbone": "mlp", "loss": "hinge", "spectral_norm": "both", "ema_decay": 0.9,
             "r1_weight": 1.0, "r1_every": 3, "diffaugment": "color,translation,cutout"},
     {}, {}),
    # BatchTopK's threshold and AuxK's dead-unit counts: buffers a resume must restore
    ("sae", {"sparsity": "batchtopk,matryoshka", "k": 2, "aux_k": 2}, {}, {}),
    # the generator every 4th batch of the run, across the resume
    ("gan", {"backbone": "mlp", "loss": "wgan-gp", "n_critic": 4}, {}, {}),
    ("vae", {"lr_schedule": "burda"}, {}, {"gradient_clip_val": 0.5}),  # schedule, clipping
    # the EMA codebook and its counts, the data initialisation done once, restarts
    ("vqvae", {"code_dim": 2, "codebook_size": 16, "decay": 0.5, "restart_below": 0.5}, {}, {}),
])
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, model, params,
                                                                    data, trainer):
    """25 batches an epoch, a checkpoint every 7 batches: the kill lands mid-epoch. The resumed
    run must continue the epoch at the next batch with the same random state, and end with the
    same weights (bitwise) and figures as a run that was never stopped."""
    suite_path = write_mnist_suite(
        tmp_path, [{"model": model, "variant": "v",
                    "params": {"hidden": 16, "latent_dim": 4, **params}}],
        budget={"epochs": 30}, data=data, trainer=trainer)
    spec = load_suite(str(suite_path)).specs[0]
    every_7 = RunOptions(checkpoint_every=7)
    run_suite(load_suite(str(suite_path)), tmp_path / "whole", options=every_7)

    killed = tmp_path / "killed"
    start_and_kill_after_first_checkpoint(
        suite_path, killed, killed / "checkpoints" / spec.config_hash / "last.ckpt", 7, tmp_path)
    assert not (killed / "rows").exists(), "the run finished before it was killed"
    # resumed in a copy of the folder, the original gone: as on another machine
    moved = tmp_path / "moved"
    shutil.copytree(killed, moved)
    shutil.rmtree(killed)
    run_suite(load_suite(str(suite_path)), moved, options=every_7)

    whole, resumed = (read_rows(out / "runs.csv").iloc[0] for out in (tmp_path / "whole", moved))
    assert resumed["resumed_step"] > 0 and resumed["resumed_step"] % 25 != 0  # mid-epoch
    assert resumed["steps"] == whole["steps"] == 30 * 25
    weights = [torch.load(out / "checkpoints" / spec.config_hash / "final.ckpt",
                          weights_only=True)["state_dict"] for out in (tmp_path / "whole", moved)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    for metric in ("recon_mse", "psnr", "ssim", "l0", "hoyer", "elbo", "iw_nll"):
        if metric in whole and not pd.isna(whole[metric]):
            assert resumed[metric] == whole[metric], metric


def ddp_gan_runner(tmp_path, epochs: int, checkpoint_every: int):
    """A function that starts `bench run` of a tiny MLP GAN over two CPU processes (gloo) into
    a folder, in a session of its own (a signal to the group reaches rank 1, a child of
    rank 0)."""
    suite_path = write_mnist_suite(
        tmp_path, [{"model": "gan", "variant": "v",
                    "params": {"backbone": "mlp", "hidden": 16, "latent_dim": 4}}],
        budget={"epochs": epochs})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENBENCH_CACHE": str(tmp_path / "cache"),
           "GENBENCH_DDP_TIMEOUT_S": "60"}

    def bench_run(out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.cli", "run", "--suite", str(suite_path), "--out",
             str(out), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
             "--wandb", "disabled", "--no-progress", "--checkpoint-every",
             str(checkpoint_every)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
    return bench_run


@pytest.mark.slow
def test_a_killed_ddp_run_resumes_each_ranks_noise_to_the_uninterrupted_result(tmp_path):
    """Two processes (gloo), a GAN whose ranks draw their own latents: the kill lands after the
    first checkpoint, and the resumed run must give each rank back its own random state, ending
    bitwise where the uninterrupted run ends."""
    bench_run = ddp_gan_runner(tmp_path, epochs=20, checkpoint_every=7)

    assert bench_run(tmp_path / "whole").wait(timeout=300) == 0
    killed = tmp_path / "killed"
    process = bench_run(killed)
    deadline = time.monotonic() + 200
    try:  # the run's folder is named by its config hash, which counts the devices
        while (not list(killed.glob("checkpoints/*/last.ckpt")) and process.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert list(killed.glob("checkpoints/*/last.ckpt")) and not holds_table(killed)
    assert bench_run(killed).wait(timeout=300) == 0

    whole, resumed = (read_rows(out / "runs.csv").iloc[0] for out in (tmp_path / "whole", killed))
    assert resumed["resumed_step"] > 0 and resumed["steps"] == whole["steps"]
    weights = [torch.load(*out.glob("checkpoints/*/final.ckpt"), weights_only=True)["state_dict"]
               for out in (tmp_path / "whole", killed)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def loads_or_fails_cleanly(path, text: str) -> None:
    """A suite file either loads or raises SuiteError naming the file; nothing else escapes."""
    path.write_text(text)
    try:
        load_suite(str(path))
    except SuiteError as err:
        assert str(err).startswith(str(path))


KEYS = ["name", "runs", "defaults", "model", "variant", "params", "datasets", "seeds", "budget",
        "epochs", "steps", "data", "eval", "trainer", "backbone", "sparsity", "n_fake", "junk"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["ae", "sae", "vae", "gan", "mnist",
                                                           "cifar10", "mlp", "conv", "topk"]))
DOCUMENTS = st.recursive(
    SCALARS, lambda children: st.one_of(st.lists(children, max_size=4),
                                        st.dictionaries(st.sampled_from(KEYS), children,
                                                        max_size=5)), max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=DOCUMENTS)
def test_malformed_suites_only_ever_give_clean_errors(tmp_path, document):
    loads_or_fails_cleanly(tmp_path / "fuzz.yaml", yaml.safe_dump(document))


VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.sampled_from(KEYS), SCALARS, max_size=3))
RUNS = st.fixed_dictionaries({"model": st.one_of(st.sampled_from(["ae", "sae", "vae", "gan"]),
                                                 SCALARS)},
                             optional={key: VALUES for key in ["variant", "params", "datasets",
                                                              "seeds", "budget", "data", "eval",
                                                              "trainer"]})
NEAR_VALID = st.fixed_dictionaries({"name": SCALARS, "runs": st.lists(RUNS, min_size=1,
                                                                      max_size=3)},
                                   optional={"defaults": VALUES, "wandb": VALUES})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=NEAR_VALID)
def test_suites_with_wrong_values_only_ever_give_clean_errors(tmp_path, document):
    loads_or_fails_cleanly(tmp_path / "near.yaml", yaml.safe_dump(document))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_arbitrary_text_gives_a_clean_error(tmp_path, text):
    loads_or_fails_cleanly(tmp_path / "text.yaml", text)


def wait_for(predicate, process, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not predicate() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def final_weights(out: Path) -> dict:
    return torch.load(*out.glob("checkpoints/*/final.ckpt"), weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signalled_run_checkpoints_its_batch_and_resumes_to_the_uninterrupted_result(
        tmp_path, signum, status):
    """SIGTERM (SLURM's notice before a time limit or a preemption) or Ctrl-C mid-run, with no
    periodic checkpoint due: the run finishes its batch, writes a checkpoint there, records
    nothing, and exits 128 + the signal; the next bench run resumes there and ends bitwise as a
    run never stopped."""
    suite_path = write_mnist_suite(
        tmp_path, [{"model": "vae", "variant": "v", "params": {"hidden": 16, "latent_dim": 4}}],
        budget={"epochs": 200}, data={"binarize": True})
    run_suite(load_suite(str(suite_path)), tmp_path / "whole")

    stopped = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENBENCH_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", "--suite", str(suite_path), "--out",
         str(stopped), "--wandb", "disabled", "--no-progress", "--checkpoint-every", "100000"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list(stopped.glob("checkpoints/*")), process)
    time.sleep(0.5)  # into the training
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr[-2000:]
    assert f"{signal.Signals(signum).name} received" in stderr
    assert "run the same bench run again" in stderr and "Traceback" not in stderr
    assert not holds_table(stopped)  # nothing recorded as finished
    state = torch.load(*stopped.glob("checkpoints/*/last.ckpt"), weights_only=True)
    assert 0 < state["progress"]["batches"] < 200 * 25  # where it was, not a periodic one

    run_suite(load_suite(str(suite_path)), stopped)
    resumed = read_rows(stopped / "runs.csv").iloc[0]
    assert resumed["resumed_step"] == state["progress"]["batches"]
    whole, again = final_weights(tmp_path / "whole"), final_weights(stopped)
    for key in whole:
        assert torch.equal(whole[key], again[key]), key


@pytest.mark.slow
def test_a_sigtermed_ddp_run_stops_every_rank_at_one_batch_and_resumes_bitwise(tmp_path):
    bench_run = ddp_gan_runner(tmp_path, epochs=100, checkpoint_every=100000)
    assert bench_run(tmp_path / "whole").wait(timeout=300) == 0
    stopped = tmp_path / "stopped"
    process = bench_run(stopped)
    wait_for(lambda: list(stopped.glob("checkpoints/*")), process)
    time.sleep(2)  # both ranks into the training (2,500 batches: several seconds more)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    assert list(stopped.glob("checkpoints/*/last.ckpt")) and not holds_table(stopped)
    assert bench_run(stopped).wait(timeout=300) == 0
    whole, again = final_weights(tmp_path / "whole"), final_weights(stopped)
    for key in whole:
        assert torch.equal(whole[key], again[key]), key


@pytest.mark.slow
def test_two_suites_on_one_folder_at_once_train_each_run_once(tmp_path):
    runs = [{"model": "ae", "variant": f"v{i}", "params": {"hidden": 16, "latent_dim": 4}}
            for i in range(3)]
    suite_path = write_mnist_suite(tmp_path, runs, budget={"epochs": 150})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENBENCH_CACHE": str(tmp_path / "cache")}
    processes = [subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", "--suite", str(suite_path), "--out",
         str(tmp_path / "out"), "--wandb", "disabled", "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    rows = read_rows(tmp_path / "out" / "runs.csv")
    assert sorted(rows["variant"]) == ["v0", "v1", "v2"] and rows["config_hash"].is_unique
    trained = sum(o.count("on mnist seed 0:") for o in outputs)
    assert trained == 3  # each run trained by one process
    assert any("left to it" in o for o in outputs), outputs
