"""bench.compare on small hand-made tables: provenance, missing and diverged runs, reruns,
seed-aware verdicts, and the history over commits."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.errors import UserError
from bench.defaults import ALPHA
from bench.compare import (compare, config_differences, format_report, history,
                           provenance_differences, regression_rule, same_value)
from bench.metrics import DIRECTIONS
from tests.rows import GEN, commit_rows
from tests.rows import vae_row as row

def table(*rows):
    return pd.DataFrame(list(rows))


def metric_row(report, metric, model="vae"):
    m = report.metrics
    return m[(m["metric"] == metric) & (m["model"] == model)].iloc[0]


def test_a_run_diverged_in_the_current_table_is_a_regression():
    base = table(row(fid=10.0, **GEN), row(model="gan", fid=30.0, **GEN))
    cur = table(row(fid=10.0, **GEN), {**row(model="gan", fid=None, **GEN), "status": "diverged"})
    report = compare(base, cur)
    runs = report.runs.set_index("model")
    assert runs.loc["gan", "status"] == "diverged" and runs.loc["vae", "status"] == "ok"
    assert report.exit_status() == 1
    assert "1 run(s) that did not finish" in report.summary_line()


def test_a_run_missing_from_the_current_table_is_a_regression():
    base = table(row(fid=10.0, **GEN), row(model="gan", fid=30.0, **GEN))
    report = compare(base, table(row(fid=10.0, **GEN)))
    assert report.runs.set_index("model").loc["gan", "status"] == "missing"
    assert report.exit_status() == 1 and "1 missing run(s)" in report.summary_line()


def test_a_run_only_in_the_current_table_is_new_and_passes():
    both = [row(fid=10.0, **GEN), row(model="sae", fid=11.0, **GEN)]
    report = compare(table(*both), table(*both, row(model="gan", fid=50.0, **GEN)))
    assert report.runs.set_index("model").loc["gan", "status"] == "new"
    assert report.exit_status() == 0 and "1 new run(s)" in report.summary_line()


@pytest.mark.parametrize("column, value", [("features", "inception-v3-compat"),
                                           ("n_fake", 10000), ("generator_ema", 0.999)])
def test_fid_measured_differently_is_incomparable_and_fails(column, value):
    base = table(row(fid=40.0, **GEN))
    cur = table(row(fid=12.0, **{**GEN, column: value}))
    report = compare(base, cur, metrics=["fid"])
    fid = metric_row(report, "fid")
    assert fid["verdict"] == "incomparable" and column in fid["detail"]
    assert pd.isna(fid["change"])  # never "better"
    assert report.exit_status() == 1
    assert report.exit_status(allow_incomparable=True) == 0


def test_iw_nll_at_another_k_is_incomparable_but_elbo_still_compares():
    base = table(row(model="vae", elbo=-100.0, iw_nll=95.0, iw_k=100, iw_images=1000, **GEN))
    cur = table(row(model="vae", elbo=-100.0, iw_nll=90.0, iw_k=5000, iw_images=1000, **GEN))
    report = compare(base, cur, metrics=["elbo", "iw_nll"])
    assert metric_row(report, "iw_nll", "vae")["verdict"] == "incomparable"
    assert "iw_k: 100 -> 5000" in metric_row(report, "iw_nll", "vae")["detail"]
    assert metric_row(report, "elbo", "vae")["verdict"] == "ok"


def test_provenance_written_as_int_or_float_is_the_same():
    base = table(row(fid=10.0, **GEN))
    cur = table(row(fid=10.0, **{**GEN, "n_fake": 1000.0}))
    assert metric_row(compare(base, cur), "fid")["verdict"] == "ok"


def test_a_forced_rerun_supersedes_the_earlier_row():
    first, rerun = row(recon_mse=0.5, **GEN), row(recon_mse=0.01, **GEN)  # same config hash
    report = compare(table(row(recon_mse=0.01, **GEN)), table(first, rerun))
    mse = metric_row(report, "recon_mse")
    assert mse["n_cur"] == 1 and mse["current"] == 0.01 and mse["verdict"] == "ok"
    assert len(report.runs) == 1


def test_a_changed_config_is_shown_beside_the_metric():
    base = {**row(recon_mse=0.01, **GEN), "config": '{"budget": {"epochs": 2}, "seed": 0}'}
    cur = {**row(recon_mse=0.01, **GEN), "config": '{"budget": {"epochs": 3}, "seed": 0}'}
    detail = metric_row(compare(table(base), table(cur)), "recon_mse")["detail"]
    assert "budget.epochs: 2 -> 3" in detail


def test_config_differences_ignore_the_seed():
    assert config_differences('{"seed": 0, "lr": 1}', '{"seed": 1, "lr": 1}') == ""


def seeds(values, **extra):
    return [row(seed=i, fid=v, **GEN, **extra) for i, v in enumerate(values)]


def test_a_three_sigma_shift_over_three_seeds_is_a_regression():
    base = [10.0, 11.0, 12.0]  # std 1
    report = compare(table(*seeds(base)), table(*seeds([v + 3.0 for v in base])), paired=False)
    fid = metric_row(report, "fid")
    assert fid["verdict"] == "REGRESSION" and fid["rule"] == "welch"
    assert fid["noise"] == pytest.approx(np.sqrt(1 / 3 + 1 / 3))
    assert fid["p_value"] < ALPHA and report.exit_status() == 1
    assert "beyond seed noise (a test over the seeds" in report.summary_line()


def test_a_half_sigma_shift_over_three_seeds_is_noise():
    base = [10.0, 11.0, 12.0]
    report = compare(table(*seeds(base)), table(*seeds([v + 0.5 for v in base])), paired=False)
    fid = metric_row(report, "fid")
    assert fid["change"] < -0.02  # beyond the tolerance on its own...
    assert fid["verdict"] == "ok" and fid["p_value"] > 0.2  # ...but well inside the seed noise
    assert report.exit_status() == 0


def test_one_seed_falls_back_to_the_tolerance_and_says_so():
    report = compare(table(*seeds([10.0])), table(*seeds([10.5])))
    fid = metric_row(report, "fid")
    assert fid["verdict"] == "REGRESSION" and fid["rule"] == "tolerance (1 seed)"
    assert pd.isna(fid["noise"])
    assert "Where a side has a single seed there is no noise to judge by: beyond the " \
        "tolerance alone fails" in report.summary_line()


def test_welch_p_value_matches_scipy_in_the_worse_direction():
    base, cur = np.array([0.50, 0.52, 0.49, 0.51]), np.array([0.47, 0.48, 0.50])
    verdict = regression_rule(base, cur, direction=+1, tolerance=0.0)  # higher is better
    expected = stats.ttest_ind(cur, base, equal_var=False, alternative="less").pvalue
    assert verdict.p_value == pytest.approx(expected)
    assert regression_rule(base, cur, direction=-1, tolerance=0.0).p_value == pytest.approx(
        1 - expected)


def test_an_improvement_is_never_a_regression():
    report = compare(table(*seeds([30.0, 31.0, 32.0])), table(*seeds([10.0, 11.0, 12.0])))
    assert metric_row(report, "fid")["verdict"] == "ok" and report.exit_status() == 0


def test_a_metric_that_disappears_is_a_regression():
    report = compare(table(row(fid=10.0, recon_mse=0.1, **GEN)),
                     table(row(fid=None, recon_mse=0.1, **GEN)))
    assert metric_row(report, "fid")["verdict"] == "REGRESSION"


def test_a_table_without_the_needed_columns_names_them():
    with pytest.raises(UserError, match="current table lacks the column.*status"):
        compare(table(row(fid=1.0)), pd.DataFrame([{"model": "ae", "variant": "mlp",
                                                    "dataset": "mnist", "seed": 0}]))


def test_an_unparsable_metric_names_the_row():
    bad = table(row(fid=1.0), row(seed=1, fid="n/a"))
    with pytest.raises(UserError, match=r"row 3 \(vae/mlp seed 1\): fid='n/a' is not a number"):
        compare(table(row(fid=1.0)), bad)


def test_unknown_metric_names_list_the_choices():
    with pytest.raises(UserError, match="unknown metric.*'fdi'.*choose from: recon_mse"):
        compare(table(row(fid=1.0)), table(row(fid=1.0)), metrics=["fdi"])
    with pytest.raises(UserError, match="--tol.*'fidd'"):
        compare(table(row(fid=1.0)), table(row(fid=1.0)), {"fidd": 0.1})


def test_history_marks_the_commit_where_a_regression_began():
    rows = table(*commit_rows("c3", 3, [13.0, 14.0, 15.0]),  # listed out of order on purpose
                 *commit_rows("c1", 1, [10.0, 11.0, 12.0]),
                 *commit_rows("c2", 2, [10.2, 11.2, 12.2]))
    course = history(rows, ["fid"])
    assert course["commit"].tolist() == ["c1", "c2", "c3"]
    assert course["regression"].tolist() == [False, False, True]
    assert course["mean"].tolist() == pytest.approx([11.0, 11.2, 14.0])
    assert course["std"].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_history_does_not_judge_across_a_change_of_provenance():
    rows = table(*commit_rows("c1", 1, [10.0, 11.0, 12.0]),
                 *commit_rows("c2", 2, [40.0, 41.0, 42.0]))
    rows.loc[rows["git_commit"] == "c2", "n_fake"] = 5000
    course = history(rows, ["fid"])
    assert not course["regression"].any() and "n_fake" in course["note"].iloc[1]


def test_provenance_values_compare_by_value_and_missing_ones_alike():
    assert same_value(float("nan"), None) and same_value(1000, 1000.0) and same_value("a", "a")
    assert not same_value(float("nan"), 1) and not same_value(1, None)
    assert not same_value(1000, 1001)
    assert not same_value("a", "b")


def test_a_provenance_column_in_one_table_only_differs_and_absent_ones_do_not_stop_the_search():
    assert provenance_differences("fid", table(row(fid=1.0, n_fake=1000)),
                                  table(row(fid=1.0, n_fake=1000, features="x"))) == [
        "features: not recorded -> x"]
    # eval_split, test_images and features are absent from both: n_fake is still checked
    assert provenance_differences("fid", table(row(fid=1.0, n_fake=10)),
                                  table(row(fid=1.0, n_fake=20))) == ["n_fake: 10 -> 20"]


def test_config_differences_cover_keys_of_either_side_at_every_depth():
    base = '{"budget": {"epochs": 2}, "data": {"batch_size": 64}, "params": {}, "seed": 0}'
    cur = '{"budget": {"epochs": 3}, "data": {"batch_size": 64}, "params": {"k": 8}, "seed": 1}'
    assert config_differences(base, cur) == "budget.epochs: 2 -> 3; params.k: - -> 8"
    assert config_differences(float("nan"), '{"lr": 1}') == "lr: - -> 1"  # a row without config


def test_the_relative_change_is_against_the_baseline_for_small_metrics_too():
    verdict = regression_rule(np.array([0.010]), np.array([0.0105]), direction=-1,
                              tolerance=0.02)
    assert verdict.change == pytest.approx(-0.05) and verdict.regression
    assert math.isnan(verdict.noise) and math.isnan(verdict.p_value)


def test_a_change_of_exactly_the_tolerance_is_not_a_regression():
    verdict = regression_rule(np.array([100.0]), np.array([98.0]), direction=+1, tolerance=0.02)
    assert verdict.change == -0.02 and not verdict.regression


@pytest.mark.parametrize("n_base, n_cur, rule", [(2, 2, "welch"), (3, 1, "tolerance (1 seed)"),
                                                 (1, 3, "tolerance (1 seed)")])
def test_welch_needs_two_seeds_on_each_side(n_base, n_cur, rule):
    base, cur = np.linspace(10, 11, n_base), np.linspace(20, 21, n_cur)
    verdict = regression_rule(base, cur, direction=-1, tolerance=0.02)
    assert verdict.rule == rule and verdict.regression


def test_without_any_spread_a_worsening_is_significant_and_no_change_is_not():
    ones, twos = np.ones(3), np.full(3, 2.0)
    worse = regression_rule(ones, twos, direction=-1, tolerance=0.02)
    assert (worse.noise, worse.p_value, worse.regression) == (0.0, 0.0, True)
    better = regression_rule(twos, ones, direction=-1, tolerance=0.02)
    same = regression_rule(ones, ones, direction=-1, tolerance=0.02)
    assert better.p_value == same.p_value == 1.0 and not better.regression


def test_every_kind_of_failure_fails_the_check_whatever_else_happened():
    base = table(row(model="gan", fid=30.0, **GEN), row(model="vae", fid=20.0, **GEN))
    one_missing_one_diverged = table({**row(model="gan", **GEN), "status": "diverged"})
    report = compare(base, one_missing_one_diverged)
    assert report.failures["missing"] == report.failures["diverged"] == 1
    assert report.exit_status() == 1
    worse_and_incomparable = table(row(model="gan", fid=40.0, **GEN),
                                   row(model="vae", fid=20.0, **{**GEN, "n_fake": 7}))
    report = compare(base, worse_and_incomparable, metrics=["fid"])
    assert report.failures["regression"] == report.failures["incomparable"] == 1
    assert report.exit_status() == 1 and report.exit_status(allow_incomparable=True) == 1


def test_a_missing_group_does_not_stop_the_groups_after_it_from_being_judged():
    base = table(row(model="ae", fid=10.0, **GEN), row(model="gan", fid=30.0, **GEN))
    report = compare(base, table(row(model="gan", fid=40.0, **GEN)), metrics=["fid"])
    assert report.failures == {"regression": 1, "missing": 1, "diverged": 0, "incomparable": 0,
                               "not judged": 0}
    assert metric_row(report, "fid", "gan")["verdict"] == "REGRESSION"
    assert metric_row(report, "fid", "gan")["delta"] == pytest.approx(10.0)


def test_a_metric_only_in_the_current_table_is_new_not_a_regression():
    report = compare(table(row(fid=10.0, **GEN)), table(row(fid=10.0, recon_mse=0.1, **GEN)))
    assert metric_row(report, "recon_mse")["verdict"] == "new metric"
    assert report.exit_status() == 0


def test_the_significance_level_is_the_callers():
    base, cur = table(*seeds([10.0, 11.0, 12.0])), table(*seeds([13.0, 14.0, 15.0]))  # p ~ 0.012
    assert metric_row(compare(base, cur, paired=False), "fid")["verdict"] == "REGRESSION"
    assert metric_row(compare(base, cur, alpha=0.001, paired=False), "fid")["verdict"] == "ok"


def test_one_group_judged_over_seeds_makes_the_report_seed_aware():
    base = table(*seeds([10.0, 11.0, 12.0]), row(model="vae", fid=5.0, **GEN))
    cur = table(*seeds([10.0, 11.0, 12.0]), row(model="vae", fid=5.0, **GEN))
    assert compare(base, cur).seed_aware  # ae over 3 seeds, vae with one


def test_with_the_same_seeds_the_per_seed_differences_are_tested():
    """A shift of 0.5 where the seeds spread by 1: within the seed noise for Welch, but every
    seed moved alike, which the paired test sees (and matches scipy's ttest_rel)."""
    base = [10.0, 11.0, 12.0]
    cur = [10.6, 11.4, 12.5]
    fid = metric_row(compare(table(*seeds(base)), table(*seeds(cur))), "fid")
    assert fid["rule"] == "paired" and fid["verdict"] == "REGRESSION"
    assert fid["p_value"] == pytest.approx(stats.ttest_rel(cur, base, alternative="greater").pvalue)
    assert metric_row(compare(table(*seeds(base)), table(*seeds(cur)), paired=False),
                      "fid")["verdict"] == "ok"


def test_unpaired_compares_other_seeds_instead_of_calling_them_missing_and_new():
    base = table(*seeds([10.0, 11.0, 12.0]))
    cur = table(*[{**r, "seed": r["seed"] + 3, "config_hash": f"x{r['seed']}"}
                  for r in seeds([10.2, 11.1, 12.3])])
    assert compare(base, cur).exit_status() == 1  # every run missing (and new)
    report = compare(base, cur, paired=False)
    assert report.exit_status() == 0 and report.runs["status"].tolist() == ["ok"]
    assert metric_row(report, "fid")["rule"] == "welch"


def test_holm_adjusts_each_p_value_by_how_many_smaller_ones_there_are():
    from bench.compare import holm_adjusted

    adjusted = holm_adjusted([0.01, 0.04, float("nan"), 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): 4 x 0.005, 3 x 0.01, max(0.03, 2 x 0.03), 0.06
    assert adjusted[[4, 0, 3, 1]] == pytest.approx([0.02, 0.03, 0.06, 0.06])
    assert math.isnan(adjusted[2])


def test_many_comparisons_are_adjusted_together_so_one_small_p_is_not_enough():
    """20 metrics-worth of comparisons: a p of 0.02 alone fails a single comparison, not one
    of twenty (Holm needs 0.05 / 20); the raw and adjusted p-values are both in the report."""
    metrics = ["fid", "kid_mean", "isc_mean", "precision", "recall", "density", "coverage"]
    base = [{**row(model="gan", variant=f"v{g}", seed=i, **GEN),
             **{m: 10.0 + i for m in metrics}} for g in range(3) for i in range(3)]
    # every figure moves by seed noise (an identical one would not count in Holm's m) ...
    cur = [{**r, **{m: r[m] + (0.3, -0.3, 0.0)[r["seed"]] for m in metrics}} for r in base]
    for r, shift in zip(cur[:3], (0.9, 1.25, 1.6)):  # ... and one of one group a little more
        r["fid"] += shift
    single = compare(table(*base[:3]), table(*cur[:3]), metrics=["fid"])
    assert metric_row(single, "fid", model="gan")["verdict"] == "REGRESSION"
    report = compare(table(*base), table(*cur))
    fid = report.metrics[(report.metrics["metric"] == "fid")
                         & (report.metrics["variant"] == "v0")].iloc[0]
    assert fid["p_value"] < 0.05 < fid["p_adjusted"] and fid["verdict"] == "ok"
    assert compare(table(*base), table(*cur), correction="none").exit_status() == 1


def test_tables_concatenated_with_repeated_index_labels_compare_as_read_from_files():
    """Seed sets run into two folders and joined with pd.concat (no ignore_index) repeat row
    labels within a group; the verdict is still that of the rows: here paired, a regression
    (as in the test above)."""
    base, cur = seeds([10.0, 11.0, 12.0]), seeds([10.6, 11.4, 12.5])
    def joined(rows):  # row labels 0, 1, 0
        return pd.concat([table(*rows[:2]), table(rows[2])])

    fid = metric_row(compare(joined(base), joined(cur)), "fid")
    assert fid["rule"] == "paired" and fid["verdict"] == "REGRESSION"


def test_a_figure_the_same_at_every_seed_is_not_counted_in_holms_m():
    """A change to one family: the other nine groups reproduce bitwise, so the changed group is
    judged as if compared alone (Holm over ten would need p < 0.005)."""
    base = [row(model="gan", variant=f"v{g}", seed=i, fid=10.0 + i, **GEN)
            for g in range(10) for i in range(3)]
    cur = [dict(r) for r in base]
    for r, shift in zip(cur[:3], (0.9, 1.25, 1.6)):
        r["fid"] += shift
    alone = metric_row(compare(table(*base[:3]), table(*cur[:3])), "fid", model="gan")
    report = compare(table(*base), table(*cur))
    fid = report.metrics[(report.metrics["metric"] == "fid")
                         & (report.metrics["variant"] == "v0")].iloc[0]
    assert 0.005 < fid["p_value"] < 0.05 and fid["p_adjusted"] == alone["p_adjusted"]
    assert fid["verdict"] == "REGRESSION" and report.exit_status() == 1
    untouched = report.metrics[report.metrics["variant"] != "v0"]
    assert (untouched["verdict"] == "ok").all()
    assert untouched["detail"].str.contains("not counted in Holm").all()
    assert "9 judged figure(s) were the same at every seed: unchanged, so not counted in that " \
        "correction" in report.summary_line()


@pytest.mark.parametrize("model, metric, judged", [
    ("ae", "fid", False), ("sae", "fid", False), ("vae", "fid", True), ("gan", "fid", True),
    ("ae", "psnr", False), ("vae", "recon_mse", True), ("sae", "l0", True),
    ("gan", "kid_mean", False), ("vae", "precision", True)])
def test_a_family_judges_one_figure_per_objective(model, metric, judged):
    """A clear worsening (every seed 20% worse) fails the gate only in a figure the family is
    trained for; the AE's and SAE's samples and a second figure of one quantity are shown."""
    worse = 1.2 if DIRECTIONS[metric] < 0 else 0.8
    base = table(*[row(model, seed=i, **GEN, **{metric: 10.0 + i}) for i in range(3)])
    cur = table(*[row(model, seed=i, **GEN, **{metric: (10.0 + i) * worse}) for i in range(3)])
    assert compare(base, cur).exit_status() == int(judged)
    assert metric_row(compare(base, cur), metric, model)["verdict"] == (
        "REGRESSION" if judged else "descriptive")


def test_only_a_familys_objectives_fail_the_gate_the_rest_is_shown():
    base = table(*[row("ae", seed=i, hoyer=0.20, recon_mse=0.1, **GEN) for i in range(3)])
    cur = table(*[row("ae", seed=i, hoyer=0.10 + 0.01 * i, recon_mse=0.1, **GEN)
                  for i in range(3)])
    report = compare(base, cur)
    hoyer = metric_row(report, "hoyer", "ae")
    assert hoyer["verdict"] == "descriptive" and hoyer["change"] < -0.4  # the AE's codes
    assert report.exit_status() == 0
    assert "1 other figure(s) are descriptive: reported, never failing" in report.summary_line()
    from bench.compare import format_report
    assert "hoyer" in format_report(report)  # it moved, so it is shown
    assert compare(base, cur, judge="all").exit_status() == 1


def test_timings_are_descriptive_unless_asked_for():
    base = table(*[row(seed=i, train_img_per_s=1000.0 + i, device="cpu", devices=1)
                   for i in range(3)])
    cur = table(*[row(seed=i, train_img_per_s=100.0 + i, device="cpu", devices=1)
                  for i in range(3)])
    assert compare(base, cur).exit_status() == 0
    assert compare(base, cur, timings=True).exit_status() == 1


def test_history_keeps_every_commit_of_the_same_runs():
    """The same config hashes at three commits: three points of history, not reruns of one
    (the latest row of a hash and seed supersedes only within its commit)."""
    def at(commit, hour, values):
        return [{**r, "config_hash": f"run-{r['seed']}"} for r in commit_rows(commit, hour,
                                                                              values)]
    rows = table(*at("c1", 1, [10.0, 11.0, 12.0]), *at("c2", 2, [10.1, 11.1, 12.1]),
                 *at("c3", 3, [14.0, 15.0, 16.0]))
    course = history(rows, ["fid"])
    assert course["commit"].tolist() == ["c1", "c2", "c3"]
    assert course["regression"].tolist() == [False, False, True]  # paired: every seed +4


def test_history_judges_a_commit_that_changed_one_group_as_if_alone():
    """Ten groups, one of them changed at c2 (every seed a little worse): the nine untouched
    ones do not count in Holm's m for that step."""
    def at(commit, hour, shifts):
        return [{**row(model="gan", variant=f"v{g}", seed=i, fid=10.0 + i + shifts[g][i],
                       **GEN), "git_commit": commit, "config_hash": f"v{g}-{i}",
                 "timestamp": f"2026-11-2{hour}T00:00:00+00:00"}
                for g in range(10) for i in range(3)]
    unchanged = [(0.0, 0.0, 0.0)] * 10
    course = history(table(*at("c1", 1, unchanged),
                           *at("c2", 2, [(0.9, 1.25, 1.6)] + unchanged[1:])), ["fid"])
    began = course[course["regression"]]
    assert began[["commit", "variant"]].values.tolist() == [["c2", "v0"]]


def null_tables(rng, groups=4, seeds_a_side=3):
    """Two tables of the same code at disjoint seeds: every figure of a group drawn from one
    normal distribution (its own mean, a spread of 10% of it, far beyond the tolerance)."""
    metrics = ["recon_mse", "psnr", "ssim", "fid", "kid_mean", "isc_mean", "precision",
               "recall", "density", "coverage"]
    means = rng.uniform(1, 100, size=(groups, len(metrics)))
    sides = []
    for side in range(2):
        rows = []
        for g in range(groups):
            for s in range(seeds_a_side):
                seed = side * seeds_a_side + s
                values = rng.normal(means[g], 0.1 * means[g])
                rows.append({**row(variant=f"v{g}", seed=seed, **GEN),
                             "config_hash": f"v{g}-{seed}", **dict(zip(metrics, values))})
        sides.append(table(*rows))
    return sides


def test_null_compares_fail_the_gate_at_most_alpha_of_the_time():
    """60 compares of unchanged code (40 comparisons each): with Holm's adjustment the share
    that fails stays near alpha = 0.05 (at most 7 of 60, a binomial tail of ~3% at 0.05);
    unadjusted, most of them fail."""
    rng = np.random.default_rng(0)
    failed = unadjusted = 0
    for _ in range(60):
        base, cur = null_tables(rng)
        failed += compare(base, cur, paired=False, judge="all").exit_status()
        unadjusted += compare(base, cur, paired=False, correction="none",
                              judge="all").exit_status()
    assert failed <= 7 and unadjusted >= 25, (failed, unadjusted)


def test_metrics_named_by_the_caller_are_judged_whatever_the_family():
    base = table(row("ae", fid=10.0, **GEN))
    cur = table(row("ae", fid=20.0, **GEN))
    assert compare(base, cur).exit_status() == 0  # the AE's samples are descriptive
    assert compare(base, cur, metrics=["fid"]).exit_status() == 1


# -- other hardware --------------------------------------------------------------------------------
AMD = {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "onednn_isa": "Intel AVX-512",
       "torch_threads": 1, "torch": "2.14.1"}
AVX2 = {**AMD, "cpu_capability": "AVX2", "onednn_isa": "Intel AVX2"}


def test_a_one_seed_worsening_on_other_hardware_is_not_judged_and_the_verdict_says_why():
    report = compare(table(*seeds([10.0], **AMD)), table(*seeds([10.5], **AVX2)))
    fid = metric_row(report, "fid")
    assert fid["verdict"] == "not judged"
    assert fid["detail"] == "other hardware: not judged at one seed"
    assert report.exit_status() == 0
    text = format_report(report)
    assert "Other hardware: cpu_capability: AVX512 -> AVX2; onednn_isa: Intel AVX-512 -> Intel " \
           "AVX2." in text and "1 not judged (other hardware, one seed)" in text


def test_a_one_seed_worsening_on_other_hardware_is_judged_when_asked():
    report = compare(table(*seeds([10.0], **AMD)), table(*seeds([10.5], **AVX2)),
                     across_hardware=True)
    assert metric_row(report, "fid")["verdict"] == "REGRESSION" and report.exit_status() == 1


def test_other_library_versions_are_named_as_such():
    report = compare(table(*seeds([10.0], **AMD)),
                     table(*seeds([10.5], **{**AMD, "torch": "2.15.0"})))
    assert metric_row(report, "fid")["detail"] == "other library versions: not judged at one seed"
    assert report.environment_differences == ("torch: 2.14.1 -> 2.15.0",)


def test_a_baseline_without_hardware_columns_is_other_hardware():
    report = compare(table(*seeds([10.0])), table(*seeds([10.5], **AMD)))
    assert metric_row(report, "fid")["verdict"] == "not judged"
    assert "cpu: not recorded -> AMD EPYC" in report.environment_differences


def test_over_seeds_other_hardware_is_judged_by_the_seed_noise():
    base = table(*seeds([10.0, 11.0, 12.0], **AMD))
    assert metric_row(compare(base, table(*seeds([13.0, 14.0, 15.0], **AVX2))),
                      "fid")["verdict"] == "REGRESSION"
    assert metric_row(compare(base, table(*seeds([10.1, 10.9, 12.2], **AVX2))),
                      "fid")["verdict"] == "ok"


def test_timings_from_other_hardware_are_incomparable():
    base = table(*seeds([10.0], train_img_per_s=1000.0, **AMD))
    report = compare(base, table(*seeds([10.0], train_img_per_s=100.0, **AVX2)), timings=True)
    assert metric_row(report, "train_img_per_s")["verdict"] == "incomparable"


def test_history_does_not_judge_a_one_seed_step_to_other_hardware():
    rows = table(*commit_rows("c1", 1, [10.0], **AMD), *commit_rows("c2", 2, [15.0], **AVX2))
    course = history(rows, ["fid"])
    assert not course["regression"].any()
    assert course["note"].iloc[1] == "other hardware: not judged at one seed"
    assert history(rows, ["fid"], across_hardware=True)["regression"].tolist() == [False, True]


def config(lr, seed=0):
    return json.dumps({"model": "vae", "seed": seed, "params": {"lr": lr}})


def test_history_refuses_to_pool_two_settings_of_one_variant_at_a_commit():
    """The VAE at lr 1e-3 and 1e-4 in one folder, one variant name: not one point of n = 6."""
    rows = table(*[{**r, "config": config(1e-3, r["seed"])}
                   for r in commit_rows("c1", 1, [10.0, 11.0, 12.0])],
                 *[{**r, "seed": r["seed"] + 3, "config_hash": f"x{r['seed']}",
                    "config": config(1e-4, r["seed"] + 3)}
                   for r in commit_rows("c1", 1, [20.0, 21.0, 22.0])])
    with pytest.raises(UserError, match=r"vae/mlp on mnist at commit c1 has runs of more than "
                                        r"one setting \(params.lr: 0.001 -> 0.0001\)"):
        history(rows, ["fid"])


def test_history_names_the_config_change_where_a_regression_began(tmp_path, capsys):
    from bench.cli import main

    rows = [{**r, "config": config(1e-3 if r["git_commit"] == "c1" else 1e-4, r["seed"])}
            for r in commit_rows("c1", 1, [10.0, 11.0, 12.0])
            + commit_rows("c2", 2, [13.0, 14.0, 15.0])]
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    assert main(["history", str(tmp_path / "runs.csv"), "--metrics", "fid"]) == 1
    out = capsys.readouterr().out
    assert "regression began at c2: vae/mlp on mnist fid 11 -> 14" in out
    assert "; config params.lr: 0.001 -> 0.0001" in out and "(config changed)" not in out


def test_the_report_says_worse_or_better_in_words():
    """recon_mse 0.076 -> 0.165 read '-116.65%' (signed so that + is better); now the figure's
    own change and what it means."""
    report = compare(table(row(recon_mse=0.076, fid=10.0)), table(row(recon_mse=0.165, fid=8.0)))
    text = format_report(report, show_all=True)
    assert "+117.11% (worse)" in text and "-20.00% (better)" in text
    narrow = format_report(report)  # the failure alone, in the columns that read it
    assert "WORSE: fails" in narrow and "delta" not in narrow and "rule" not in narrow


def test_timings_from_another_machine_are_left_out_of_the_report_unless_asked():
    base = table(*seeds([10.0], train_img_per_s=1000.0, **AMD))
    report = compare(base, table(*seeds([10.0], train_img_per_s=100.0, **AVX2)))
    assert "train_img_per_s" not in format_report(report, show_all=True)
    assert "train_img_per_s" in format_report(report, show_all=True, timings=True)
