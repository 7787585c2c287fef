"""bench.preflight: what a suite needs is checked before anything trains."""

import pytest

import bench.launch
from bench.results import holds_table
from bench.cli import main
from bench.extractor import save_classifier, train_classifier
from bench.launch import run_suite
from bench.preflight import PreflightError, check_specs
from bench.suite import load_suite
from datamodules import ImageDataModule
from tests.data_files import SHARED_MNIST, write_mnist_dir, write_mnist_suite

TINY = {"hidden": 16, "latent_dim": 4}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No Inception weights on disk and no network, whatever this machine has."""
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr("bench.preflight.reachable", lambda url, timeout=3.0: False)
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))


def never_train(*args, **kwargs):
    raise AssertionError("a run started although preflight should have stopped the suite")


def test_inception_without_weights_fails_before_any_training(tmp_path, offline, monkeypatch):
    suite = load_suite(str(write_mnist_suite(
        tmp_path, [{"model": "ae", "variant": "first", "params": TINY},
                   {"model": "gan", "variant": "inception", "params": TINY,
                    "eval": {"generation": True, "features": "inception"}}])))
    monkeypatch.setattr(bench.launch, "run_one", never_train)
    with pytest.raises(PreflightError) as caught:
        run_suite(suite, tmp_path / "out")
    message = str(caught.value)
    assert "gan-inception-mnist-s0" in message and "nothing was trained" in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message and "inception_weights" in message
    assert not holds_table(tmp_path / "out")


def test_a_file_that_is_not_inception_weights_is_named(tmp_path, offline):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not weights")
    suite = load_suite(str(write_mnist_suite(
        tmp_path, [{"model": "gan", "variant": "g", "params": TINY,
                    "eval": {"generation": True, "inception_weights": str(bad)}}])))
    problems = check_specs(suite.specs, tmp_path / "out")
    assert len(problems) == 1 and f"{bad} is not torch-fidelity's Inception weights" in problems[0], problems


def test_every_problem_is_listed_at_once(tmp_path, offline):
    write_mnist_dir(tmp_path / "other", n_train=100, n_test=20)
    other = ImageDataModule("mnist", data_dir=str(tmp_path / "other"), own_files=True,
                            val_size=0)
    other.setup()
    mnist_classifier = save_classifier(train_classifier(other, epochs=1), tmp_path / "mnist.pt")
    suite = load_suite(str(write_mnist_suite(tmp_path, [
        {"model": "ae", "variant": "mixture", "params": {**TINY, "gmm_components": 500}},
        {"model": "vae", "variant": "nodata", "params": TINY,
         "data": {"data_dir": str(tmp_path / "nowhere")}},
        {"model": "gan", "variant": "foreign", "params": TINY, "datasets": ["fashion_mnist"],
         "data": {"data_dir": str(tmp_path / "data")},
         "eval": {"generation": True, "features": "classifier",
                  "extractor_weights": str(mnist_classifier)}}])))
    problems = check_specs(suite.specs, tmp_path / "out")
    assert len(problems) == 3, problems
    assert "ae-mixture-mnist-s0: gmm_components=500 needs at least 500 training images, but " \
           "the run has 250" in problems[0]
    assert "vae-nodata-mnist-s0: MNIST not found" in problems[1]
    assert "are for mnist, but the run is on fashion_mnist" in problems[2]


def test_a_suite_without_problems_passes_in_seconds(tmp_path, offline):
    suite = load_suite(str(write_mnist_suite(tmp_path, [{"model": "ae", "params": TINY}])))
    assert check_specs(suite.specs, tmp_path / "out") == []


def test_fashion_mnist_given_mnists_files_is_refused_before_any_training(tmp_path, monkeypatch,
                                                                        capsys):
    """GENBENCH_DATA at a folder of MNIST's IDX files, which have Fashion-MNIST's file names."""
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found in {SHARED_MNIST}")
    monkeypatch.setenv("GENBENCH_DATA", str(SHARED_MNIST))
    monkeypatch.setattr(bench.launch, "run_one", never_train)
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: mixed\ndefaults: {datasets: [fashion_mnist]}\n"
                     "runs: [{model: ae, variant: mlp}]\n")
    assert main(["run", "--suite", str(suite), "--out", str(tmp_path / "out")]) == 2
    said = capsys.readouterr().err
    assert "this is not Fashion-MNIST's train-images-idx3-ubyte but MNIST's" in said
    assert f"found in {SHARED_MNIST} (GENBENCH_DATA)" in said and "nothing was trained" in said


def test_one_cause_stopping_many_runs_is_one_line(tmp_path, offline):
    """Runs whose data is missing alike (three seeds, two entries): one line naming the cause
    and how many runs it stops."""
    suite = load_suite(str(write_mnist_suite(tmp_path, [
        {"model": "ae", "variant": v, "params": TINY, "seeds": [0, 1, 2],
         "data": {"data_dir": str(tmp_path / "nowhere")}} for v in ("a", "b")])))
    with pytest.raises(PreflightError) as caught:
        run_suite(suite, tmp_path / "out")
    message = str(caught.value)
    assert message.startswith("1 problem(s) found before training")
    assert "6 runs (ae-a-mnist-s0, ae-a-mnist-s1, ae-a-mnist-s2 and 3 more): MNIST not found" \
        in message
