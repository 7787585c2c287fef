"""The contracts hold: a family defined in one new file (tests/toy_family.py, a tiny autoencoder
with a metric of its own) is registered, and every command handles it with no other file
touched: bench list, a suite tried and run, bench table (markdown and LaTeX), bench compare,
bench plot and bench perf."""

import sys

import pandas as pd
import pytest

from bench.cli import main
from bench.results import read_rows
from modules.family import FAMILIES, load_families, unregister
from tests.data_files import standing_in_for, write_mnist_suite

pytestmark = pytest.mark.integration  # runs a suite and bench perf

TOY_RUN = {"model": "toy", "variant": "mlp", "params": {"latent_dim": 4, "hidden": 16,
                                                      "gmm_components": 2}}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy family registered as a user registers one (GENBENCH_FAMILIES), and a suite of it
    run at seeds 0 and 1 over small MNIST-format files; unregistered afterwards."""
    tmp_path = tmp_path_factory.mktemp("toy")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("GENBENCH_FAMILIES", "tests.toy_family")
        monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
        load_families()
        suite = write_mnist_suite(tmp_path, [TOY_RUN], n_train=200, n_test=60,
                                  seeds=[0, 1], budget={"epochs": 1})
        yield tmp_path, suite, monkeypatch
    unregister("toy")
    sys.modules.pop("tests.toy_family", None)


@pytest.fixture(scope="module")
def toy_runs(toy):
    tmp_path, suite, _ = toy
    assert main(["run", "--suite", str(suite), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    return tmp_path / "out" / "runs.csv"


def test_the_toy_family_is_registered_from_its_file(toy):
    assert FAMILIES["toy"].__module__ == "tests.toy_family"


def test_bench_list_names_the_toy_family(toy, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "toy   ToyAutoencoder     a tiny autoencoder for the contract test" in out
    assert "toy   backbone mlp|conv" in out


def test_a_suite_of_it_is_tried(toy, capsys):
    tmp_path, suite, _ = toy
    status = main(["run", "--suite", str(suite), "--out", str(tmp_path / "try"), "--try",
                   "--try-batches", "2", "--no-progress"])
    assert status == 0
    assert "1 of 1 entries ok" in capsys.readouterr().out


def test_a_run_records_its_own_figure_as_the_family_computes_it(toy, toy_runs):
    from datamodules import ImageDataModule
    from tests.toy_family import ToyAutoencoder

    tmp_path, suite, _ = toy
    rows = read_rows(toy_runs)
    assert rows["status"].eq("ok").all() and sorted(rows["seed"]) == [0, 1]
    row = rows[rows["seed"] == 0].iloc[0]
    model = ToyAutoencoder.load_from_checkpoint(row["checkpoint"]).eval()
    dm = ImageDataModule("mnist", data_dir=str(tmp_path / "data"), own_files=True, val_size=50)
    dm.setup()
    assert row["mean_abs_code"] == pytest.approx(
        model.own_metrics(dm.test_dataloader())["mean_abs_code"], rel=1e-6)


def test_bench_table_shows_it_in_markdown_and_latex(toy_runs, capsys):
    assert main(["table", str(toy_runs)]) == 0
    assert "mean_abs_code" in capsys.readouterr().out
    assert main(["table", str(toy_runs), "--format", "latex"]) == 0
    assert "mean $|h|$" in capsys.readouterr().out


def test_bench_compare_judges_its_own_figure(toy_runs, tmp_path, capsys):
    """One seed a side: judged by the tolerance, which doubling the figure exceeds."""
    base = pd.read_csv(toy_runs).query("seed == 0")
    base.to_csv(tmp_path / "base.csv", index=False)
    base.assign(mean_abs_code=2 * base["mean_abs_code"]).to_csv(tmp_path / "worse.csv",
                                                                index=False)
    assert main(["compare", str(tmp_path / "base.csv"), str(tmp_path / "worse.csv")]) == 1
    report = capsys.readouterr().out
    assert "mean_abs_code" in report and "regression" in report.lower()


def test_bench_plot_draws_it(toy_runs, tmp_path, capsys):
    out = tmp_path / "frontier.png"
    assert main(["plot", "frontier", str(toy_runs), "--x", "mean_abs_code", "--y", "recon_mse",
                 "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_bench_perf_times_it(toy, capsys):
    tmp_path, _, monkeypatch = toy
    monkeypatch.setenv("GENBENCH_DATA", str(tmp_path / "data"))
    standing_in_for(monkeypatch, "mnist", tmp_path / "data")
    assert main(["perf", "--families", "toy", "--backbones", "mlp", "--dataset", "mnist",
                 "--batch-size", "16", "--steps", "2", "--warmup", "1", "--repeats", "1",
                 "--accelerator", "cpu", "--no-progress"]) == 0
    assert "toy mlp" in capsys.readouterr().out
