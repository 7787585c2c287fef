"""bench.launch: a failed evaluation keeps the training; bench eval re-evaluates checkpoints."""

import re
from pathlib import Path

import pytest
import torch

import bench.runner
from bench.cli import main
from bench.evaluate import EvalSettings, evaluate, explain_evaluation_error
from bench.extractor import get_extractor
from bench.launch import run_suite
from bench.results import latest_runs, read_rows
from bench.runner import RunOptions
from bench.suite import load_suite
from datamodules import ImageDataModule
from modules import MODELS, Autoencoder
from tests.data_files import write_mnist_suite

TINY = {"hidden": 16, "latent_dim": 4, "gmm_components": 2}
EVAL = {"generation": True, "features": "classifier", "n_fake": 100, "kid_subset_size": 50}


@pytest.fixture
def two_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    path = write_mnist_suite(tmp_path, [{"model": "ae", "variant": v, "params": TINY}
                                        for v in ("first", "second")], eval=EVAL)
    return load_suite(str(path))


def quietly(suite, out, **kwargs):
    return run_suite(suite, out, options=RunOptions(**kwargs))


@pytest.mark.integration
def test_a_failed_evaluation_keeps_the_training_and_the_rerun_only_evaluates(two_runs, tmp_path,
                                                                            monkeypatch):
    honest_evaluate = bench.runner.evaluate

    def fails_for_first(model, dm, settings, *args, **kwargs):
        if model.hparams.hidden == 16 and not hasattr(fails_for_first, "done"):
            fails_for_first.done = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return honest_evaluate(model, dm, settings, *args, **kwargs)

    monkeypatch.setattr(bench.runner, "evaluate", fails_for_first)
    out = tmp_path / "out"
    quietly(two_runs, out)
    rows = read_rows(out / "runs.csv").set_index("variant")
    assert rows.loc["first", "status"] == "eval_failed"
    assert "lower it, e.g. `eval: {batch_size: 250}`" in rows.loc["first", "error"]
    assert rows.loc["second", "status"] == "ok"  # the suite went on
    first_hash = rows.loc["first", "config_hash"]
    assert (out / "checkpoints" / first_hash / "final.ckpt").is_file()

    steps = {"n": 0}
    honest_step = Autoencoder.training_step

    def counted(self, *args, **kwargs):
        steps["n"] += 1
        return honest_step(self, *args, **kwargs)

    monkeypatch.setattr(Autoencoder, "training_step", counted)
    quietly(two_runs, out)
    assert steps["n"] == 0  # evaluated again without a training step
    rows = read_rows(out / "runs.csv")
    assert rows["status"].tolist() == ["eval_failed", "ok", "ok"]  # the record stays
    latest = latest_runs(rows).set_index("variant")
    assert latest.loc["first", "status"] == "ok" and latest.loc["first", "fid"] > 0
    assert latest.loc["first", "steps"] == rows.iloc[0]["steps"] > 0  # training figures kept


@pytest.mark.integration
def test_bench_eval_adds_rows_equal_to_a_fresh_evaluation_of_the_checkpoints(two_runs, tmp_path,
                                                                           capsys):
    out = tmp_path / "out"
    quietly(two_runs, out)
    assert main(["eval", str(out), "--set", "n_fake=150", "kid_subset_size=40",
                 "--only", "first"]) == 0
    printed = capsys.readouterr().out
    assert "evaluating 1 trained run(s)" in printed
    assert re.search(r"ae/first on mnist seed 0: .* \(evaluated again in \d+ s\)", printed)
    original = read_rows(out / "runs.csv").set_index("variant").loc["first"]
    again = read_rows(out / "eval-kid_subset_size-40_n_fake-150" / "runs.csv").iloc[0]
    assert again["n_fake"] == 150 and again["kid_subset_size"] == 40
    assert again["evaluated_from"] == original["config_hash"] != again["config_hash"]
    assert again["steps"] == original["steps"]  # the training's figures come along

    model = MODELS["ae"].load_from_checkpoint(
        out / "checkpoints" / original["config_hash"] / "final.ckpt").eval()
    dm = ImageDataModule("mnist", data_dir=str(tmp_path / "data"), own_files=True, val_size=50,
                         batch_size=10)
    dm.setup()
    settings = EvalSettings(**{**EVAL, "n_fake": 150, "kid_subset_size": 40})
    fresh, _ = evaluate(model, dm, settings, get_extractor("classifier", dm), seed=0)
    for metric in ("fid", "kid_mean", "isc_mean", "precision", "recall", "recon_mse", "hoyer"):
        assert again[metric] == pytest.approx(fresh[metric], rel=1e-9), metric
    for metric in ("recon_mse", "psnr", "l0", "hoyer"):  # the checkpoint holds everything
        assert again[metric] == original[metric], metric


@pytest.mark.integration
def test_bench_eval_rejects_unknown_settings_before_evaluating(two_runs, tmp_path, capsys):
    quietly(two_runs, tmp_path / "out")
    assert main(["eval", str(tmp_path / "out"), "--set", "n_fak=5"]) == 2
    err = capsys.readouterr().err
    assert "unknown eval setting 'n_fak'; did you mean 'n_fake'? allowed: batch_size" in err


def test_evaluation_errors_say_what_to_do():
    import urllib.error

    settings = EvalSettings(batch_size=500)
    offline = explain_evaluation_error(urllib.error.URLError("Name or service not known"), settings)
    assert "no network" in offline and "weights-inception-2015-12-05-6726825d.pth" in offline
    assert "inception_weights" in offline
    memory = explain_evaluation_error(torch.cuda.OutOfMemoryError("out of memory"), settings)
    assert "batch_size=500" in memory and "{batch_size: 250}" in memory
    bad = EvalSettings(inception_weights="/w.pth")
    wrong = explain_evaluation_error(RuntimeError("Error(s) in loading state_dict for X"), bad)
    assert "/w.pth is not torch-fidelity's Inception weights" in wrong


def test_only_is_a_search_and_the_plan_says_what_it_selected(caplog):
    from bench.launch import plan_suite

    suite = load_suite("default")
    plan = plan_suite(suite, Path("/nonexistent"), only="ae")
    messages = [r.getMessage() for r in caplog.records if r.name == "bench.launch"]
    assert {s.model for s in plan.specs} == {"ae", "sae", "vae"}
    assert messages == ["--only 'ae' selects 5 of 6 runs (models ae, sae, vae)"]


def test_only_that_is_not_a_regular_expression_is_refused_when_parsed(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--suite", "smoke", "--only", "sae("])
    assert info.value.code == 2
    assert ("argument --only: 'sae(' is not a regular expression (missing ), unterminated "
            "subpattern at position 3)") in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["0", "-5", "ten"])
def test_a_checkpoint_cadence_that_is_not_a_count_of_steps_is_refused_when_parsed(steps, capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--suite", "smoke", "--checkpoint-every", steps])
    assert info.value.code == 2
    assert (f"argument --checkpoint-every: {steps!r}: give a whole number of steps, 1 or more"
            in capsys.readouterr().err)
