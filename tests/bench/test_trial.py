"""`bench run --try` (bench/trial.py): every entry tried through the whole path, nothing
recorded, failures named, and the suite's time estimated."""

import pytest

import bench.trial
from bench.results import holds_table
from bench.suite import load_suite
from bench.trial import makespan, run_try, trial_spec
from tests.data_files import write_mnist_suite

pytestmark = pytest.mark.integration  # trains through the harness


@pytest.fixture
def suite(tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    runs = [{"model": "vae", "variant": "v", "params": {"hidden": 16, "latent_dim": 4}},
            {"model": "gan", "variant": "g", "params": {"backbone": "mlp", "hidden": 16,
                                                        "latent_dim": 4}}]
    return load_suite(str(write_mnist_suite(
        tmp_path, runs, budget={"epochs": 5},
        eval={"generation": True, "features": "classifier", "n_fake": 500, "iw_k": 7,
              "iw_images": 50, "kid_subset_size": 200})))


def test_every_entry_is_tried_and_nothing_is_recorded(suite, tmp_path, caplog):
    table = run_try(suite, tmp_path / "out", batches=6, parallel=2)
    assert table["status"].tolist() == ["ok", "ok"]
    assert not holds_table(tmp_path / "out")
    assert (table["est_train_s"] > 0).all() and (table["est_total_s"] > table["est_train_s"]).all()
    vae = table.set_index("entry").iloc[0]
    assert vae["eval_s_per_iw_sample"] > 0 and vae["eval_s_per_image"] > 0
    assert any("with --parallel 2" in line and "one after another" in line
               for line in caplog.messages)


def test_one_seed_is_tried_for_all_of_an_entrys_pending_seeds(suite, tmp_path, caplog):
    three_seeds = load_suite(str(suite.path), seeds=[0, 1, 2])
    table = run_try(three_seeds, tmp_path / "out", batches=4)
    assert table["runs"].tolist() == [3, 3] and len(table) == 2
    assert table["entry"].str.endswith("-s0").all()
    assert any("the suite's 6 run(s)" in line for line in caplog.messages)


def test_an_entry_that_fails_is_named_and_the_others_still_run(suite, tmp_path, monkeypatch):
    from modules import VAE

    def broken(self, x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (20x3072 and 784x64)")

    monkeypatch.setattr(VAE, "losses", broken)
    table = run_try(suite, tmp_path / "out", batches=6)
    assert table["status"].tolist()[0].startswith("RuntimeError: mat1 and mat2 shapes")
    assert table["status"].tolist()[1] == "ok"


def test_try_refuses_what_it_cannot_honour(suite, tmp_path, capsys):
    from bench.cli import main

    assert main(["run", "--suite", str(suite.path), "--try", "--force", "--launcher", "slurm",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--try cannot honour --force and --launcher slurm" in capsys.readouterr().err


def test_the_trial_keeps_the_entrys_k_and_shrinks_only_the_samples(suite):
    spec = trial_spec(suite.specs[0], 6)
    assert spec.budget == {"steps": 6}
    # K = 7: the trial takes all 50 images (it wants 10,000 samples for a full-batch cost)
    assert spec.eval["iw_k"] == 7 and spec.eval["iw_images"] == 50 and spec.eval["n_fake"] == 200
    assert spec.eval["kid_subset_size"] == 100 and spec.eval["features"] == "classifier"


def test_the_estimate_scales_each_part_by_its_own_count(suite, monkeypatch):
    monkeypatch.setattr(bench.trial, "budget_batches", lambda spec: 1000)
    row = {"train_img_per_s": 100.0, "eval_s": 10.0, "generation_s": 4.0, "iw_s": 2.0,
           "n_fake": 200, "n_real": 200, "iw_k": 7, "iw_images": 8, "test_images": 100,
           "wall_s": 20.0}
    spec = suite.specs[0]  # batch size 10, n_fake 500, all 100 test images real, iw 7 x 50
    got = bench.trial.estimate(spec, row, tried_batches=6, warmup=2)
    assert got["s_per_batch"] == pytest.approx(0.1)
    assert got["est_train_s"] == pytest.approx(100.0)
    # 4 s fixed + 4 s / 400 images x 600 + 2 s / 56 samples x 350
    assert got["est_eval_s"] == pytest.approx(4 + 4 / 400 * 600 + 2 / 56 * 350)
    assert got["est_total_s"] == pytest.approx(100 + got["est_eval_s"] + (20 - 10 - 0.6))


def test_the_parallel_estimate_puts_the_longest_first_on_the_least_loaded():
    assert makespan([5, 4, 3, 3, 3], 2) == 10  # 5 3 | 4 3 3, in that order
    assert makespan([10, 1, 1], 3) == 10 and makespan([2, 2], 1) == 4


@pytest.fixture(scope="module")
def synthetic_data_and_inception(tmp_path_factory):
    """MNIST, Fashion-MNIST and CIFAR-10 as small files in their real formats, in torchvision's
    layout under one root (GENBENCH_DATA), each with more training images than the shipped
    suites' 5,000 held out for validation; and torch-fidelity's InceptionV3 with random
    weights where torch hub keeps the downloaded file (TORCH_HOME)."""
    import torch

    from bench.extractor import INCEPTION_WEIGHTS_FILE
    from tests.bench.test_extractor import random_inception_weights
    from tests.data_files import write_cifar_dir, write_mnist_dir

    root = tmp_path_factory.mktemp("data")
    write_mnist_dir(root / "MNIST" / "raw", n_train=5500, n_test=64)
    write_mnist_dir(root / "FashionMNIST" / "raw", n_train=5500, n_test=64, seed=7)
    write_cifar_dir(root / "cifar-10-batches-py", n_per_batch=1100, n_test=64)
    torch_home = tmp_path_factory.mktemp("torch")
    hub = torch_home / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    random_inception_weights(hub / INCEPTION_WEIGHTS_FILE)
    return root, torch_home


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smoke", "default", "paper", "gan", "vqvae"])
def test_every_entry_of_a_shipped_suite_trains_and_evaluates(name, synthetic_data_and_inception,
                                                            tmp_path, monkeypatch, capsys):
    """What a user runs before a long suite, on every shipped suite: each entry's model, data,
    trainer and evaluation settings (Inception features for the paper suites) through the
    whole path, a few batches and a small sample each."""
    from bench.cli import main
    from bench.suite import load_suite
    from tests.data_files import standing_in_for

    root, torch_home = synthetic_data_and_inception
    monkeypatch.setenv("GENBENCH_DATA", str(root))
    for dataset, folder in (("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
                            ("cifar10", "cifar-10-batches-py")):
        standing_in_for(monkeypatch, dataset, root / folder)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    # the paper suite's Fashion-MNIST entries are its MNIST entries on another dataset, which
    # the default and gan suites try (and Inception features, on CPU, are most of the time)
    only = ["--only", "^(?!.*fashion_mnist)"] if name == "paper" else []
    status = main(["run", "--suite", name, "--out", str(tmp_path / "out"), "--try",
                   "--try-batches", "2", "--try-sample", "8", "--no-progress", *only])
    out = capsys.readouterr().out
    entries = {spec.run_id.rsplit("-s", 1)[0] for spec in load_suite(name).specs
               if not only or "fashion_mnist" not in spec.run_id}
    assert status == 0, out
    assert f"{len(entries)} of {len(entries)} entries ok" in out
    assert not holds_table(tmp_path / "out")


def test_the_paper_1h_suite_tries_exactly_the_runs_the_paper_suite_tries():
    """paper-1h is the paper suite at one seed and a shorter budget, and a trial replaces the
    budget: its trials are the paper's (by config hash), so trying the paper suite tries both."""
    from bench.suite import load_suite

    tried = lambda name: {trial_spec(s, 2, 8).config_hash for s in load_suite(name).specs}  # noqa
    assert tried("paper-1h") <= tried("paper")
    assert len(tried("paper-1h")) == len(load_suite("paper-1h").specs)
