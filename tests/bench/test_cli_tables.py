import pandas as pd

from bench.cli import main
from tests.bench.test_results import row


def write(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_compare_exits_1_on_a_regression_and_0_without(tmp_path, capsys):
    base = write(tmp_path / "base.csv", [row(fid=10.0, recon_mse=0.01)])
    worse = write(tmp_path / "worse.csv", [row(fid=12.0, recon_mse=0.01)])
    assert main(["compare", base, worse]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert main(["compare", base, worse, "--tol", "fid=0.25"]) == 0
    assert "no regression in 2 comparisons" in capsys.readouterr().out


def test_compare_reports_bad_tolerance_syntax(tmp_path, capsys):
    base = write(tmp_path / "base.csv", [row(fid=10.0)])
    assert main(["compare", base, base, "--tol", "fid"]) == 2
    assert "expected METRIC=RELATIVE_TOLERANCE" in capsys.readouterr().err


def test_table_of_a_missing_file_says_what_writes_it(tmp_path, capsys):
    assert main(["table", str(tmp_path / "nope.csv")]) == 2
    assert "bench run writes <out>/runs.csv" in capsys.readouterr().err


def test_list_names_models_datasets_and_suites(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("SparseAutoencoder", "fashion_mnist", "smoke", "default", "paper"):
        assert word in out
