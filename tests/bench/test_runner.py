import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import bench.launch
from bench.cli import main
from bench.compare import environment_differences
from bench.results import read_rows
from bench.launch import run_suite
from bench.runner import RunOptions, RunResult
from bench.suite import RunSpec, load_suite
from modules import Autoencoder
from tests.data_files import write_mnist_suite

REPO = Path(__file__).resolve().parents[2]
BASELINE = REPO / "results" / "baselines" / "smoke.csv"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
# Everything in a row that a fixed seed fixes on CPU: all metrics but the timings.
DETERMINISTIC = ("recon_mse,psnr,ssim,l0,dead_fraction,hoyer,elbo,rate,distortion,iw_nll,fid,"
                 "kid_mean,isc_mean,precision,recall,density,coverage")
SAME_FIGURE_RTOL = 1e-6


@pytest.fixture
def tiny_suite(tmp_path, monkeypatch):
    """Two AE runs on a small synthetic MNIST; the first has lr 10, the second lr 0.001."""
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    hot, cool = ({"model": "ae", "variant": name, "params": {"hidden": 16, "latent_dim": 4,
                                                         "lr": lr}}
                 for name, lr in (("hot", 10.0), ("cool", 0.001)))
    path = write_mnist_suite(tmp_path, [hot, cool])
    return load_suite(str(path))


def run_quietly(suite, out, **kwargs):
    return run_suite(suite, out, options=RunOptions(**kwargs))


@pytest.mark.integration
def test_a_diverged_run_is_recorded_and_the_suite_goes_on(tiny_suite, tmp_path, monkeypatch):
    honest_losses = Autoencoder.losses

    def nan_when_hot(self, x):  # fault injection: the lr-10 run's loss turns NaN at once
        terms = honest_losses(self, x)
        if self.hparams.lr > 1:
            terms = {k: v * float("nan") for k, v in terms.items()}
        return terms

    monkeypatch.setattr(Autoencoder, "losses", nan_when_hot)
    rows = run_quietly(tiny_suite, tmp_path / "out").set_index("variant")
    assert rows.loc["hot", "status"] == "diverged" and rows.loc["hot", "diverged_step"] >= 0
    assert rows.loc["cool", "status"] == "ok" and rows.loc["cool", "recon_mse"] > 0


@pytest.mark.integration
def test_an_interrupted_suite_keeps_finished_rows_and_resumes(tiny_suite, tmp_path, monkeypatch):
    real_run_one = bench.launch.run_one

    def interrupted_second(spec, *args, **kwargs):
        if spec.variant == "cool":
            raise KeyboardInterrupt
        return real_run_one(spec, *args, **kwargs)

    monkeypatch.setattr(bench.launch, "run_one", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        run_quietly(tiny_suite, tmp_path / "out")
    first = read_rows(tmp_path / "out" / "runs.csv")
    assert first["variant"].tolist() == ["hot"]

    monkeypatch.setattr(bench.launch, "run_one", real_run_one)
    rows = read_rows(tmp_path / "out" / "runs.csv")
    run_quietly(tiny_suite, tmp_path / "out")
    rows = read_rows(tmp_path / "out" / "runs.csv")
    assert rows["variant"].tolist() == ["hot", "cool"]
    pd.testing.assert_frame_equal(rows.iloc[:1], first, check_dtype=False)


def matches_the_baseline(out: Path) -> str:
    """The smoke check: the runs in `out` against the committed baseline, run by run. On the
    baseline's machine (same CPU, instruction sets, threads and library versions) every
    deterministic figure must agree; on another machine only the runs without convolutions,
    whose training is bitwise the same on every x86-64 CPU seen (conv layers take oneDNN's
    kernels for the CPU's instruction set, and a chaotic run then drifts as another seed would;
    docs/reproducing.md). "Agree" is to SAME_FIGURE_RTOL: FID, KID and IS pass through the
    feature classifier's conv layers and scipy's BLAS, and move at 1e-7 between hosts of one
    kind; anything the code changes moves a figure by far more. Returns the environment
    difference ('' on the baseline's machine)."""
    rows = read_rows(out / "runs.csv").set_index(["model", "variant"])
    baseline = read_rows(BASELINE).set_index(["model", "variant"])
    environment = environment_differences(baseline.reset_index(), rows.reset_index())[0]
    checked = rows.index
    if environment:
        checked = [key for key in rows.index
                   if json.loads(rows.loc[key, "config"])["params"].get("backbone") == "mlp"]
    assert len(checked), "no run to check"
    metrics = [m for m in DETERMINISTIC.split(",") if baseline.loc[checked, m].notna().any()]
    pd.testing.assert_frame_equal(rows.loc[checked, metrics], baseline.loc[checked, metrics],
                                  rtol=SAME_FIGURE_RTOL, atol=0, check_dtype=False)
    return environment


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="Debian dataset-fashion-mnist missing")
@pytest.mark.integration
def test_smoke_suite_matches_the_committed_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "smoke"
    assert main(["run", "--suite", "smoke", "--out", str(out), "--wandb", "offline",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = read_rows(out / "runs.csv")
    assert rows["model"].tolist() == ["ae", "sae", "vae", "gan"]
    assert (rows["status"] == "ok").all() and rows["git_commit"].notna().all()
    assert rows.loc[rows["model"] != "ae", "fid"].gt(0).all() and (rows["n_fake"] == 1000).all()
    assert (rows["data_files"] == "verified").all() and rows["data_md5"].nunique() == 1
    assert rows["cpu"].notna().all() and (rows["torch_threads"] == 1).all()
    assert (out / "runs.parquet").is_file() and (out / "summary.md").read_text().count("|") > 20
    assert {p.name for p in (out / "plots").glob("*.png")} >= {
        "ae-mlp-fashion_mnist-s0-samples.png", "ae-mlp-fashion_mnist-s0-reconstructions.png",
        "metric-fid.png", "metric-recon_mse.png"}
    assert len(list((out / "wandb").glob("offline-run-*"))) == 5  # 4 runs and the summary
    assert "| model / variant" in printed  # the summary table at the end
    assert "Made on: " in printed and "Data files: fashion_mnist: verified" in printed

    matches_the_baseline(out)
    assert main(["compare", str(BASELINE), str(out / "runs.csv"),
                 "--metrics", DETERMINISTIC]) == 0, capsys.readouterr().out

    capsys.readouterr()
    assert main(["run", "--suite", "smoke", "--out", str(out), "--wandb", "disabled",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.count("skipped") == 4
    assert len(read_rows(out / "runs.csv")) == 4


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="Debian dataset-fashion-mnist missing")
@pytest.mark.integration
def test_a_planted_numeric_change_fails_the_smoke_check(tmp_path, monkeypatch):
    """The AE's learning rate x1.01: on the baseline's machine and on any other (an MLP run)."""
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    suite = load_suite("smoke")
    suite.specs = [dataclasses.replace(s, params={**s.params, "lr": 1e-3 * 1.01})
                   for s in suite.specs if s.model == "ae"]
    run_quietly(suite, tmp_path / "planted")
    with pytest.raises(AssertionError, match="recon_mse"):
        matches_the_baseline(tmp_path / "planted")


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="Debian dataset-fashion-mnist missing")
@pytest.mark.slow
def test_the_smoke_check_passes_on_another_instruction_set(tmp_path):
    """The smoke suite in a process limited to AVX2 (oneDNN and ATen), as on an older CPU:
    its rows say so, its conv runs differ from the baseline's, and the check passes."""
    out = tmp_path / "smoke-avx2"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
           "OMP_NUM_THREADS": "1", "GENBENCH_CACHE": str(tmp_path / "cache"),
           "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--suite", "smoke", "--out",
                           str(out), "--no-progress"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = read_rows(out / "runs.csv")
    assert (rows["cpu_capability"] == "AVX2").all() and (rows["onednn_isa"] == "Intel AVX2").all()
    assert matches_the_baseline(out) == "other hardware"
    assert rows.set_index("variant").loc["topk-conv", "recon_mse"] != read_rows(
        BASELINE).set_index("variant").loc["topk-conv", "recon_mse"]  # the check had a reason
    compared = subprocess.run([sys.executable, "-m", "bench.cli", "compare", str(BASELINE),
                               str(out / "runs.csv"), "--metrics", DETERMINISTIC],
                              capture_output=True, text=True, cwd=REPO, timeout=300)
    assert compared.returncode == 0, compared.stdout
    # the CPU model too differs where this machine is not the baseline's
    assert "Other hardware: " in compared.stdout
    assert "cpu_capability: AVX512 -> AVX2" in compared.stdout


@pytest.mark.integration
def test_force_redoes_a_run_from_scratch_as_a_new_row(tiny_suite, tmp_path, caplog):
    cool = load_suite(str(tiny_suite.path))
    cool.specs = [s for s in cool.specs if s.variant == "cool"]
    run_quietly(cool, tmp_path / "out", checkpoint_every=10)  # leaves a last.ckpt behind
    caplog.clear()
    run_suite(cool, tmp_path / "out", options=RunOptions(force=True, checkpoint_every=10))
    messages = caplog.messages
    rows = read_rows(tmp_path / "out" / "runs.csv")
    assert len(rows) == 2 and rows["config_hash"].nunique() == 1  # a re-measurement, kept
    assert not any("resuming from" in m for m in messages)
    assert any(m.startswith("  --force: starting over; the checkpoint ") for m in messages)
    assert rows["recon_mse"].iloc[0] == pytest.approx(rows["recon_mse"].iloc[1])  # same seed


@pytest.mark.integration
def test_a_suites_trainer_settings_reach_the_loop(tmp_path, monkeypatch):
    import bench.runner

    seen = []
    honest = bench.runner.fit

    def spy(run, **kwargs):
        seen.append(run.settings)
        return honest(run, **kwargs)

    monkeypatch.setattr(bench.runner, "fit", spy)
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    runs = [{"model": "ae", "variant": "plain", "params": {"hidden": 8, "latent_dim": 2}},
            {"model": "ae", "variant": "set", "params": {"hidden": 8, "latent_dim": 2},
             "trainer": {"log_every_n_steps": 3, "gradient_clip_val": 0.5}}]
    suite = load_suite(str(write_mnist_suite(tmp_path, runs, budget={"epochs": 1})))
    run_quietly(suite, tmp_path / "out", checkpoint_every=7)
    assert [(s.log_every_n_steps, s.gradient_clip_val, s.checkpoint_every) for s in seen] == [
        (50, None, 7), (3, 0.5, 7)]
    assert (read_rows(tmp_path / "out" / "runs.csv")["status"] == "ok").all()


@pytest.mark.integration
@pytest.mark.parametrize("family, params", [("vae", {}), ("gan", {}),
                                            ("gan", {"loss": "wgan-gp"})])
def test_a_steps_budget_counts_training_batches_for_every_family(tmp_path, monkeypatch, family,
                                                                 params):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    runs = [{"model": family, "variant": "v", "budget": {"steps": 23},
             "params": {"hidden": 16, "latent_dim": 4, "backbone": "mlp", **params}}]
    suite = load_suite(str(write_mnist_suite(tmp_path, runs)))
    row = run_quietly(suite, tmp_path / "out").iloc[0]
    assert row["steps"] == 23 and row["status"] == "ok"


def test_cpu_peak_memory_is_this_runs_not_the_process_lifetimes():
    import numpy as np

    from bench.runner import peak_memory_mb, reset_peak_memory

    cpu = __import__("torch").device("cpu")
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, freed before the "run" starts
    del big
    before = peak_memory_mb(cpu)
    assert reset_peak_memory(cpu) == "run"
    after = peak_memory_mb(cpu)
    assert before - after > 300  # the earlier peak no longer counts


def test_devices_and_nodes_are_part_of_a_runs_identity():
    from bench.suite import RunSpec

    spec = RunSpec("s", "ae", "mlp", "mnist", 0, budget={"epochs": 1})
    assert spec.on(1, 1).config_hash == spec.config_hash  # single-device hashes stay as they were
    hashes = {spec.on(2, 1).config_hash, spec.on(1, 2).config_hash, spec.on(4, 2).config_hash}
    assert len(hashes) == 3 and spec.config_hash not in hashes


def test_the_one_run_code_never_imports_the_suite_level_code():
    """cli -> bench.launch (suite: skip, dispatch, summary) -> bench.runner (one run)."""
    import ast

    tree = ast.parse((REPO / "bench" / "runner.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
    assert not imported & {"bench.launch", "bench.cli"}, imported


def test_a_ddp_runs_throughput_is_all_ranks_images_over_the_slowest_ranks_time():
    import types

    import torch

    from bench.loop import Progress, throughput

    mine = Progress(timed_images=1000, timed_seconds=2.0)  # rank 0: 500 images/s
    other_rank = torch.tensor([1000.0, 4.0, 900.0], dtype=torch.float64)  # 250 images/s
    fabric = types.SimpleNamespace(device=torch.device("cpu"), world_size=2,
                                   all_gather=lambda t: torch.stack([t, other_rank]))
    assert throughput(fabric, mine, peak_mb=700.0) == {"train_img_per_s": 2000 / 4.0,
                                                       "peak_mem_mb": 900.0}
    fabric.world_size = 1
    assert throughput(fabric, mine, 700.0) == {"train_img_per_s": 500.0, "peak_mem_mb": 700.0}


NVML = "PYTORCH_NVML_BASED_CUDA_CHECK"


def _fail_to_load(name, *args, **kwargs):
    raise OSError(f"{name}: cannot open shared object file")


@pytest.mark.parametrize("setting, loads, dropped", [("1", False, True), ("1", True, False),
                                                     ("0", False, False)])
def test_the_nvml_check_is_dropped_only_where_nvml_cannot_be_loaded(monkeypatch, setting,
                                                                    loads, dropped):
    import ctypes
    import os

    from bench.process import drop_failing_nvml_check

    monkeypatch.setenv(NVML, setting)
    monkeypatch.setattr(ctypes, "CDLL", (lambda name, *a, **k: object()) if loads
                        else _fail_to_load)
    assert drop_failing_nvml_check() is dropped
    assert os.environ.get(NVML) == (None if dropped else setting)


@pytest.mark.integration
def test_an_unreadable_checkpoint_is_set_aside_and_the_run_starts_afresh(tiny_suite, tmp_path,
                                                                         caplog):
    cool = load_suite(str(tiny_suite.path))
    cool.specs = [s for s in cool.specs if s.variant == "cool"]
    ckpt_dir = tmp_path / "out" / "checkpoints" / cool.specs[0].config_hash
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "last.ckpt").write_bytes(b"PK\x03\x04 torn")
    run_suite(cool, tmp_path / "out")
    messages = caplog.messages
    assert any("is unreadable" in m and "starting the run afresh" in m for m in messages)
    assert (ckpt_dir / "last.ckpt.unreadable").read_bytes() == b"PK\x03\x04 torn"
    assert read_rows(tmp_path / "out" / "runs.csv")["status"].tolist() == ["ok"]


@pytest.mark.integration
def test_a_checkpoint_whose_pickle_would_run_code_is_set_aside_and_runs_nothing(tiny_suite,
                                                                                 tmp_path, caplog):
    import torch

    from tests.datamodules.test_formats import _Payload

    cool = load_suite(str(tiny_suite.path))
    cool.specs = [s for s in cool.specs if s.variant == "cool"]
    ckpt_dir = tmp_path / "out" / "checkpoints" / cool.specs[0].config_hash
    ckpt_dir.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    torch.save({"progress": {"batches": 3}, "x": _Payload(marker)}, ckpt_dir / "last.ckpt")
    run_suite(cool, tmp_path / "out")
    messages = caplog.messages
    assert not marker.exists()
    assert any("last.ckpt is unreadable (UnpicklingError" in m for m in messages)
    assert read_rows(tmp_path / "out" / "runs.csv")["status"].tolist() == ["ok"]


@pytest.mark.slow
@pytest.mark.parametrize("kept", [True, False])
def test_freed_memory_is_kept_for_the_next_step_instead_of_faulting_in_again(kept):
    """A conv AE's training steps on a CPU free and allocate the same large buffers: with
    keep_freed_memory their pages stay mapped; without it they fault in again every step
    (thousands of pages)."""
    import subprocess
    import sys

    script = (
        "import resource, torch\n"
        "from bench.process import keep_freed_memory\n"
        f"print(keep_freed_memory() if {kept} else False)\n"
        "from modules import Autoencoder\n"
        "torch.manual_seed(0); model = Autoencoder(backbone='conv')\n"
        "optimizer = torch.optim.Adam(model.parameters())\n"
        "x = torch.rand(128, 1, 28, 28)\n"
        "def step():\n"
        "    model.losses(x)['loss'].backward(); optimizer.step(); optimizer.zero_grad()\n"
        "for _ in range(3): step()\n"
        "faults = []\n"
        "for _ in range(5):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    step(); faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "print(sorted(faults)[2])\n")  # the median: now and then a step grows the heap once
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    applied, faults_per_step = out[0] == "True", float(out[1])
    if kept:
        assert applied and faults_per_step < 100, faults_per_step
    else:
        assert faults_per_step > 1000, faults_per_step


def test_a_new_suite_forgets_the_signal_that_stopped_the_last_one():
    import signal

    from bench.runner import StopSignals

    stop = StopSignals()
    stop.signum = signal.SIGTERM  # what the handler left after the last suite stopped
    stop.install()
    assert not stop.requested()
    for signum, previous in stop.previous.items():  # leave this process as it was
        signal.signal(signum, previous)


def test_a_second_ctrl_c_stops_at_once():
    """The first SIGINT asks for the checkpoint at the batch; the second raises
    KeyboardInterrupt, as Python's own handler does."""
    import os
    import signal

    from bench.runner import StopSignals

    stop = StopSignals()
    before = signal.getsignal(signal.SIGINT)
    try:
        stop.install()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for signum, handler in stop.previous.items():
            signal.signal(signum, handler)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("epochs, steps, words", [(3, 1407, "after 3 epochs (1,407 steps)"),
                                                  (1, 20, "after 1 epoch (20 steps)"),
                                                  (float("nan"), 20, "")])
def test_the_words_under_a_runs_grids_say_how_long_it_trained(epochs, steps, words):
    from bench.runner import trained_for

    assert trained_for(epochs, steps) == words


def _result(**fields) -> RunResult:
    spec = RunSpec(suite="t", model="ae", variant="mlp", dataset="mnist", seed=1,
                   params={"hidden": 8}, entry="mlp", sweep_index=2)
    return RunResult(spec, "t", **{
        "data": {"data_source": "here (given)", "data_files": "verified", "data_md5": "abc"},
        "figures": {"recon_mse": 0.25, "n_fake": 100}, "machine": {"cpu": "A", "torch": "2"},
        "training": {"steps": 30, "wall_s": 1.5, "devices": 1, "peak_mem_scope": "run"},
        "commit": "c1", "checkpoint": "x/final.ckpt", "timestamp": "t0", **fields})


@pytest.mark.parametrize("fields, status", [({}, "ok"), ({"error": "no weights"}, "eval_failed"),
                                            ({"diverged_step": 7, "figures": {}}, "diverged")])
def test_a_run_result_reads_back_from_its_row(fields, status):
    result = _result(resumed_step=12, **fields)
    row = result.to_row()
    assert row["status"] == status and row["config_hash"] == result.spec.config_hash
    assert RunResult.from_row(row) == result
    assert RunResult.from_row(row).to_row() == row


def test_evaluating_again_keeps_the_training_and_renews_the_figures():
    from bench.metrics import Metric, declare, withdraw

    declare(Metric("toy_score", True, "Toy", ("n_fake",)))  # declared after the import
    try:
        trained = RunResult.from_row(_result(figures={"toy_score": 1.0}).to_row())
        assert trained.figures == {"toy_score": 1.0} and "toy_score" not in trained.training
        again = trained.evaluated_again(trained.spec, {"recon_mse": 0.5}, None, "c2",
                                        torch.device("cpu"), evaluated_from="h").to_row()
    finally:
        withdraw("toy_score")
    assert "toy_score" not in again and again["recon_mse"] == 0.5  # the old figures go
    assert again["steps"] == 30 and again["data_md5"] == "abc"  # the training's stay
    assert (again["trained_commit"], again["git_commit"]) == ("c1", "c2")
    assert again["evaluated_from"] == "h" and again["cpu"] != "A"  # the new machine's
    twice = RunResult.from_row(again).evaluated_again(trained.spec, {}, None, "c3",
                                                      torch.device("cpu")).to_row()
    assert (twice["trained_commit"], twice["git_commit"]) == ("c1", "c3")
