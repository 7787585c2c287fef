import pytest

from bench.cli import main
from bench.fit import expand_short_forms
from tests.data_files import write_mnist_dir

pytestmark = pytest.mark.integration  # trains through the CLI


def test_short_forms_expand_to_lightning_cli_arguments():
    assert expand_short_forms(["--model", "vae", "--data", "Fashion-MNIST"]) == [
        "--model", "VAE", "--data.dataset", "fashion_mnist"]


def test_unknown_model_lists_the_choices(capsys):
    assert main(["fit", "--model", "flow", "--data", "mnist"]) == 2
    assert "choose one of: ae (Autoencoder)" in capsys.readouterr().err


def test_an_unknown_dataset_lists_the_choices_instead_of_a_usage_dump(capsys):
    assert main(["fit", "--model", "vae", "--data", "fmnist"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("bench fit: error: unknown dataset 'fmnist'; choose one of: mnist, "
                           "fashion_mnist, cifar10")


@pytest.mark.parametrize("argv", [["--model", "sae", "--help"], ["--model.help", "sae"]])
def test_help_for_a_model_lists_the_familys_arguments(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", *argv])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--model.sparsity" in out and "--model.l1_weight" in out


@pytest.mark.parametrize("model", ["sae", "gan"])
def test_bench_fit_trains_and_prints_final_losses(tmp_path, capsys, model):
    write_mnist_dir(tmp_path / "data", n_train=200, n_test=50)
    code = main(["fit", "--model", model, "--data", "mnist",
                 "--data.data_dir", str(tmp_path / "data"), "--data.own_files", "true",
                 "--data.val_size", "40", "--data.batch_size", "32", "--model.width", "4",
                 "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                 "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert code == 0
    out = capsys.readouterr().out
    assert "final losses of" in out and "on MNIST" in out
    assert ("train/d_loss" if model == "gan" else "train/recon") in out


def test_bench_fit_says_only_what_concerns_the_run(tmp_path, capsys, caplog):
    import warnings

    write_mnist_dir(tmp_path / "data", n_train=200, n_test=50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", "--model", "ae", "--data", "mnist", "--data.data_dir",
                     str(tmp_path / "data"), "--data.own_files", "true", "--data.val_size", "40",
                     "--trainer.max_steps", "2",
                     "--trainer.enable_progress_bar", "false",
                     "--trainer.default_root_dir", str(tmp_path / "runs")]) == 0
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    for noise in ("args parameter", "No seed found", "tensorboardX", "Tip:"):
        assert not any(noise in line for line in said), noise
    assert f"logs, config and checkpoints in {tmp_path / 'runs'}" in capsys.readouterr().out
