from bench.cli import main
from tests.data_files import write_mnist_dir


def test_bench_data_describes_the_dataset(tmp_path, capsys):
    write_mnist_dir(tmp_path, n_train=120, n_test=40)
    assert main(["data", "mnist", "--data-dir", str(tmp_path), "--val-size", "20",
                 "--own-files"]) == 0
    out = capsys.readouterr().out
    assert f"source: {tmp_path} (data_dir)" in out
    assert "'train': 100, 'val': 20, 'test': 40" in out
    assert "image_shape: (1, 28, 28)" in out and "pixel_range: (0, 255)" in out


def test_bench_data_reports_missing_data_without_traceback(tmp_path, capsys):
    assert main(["data", "cifar10", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench data: error: CIFAR-10 not found") and "Traceback" not in err


def test_bench_data_lists_datasets_for_unknown_name(capsys):
    assert main(["data", "imagenet"]) == 2
    assert "choose one of: mnist, fashion_mnist, cifar10" in capsys.readouterr().err
