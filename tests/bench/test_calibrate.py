"""bench/calibrate.py: what counts as a planted change that moved an objective, the drawn seed
sets, the interval of the false-alarm share and the target."""

import numpy as np
import pandas as pd
import pytest

from bench.errors import UserError
from bench.calibrate import (PLANTS, Calibration, disjoint_seed_sets, moved_objectives,
                             share_interval)


def test_an_objective_moved_by_more_than_two_seed_spreads_counts_and_a_descriptive_one_not():
    base = pd.DataFrame({"elbo": [-100.0, -102.0, -104.0], "recon_mse": [0.1, 0.11, 0.12],
                         "hoyer": [0.2, 0.2, 0.2]})
    cur = pd.DataFrame({"elbo": [-108.0, -110.0, -112.0],  # 8 below, spread 2: moved by -4
                        "recon_mse": [0.11, 0.12, 0.13],  # 0.01, spread 0.01: within 2
                        "hoyer": [0.9, 0.9, 0.9]})  # not one of the VAE's objectives
    assert moved_objectives(base, cur, "vae") == {"elbo": pytest.approx(-4.0)}


def test_each_plant_changes_its_familys_setting_as_named():
    assert PLANTS["vae-lr-x0.1"][1]({"lr": 1e-3})["lr"] == 1e-4
    assert PLANTS["gan-generator-half"][1]({})["n_critic"] == 2
    assert PLANTS["sae-k-x2"][1]({"k": 8})["k"] == 16


def test_drawn_seed_sets_are_disjoint_of_the_size_asked_and_from_the_pool():
    pairs = disjoint_seed_sets(list(range(10)), 3, 200, np.random.default_rng(0))
    assert len(pairs) == 200
    for a, b in pairs:
        assert len(set(a)) == len(set(b)) == 3 and not set(a) & set(b)
        assert set(a) | set(b) <= set(range(10))
    assert len({tuple(a) for a, _ in pairs}) > 50  # drawn, not one set over and over


def test_a_pool_too_small_for_two_disjoint_sets_says_so():
    with pytest.raises(UserError, match="need 6 seeds; the pool has 5"):
        disjoint_seed_sets(list(range(5)), 3, 1, np.random.default_rng(0))


def test_the_false_alarm_interval_is_clopper_pearsons():
    low, high = share_interval(0, 20)  # closed form at 0 successes: 1 - 0.025 ** (1 / n)
    assert low == 0 and high == pytest.approx(1 - 0.025 ** (1 / 20))
    low, high = share_interval(20, 20)
    assert low == pytest.approx(0.025 ** (1 / 20)) and high == 1


def calibration(null_fails: int, caught: bool, moved: str = "l0 (+25.0 spreads)"):
    fails = [True] * null_fails + [False] * (40 - null_fails)
    draws = pd.DataFrame({"fails_now": fails, "fails_before": [True] * 40,
                          "flagged_now": ["sae/l0" if f else "" for f in fails]})
    pairs = pd.DataFrame({"pair": ["0-1", "0-2"], "fails_now": [True, False],
                          "flagged_now": ["vae/elbo", ""], "fails_before": [True, True]})
    plants = pd.DataFrame({"plant": ["sae-k-x2"], "moved": [moved], "caught_now": [caught],
                           "power_now": [0.9]})
    return Calibration(pairs, draws, plants, pool_seeds=30)


@pytest.mark.parametrize("null_fails, caught, moved, met", [
    (2, True, "l0 (+25.0 spreads)", True),  # 1 in 20 of 40 drawn pairs
    (3, True, "l0 (+25.0 spreads)", False),
    (0, False, "l0 (+25.0 spreads)", False),  # a plant that moved an objective went uncaught
    (0, False, "", True)])  # it moved nothing: nothing to catch
def test_the_target_is_one_false_alarm_in_20_and_every_moved_plant_caught(null_fails, caught,
                                                                           moved, met):
    assert calibration(null_fails, caught, moved).target_met() == met


def test_the_report_gives_the_false_alarm_share_with_its_interval_and_the_verdict():
    from bench.calibrate import format_calibration

    text = format_calibration(calibration(2, True), seeds=3)
    low, high = share_interval(2, 40)
    assert f"2 of 40 fail = 5.0% (95% interval {low:.1%}-{high:.1%}" in text
    assert "40 by the rule before" in text
    assert "1 of 2 fail now; 2 by the rule before" in text and "vae/elbo" in text
    assert "failed through: sae/l0 2" in text and text.endswith("target met")
    assert format_calibration(calibration(3, True), seeds=3).endswith("TARGET NOT MET")


@pytest.mark.parametrize("seeds, null_sets, draws", [(1, 10, 400), (3, 1, 400), (3, 10, 0)])
def test_settings_that_cannot_measure_say_so_before_anything_runs(tmp_path, seeds, null_sets,
                                                                   draws):
    from bench.calibrate import run_calibration

    with pytest.raises(UserError, match="2 or more seeds a side, the null pairs 2 or more"):
        run_calibration(seeds=seeds, null_sets=null_sets, draws=draws, out=tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.integration
def test_a_calibrations_lines_come_from_the_suites_progress_events(tmp_path, monkeypatch,
                                                                  caplog):
    from bench.calibrate import BriefProgress
    from bench.launch import run_suite
    from bench.process import EVENTS
    from bench.suite import load_suite
    from tests.data_files import write_mnist_suite

    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    suite = load_suite(str(write_mnist_suite(
        tmp_path, [{"model": "ae", "variant": "x", "params": {"hidden": 8, "latent_dim": 2}}],
        budget={"epochs": 1})))
    brief = BriefProgress()
    EVENTS.addHandler(brief)
    try:
        for _ in range(2):  # the second finds the run done
            run_suite(suite, tmp_path / "out")
    finally:
        EVENTS.removeHandler(brief)
    lines = [r.getMessage() for r in caplog.records if r.name == "bench.calibrate"]
    assert lines == ["  suite tiny: 1 of 1 runs to do", "  [1/1] ae-x-mnist-s0",
                     "  suite tiny: 0 of 1 runs to do"]
