import multiprocessing
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.errors import UserError
from tests.rows import row
from bench.results import (append_row, eval_failed_rows, format_table, latest_runs, read_rows,
                           seed_table)


def test_append_keeps_earlier_rows_unchanged_and_reading_writes_the_view(tmp_path):
    path = tmp_path / "runs.csv"
    append_row(path, row(recon_mse=0.1))
    before = read_rows(path)
    append_row(path, row(seed=1, recon_mse=0.2, fid=3.0))  # a new column appears
    assert len(list((tmp_path / "rows").glob("*.json"))) == 2
    rows = read_rows(path)
    assert rows["recon_mse"].tolist() == [0.1, 0.2]
    pd.testing.assert_frame_equal(rows.iloc[:1][before.columns], before)
    view = pd.read_csv(path)
    parquet = pd.read_parquet(tmp_path / "runs.parquet")
    assert view["recon_mse"].tolist() == parquet["recon_mse"].tolist() == [0.1, 0.2]
    assert len(parquet.columns) == len(rows.columns)
    assert not list(tmp_path.rglob("*.tmp"))


def test_rows_read_back_with_their_types(tmp_path):
    path = tmp_path / "runs.csv"
    values = {**row(seed=3), "recon_mse": np.float32(0.25), "steps": np.int64(7), "fid": np.nan,
              "gpu": None, "config": '{"a": [1, 2]}', "flag": True}
    append_row(path, values)
    got = read_rows(path).iloc[0]
    assert got["seed"] == 3 and got["recon_mse"] == 0.25 and got["steps"] == 7
    assert pd.isna(got["fid"]) and pd.isna(got["gpu"]) and got["config"] == '{"a": [1, 2]}'
    assert bool(got["flag"]) is True


def test_a_run_already_in_the_table_is_not_added_twice(tmp_path):
    path = tmp_path / "runs.csv"
    assert append_row(path, row(recon_mse=0.1))
    assert not append_row(path, row(recon_mse=0.2))
    assert read_rows(path)["recon_mse"].tolist() == [0.1]


def test_hashes_and_names_that_look_like_numbers_stay_text(tmp_path):
    path = tmp_path / "runs.csv"
    assert append_row(path, {**row(variant="007"), "config_hash": "123e45678901"})
    assert not append_row(path, {**row(variant="007"), "config_hash": "123e45678901"})
    rows = read_rows(path)
    assert rows["config_hash"].tolist() == ["123e45678901"] and rows["variant"].tolist() == ["007"]


def _append_fifty(args):
    path, worker = args
    for i in range(50):
        assert append_row(path, row(variant=f"w{worker}", seed=i, recon_mse=float(i)))


def test_32_processes_appending_at_once_lose_and_duplicate_no_row(tmp_path):
    """append_row takes no lock: each row is a file of its own."""
    path = tmp_path / "runs.csv"
    # a fork server, not fork: a fork of a test process that runs threads (tqdm's monitor,
    # W&B's service) can inherit a lock held by one of them and hang; its children are forks
    # of one clean process that imported the store once
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bench.results", "tests.rows"])
    with context.Pool(32) as pool:
        pool.map(_append_fifty, [(path, w) for w in range(32)])
    rows = read_rows(path)
    assert len(rows) == 32 * 50 and rows["config_hash"].is_unique
    assert sorted(zip(rows["variant"], rows["seed"])) == sorted(
        (f"w{w}", i) for w in range(32) for i in range(50))


def test_a_table_from_before_row_files_reads_and_is_converted_at_its_first_new_row(tmp_path):
    path = tmp_path / "runs.csv"
    old = pd.DataFrame([row(seed=0, fid=10.0), row(seed=1, fid=14.0), row(seed=0, fid=12.0)])
    old.to_csv(path, index=False)  # as append_row wrote it, a rerun of seed 0 last
    assert read_rows(path)["fid"].tolist() == [10.0, 14.0, 12.0]
    assert not (tmp_path / "rows").exists()  # reading converts nothing (it may be read-only)
    assert not append_row(path, row(seed=1, fid=99.0))  # already finished, as before
    assert len(list((tmp_path / "rows").glob("*.json"))) == 3
    assert append_row(path, row(seed=2, fid=20.0))
    rows = read_rows(path)
    assert rows["fid"].tolist() == [10.0, 14.0, 12.0, 20.0]
    assert latest_runs(rows)["fid"].tolist() == [14.0, 12.0, 20.0]


def test_two_processes_converting_one_old_table_at_once_write_each_row_once(tmp_path):
    from bench.results import _convert_legacy

    path = tmp_path / "runs.csv"
    pd.DataFrame([row(seed=0), row(seed=1)]).to_csv(path, index=False)
    _convert_legacy(path)
    _convert_legacy(path)  # the second finds the folder there and leaves it
    assert len(read_rows(path)) == 2 and not list(tmp_path.glob(".rows*"))


def test_a_row_file_being_written_is_not_read(tmp_path):
    path = tmp_path / "runs.csv"
    append_row(path, row(seed=0))
    (tmp_path / "rows" / ".00000000000000000001-h-ok-x.json.1-2.tmp").write_text('{"cut')
    assert len(read_rows(path)) == 1


def test_a_folder_that_cannot_be_written_still_reads(tmp_path, monkeypatch):
    import bench.results

    path = tmp_path / "runs.csv"
    append_row(path, row(seed=0))
    append_row(path, row(seed=1))

    def read_only(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(bench.results, "_write_atomic", read_only)
    assert len(read_rows(path)) == 2 and not path.exists()


def test_seed_table_is_mean_and_std_over_seeds_without_diverged_runs():
    rows = pd.DataFrame([row(seed=0, fid=10.0), row(seed=1, fid=14.0), row(seed=2, fid=30.0),
                         {**row(seed=3, fid=999.0), "status": "diverged"}])
    stats = seed_table(rows, ["fid"])
    assert stats[("mnist", "fid", "mean")].item() == pytest.approx(18.0)
    assert stats[("mnist", "fid", "std")].item() == pytest.approx(np.std([10, 14, 30], ddof=1))
    assert stats[("mnist", "fid", "count")].item() == 3


def test_table_formats_mean_plus_minus_std(tmp_path):
    rows = pd.DataFrame([row(seed=0, fid=10.0), row(seed=1, fid=14.0),
                         row(model="vae", seed=0, fid=20.0)])
    markdown = format_table(rows, "md")
    assert "ae / mlp" in markdown and "12.00 ± 2.83" in markdown and "| 20.00" in markdown
    assert "\\begin{tabular}" in format_table(rows, "latex")
    assert format_table(rows, "csv").splitlines()[0] == "model / variant,fid"
    with pytest.raises(UserError, match="choose one of: md, latex, csv"):
        format_table(rows, "html")


def test_a_forced_rerun_counts_once_in_the_table_with_the_latest_figures():
    rows = pd.DataFrame([row(seed=0, fid=10.0), row(seed=1, fid=14.0), row(seed=0, fid=12.0)])
    assert latest_runs(rows)["fid"].tolist() == [14.0, 12.0]
    stats = seed_table(rows, ["fid"])
    assert stats[("mnist", "fid", "count")].item() == 2
    assert stats[("mnist", "fid", "mean")].item() == pytest.approx(13.0)


def test_eval_failed_rows_are_the_runs_whose_latest_evaluation_failed(tmp_path):
    path = tmp_path / "runs.csv"
    assert eval_failed_rows(path) == {}  # no table yet
    append_row(path, row(seed=0, status="eval_failed", error="no weights"), unique=False)
    append_row(path, row(seed=0, recon_mse=0.1), unique=False)  # evaluated again since: done
    append_row(path, row(seed=1, status="eval_failed", error="no weights"), unique=False)
    append_row(path, row(seed=2, recon_mse=0.3), unique=False)
    failed = eval_failed_rows(path)
    assert list(failed) == ["aemlpmnist1"] and failed["aemlpmnist1"]["error"] == "no weights"


def test_append_creates_the_results_folder(tmp_path):
    path = tmp_path / "new" / "nested" / "runs.csv"
    append_row(path, row(recon_mse=0.1))
    assert read_rows(path)["recon_mse"].tolist() == [0.1]


def paper_rows():
    """Two datasets, two models, two seeds; names with characters LaTeX treats specially."""
    rows = []
    for dataset in ("mnist", "fashion_mnist"):
        for seed in (0, 1):
            rows.append(row("vae", "mlp_200", dataset, seed, recon_mse=0.02 + 0.001 * seed,
                            l0=50.0, elbo=-90.0 - seed, iw_nll=88.5 + seed, fid=30.0 + seed,
                            isc_mean=2.5, n_fake=10000, n_real=10000, features="genbench-cnn-x",
                            iw_k=5000, iw_images=10000))
            rows.append(row("gan", "ns&50%", dataset, seed, fid=20.0 + 2 * seed, n_fake=10000,
                            isc_mean=3.0 + seed, n_real=10000, features="genbench-cnn-x"))
    return pd.DataFrame(rows)


def test_latex_table_matches_its_golden_file():
    from pathlib import Path

    from bench.results import latex_table

    golden = Path(__file__).parent / "golden" / "table.tex"
    assert latex_table(paper_rows()) == golden.read_text().rstrip("\n")


def test_latex_table_bolds_the_best_figure_of_each_column_within_a_dataset():
    from bench.results import latex_table

    lines = latex_table(paper_rows()).splitlines()
    gan, vae = (next(line for line in lines if line.startswith(m)) for m in ("GAN", "VAE"))
    assert r"$\mathbf{21.00 \pm 1.41}$" in gan and r"$30.50 \pm 0.71$" in vae  # FID: lower wins
    assert r"$\mathbf{3.50 \pm 0.71}$" in gan and r"$2.50 \pm 0.00$" in vae  # IS: higher wins


def test_latex_caption_says_when_each_entry_is_one_run():
    from bench.results import latex_table

    one_seed = paper_rows()[lambda r: r["seed"] == 1]
    assert r"\caption{One run per entry (seed 1). FID" in latex_table(one_seed)


@pytest.mark.parametrize("text, escaped", [("ns&50%", r"ns\&50\%"), ("mlp_200", r"mlp\_200"),
                                           ("a{b}#$", r"a\{b\}\#\$")])
def test_latex_escapes_what_latex_treats_specially(text, escaped):
    from bench.results import latex_escape

    assert latex_escape(text) == escaped


def test_latex_table_compiles_with_pdflatex(tmp_path):
    import shutil
    import subprocess

    from bench.results import latex_table

    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed")
    document = "\n".join([r"\documentclass{article}", r"\usepackage{booktabs}",
                          r"\begin{document}", latex_table(paper_rows()), r"\end{document}"])
    (tmp_path / "t.tex").write_text(document)
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "t.pdf").stat().st_size > 0


def test_a_row_cut_short_by_hand_is_named_and_the_rest_still_reads(tmp_path):
    path = tmp_path / "copied.csv"  # a table on its own, as one mailed or edited by hand
    pd.DataFrame([{"config_hash": f"h{seed}", "status": "ok", "seed": seed,
                   "recon_mse": 0.1 * seed, "model": "ae"} for seed in range(3)]).to_csv(
        path, index=False)
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:6]  # the second row, cut in its third field
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"copied.csv: row\(s\) 3 have not the header's 5 fields"):
        rows = read_rows(path)
    assert rows["config_hash"].tolist() == ["h0", "h2"]


def test_a_full_disk_while_a_row_is_written_leaves_the_table_whole(tmp_path, monkeypatch):
    import errno

    import pandas as pd

    path = tmp_path / "runs.csv"
    append_row(path, {"config_hash": "h0", "status": "ok", "model": "ae", "variant": "mlp",
                      "seed": 0})
    before = read_rows(path)
    write_text = Path.write_text

    def no_space(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(OSError, match=r"rows: the row of vae/conv seed 1 could not be "
                                      r"written \(No space left on device\); the rows recorded"):
        append_row(path, {"config_hash": "h1", "status": "ok", "model": "vae",
                          "variant": "conv", "seed": 1})
    monkeypatch.undo()
    pd.testing.assert_frame_equal(read_rows(path), before)
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_sweeps_points_are_listed_under_their_entry_in_order():
    from bench.results import format_table

    rows = pd.DataFrame([{**row("sae", f"topk-k{k}", seed=s, recon_mse=0.1 / k), "entry": "topk",
                          "sweep_index": i}
                         for i, k in enumerate((4, 8, 16)) for s in range(2)]
                        + [row("ae", "mlp", recon_mse=0.05)])
    labels = [line.split("|")[1].strip() for line in format_table(rows).splitlines()[2:]]
    assert labels == ["sae / topk: k4", "sae / topk: k8", "sae / topk: k16", "ae / mlp"]


def test_a_run_whose_evaluation_failed_is_not_done_and_takes_its_finished_row(tmp_path):
    from bench.results import done_hashes

    path = tmp_path / "runs.csv"
    append_row(path, row(seed=0, status="eval_failed"))
    assert done_hashes(path) == set()
    assert append_row(path, row(seed=0, recon_mse=0.1))
    assert done_hashes(path) == {"aemlpmnist0"}


def test_a_file_that_is_not_a_row_is_passed_over_and_a_broken_row_named(tmp_path):
    path = tmp_path / "runs.csv"
    append_row(path, row(seed=0))
    (tmp_path / "rows" / "README.json").write_text("{}")  # not a row's name: not a row
    assert len(read_rows(path)) == 1
    broken = tmp_path / "rows" / "00000000000000000005-h1-ok-abc.json"
    broken.write_text('{"seed": ')
    with pytest.raises(UserError, match=r"00000000000000000005-h1-ok-abc.json: not a readable "
                                        r"row .*move it out of rows/"):
        read_rows(path)
