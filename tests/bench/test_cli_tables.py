import pandas as pd
import pytest

from bench.cli import main
from tests.rows import GEN, commit_rows
from tests.rows import vae_row as row  # FID is judged


def write(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_compare_exits_1_on_a_regression_and_0_without(tmp_path, capsys):
    base = write(tmp_path / "base.csv", [row(fid=10.0, recon_mse=0.01)])
    worse = write(tmp_path / "worse.csv", [row(fid=12.0, recon_mse=0.01)])
    assert main(["compare", base, worse]) == 1
    out = capsys.readouterr().out
    assert "WORSE: fails" in out and out.splitlines()[-1].startswith("FAIL: 1 regression(s)")
    assert main(["compare", base, worse, "--tol", "fid=0.25"]) == 0
    assert "PASS: no regression among 2 judged figure(s)" in capsys.readouterr().out


def test_compare_fails_on_incomparable_features_unless_allowed(tmp_path, capsys):
    base = write(tmp_path / "base.csv", [row(fid=40.0, **GEN)])
    other = write(tmp_path / "other.csv", [row(fid=12.0, **{**GEN, "n_fake": 10000})])
    assert main(["compare", base, other]) == 1
    out = capsys.readouterr().out
    assert "incomparable" in out and "n_fake: 1000 -> 10000" in out
    assert main(["compare", base, other, "--allow-incomparable"]) == 0


def test_compare_of_a_table_without_status_names_the_file_problem(tmp_path, capsys):
    base = write(tmp_path / "base.csv", [row(fid=1.0)])
    bare = write(tmp_path / "bare.csv", [{"model": "ae", "variant": "mlp", "dataset": "mnist",
                                          "seed": 0, "fid": 1.0}])
    assert main(["compare", base, bare]) == 2
    assert f"{bare} lacks the column(s) status" in capsys.readouterr().err


def test_history_reads_a_folder_of_tables_and_plots_each_metric(tmp_path, capsys):
    for i, (commit, values) in enumerate([("c1", [10.0, 11.0, 12.0]), ("c2", [10.1, 11.1, 12.1]),
                                           ("c3", [13.0, 14.0, 15.0])], 1):
        (tmp_path / "nightly" / commit).mkdir(parents=True)
        write(tmp_path / "nightly" / commit / "runs.csv", commit_rows(commit, i, values))
    assert main(["history", str(tmp_path / "nightly"), "--metrics", "fid",
                 "--out", str(tmp_path / "plots")]) == 1
    out = capsys.readouterr().out
    assert "regression began at c3: vae/mlp on mnist fid 11.1 -> 14 (26.1% worse, p=" in out
    assert "| c1" in out and "11 ± 1 (n=3)" in out and "14 ± 1 (n=3) !" in out
    assert (tmp_path / "plots" / "history-fid.png").stat().st_size > 1000


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


@pytest.mark.parametrize("content, message", [
    (b"a,b\n1,2\n", "not a results table (no column model, variant, dataset, seed)"),
    (bytes(range(128, 256)), "not a results table (not text: invalid start byte at byte 0)")])
def test_a_file_that_is_not_a_results_table_is_named(tmp_path, capsys, content, message):
    (tmp_path / "runs.csv").write_bytes(content)
    assert main(["table", str(tmp_path / "runs.csv")]) == 2
    assert f"{tmp_path / 'runs.csv'}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["plot", "frontier", "RUNS", "--out", "/proc/no/f.png"],
                                  ["history", "RUNS", "--out", "/proc/no"]])
def test_an_unwritable_out_is_refused_before_the_work(tmp_path, capsys, argv):
    runs = write(tmp_path / "runs.csv", commit_rows("c1", 1, [10.0, 11.0]))
    assert main([runs if a == "RUNS" else a for a in argv]) == 2
    assert "--out /proc/no: cannot be written" in capsys.readouterr().err


def test_table_of_a_results_folder_reads_its_runs_csv_without_importing_lightning(tmp_path):
    # bench table, compare and their LaTeX only read a table: importing Lightning (the datamodule
    # behind the dataset specs) made them wait seconds for nothing.
    import subprocess
    import sys

    (tmp_path / "out").mkdir()
    write(tmp_path / "out" / "runs.csv", [row(fid=10.0, recon_mse=0.01)])
    probe = ("import sys; from bench.cli import main; "
             f"code = main(['table', {str(tmp_path / 'out')!r}, '--format', 'latex']); "
             "print('lightning' in sys.modules, code)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert "\\begin{table}" in done.stdout and done.stdout.splitlines()[-1] == "False 0"
