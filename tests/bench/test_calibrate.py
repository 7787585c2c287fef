"""bench/calibrate.py: what counts as a planted change that moved an objective."""

import pandas as pd

from bench.calibrate import PLANTS, moved_objectives


def test_an_objective_moved_by_more_than_two_seed_spreads_counts_and_a_descriptive_one_not():
    base = pd.DataFrame({"elbo": [-100.0, -101.0, -102.0], "recon_mse": [0.1, 0.11, 0.12],
                         "hoyer": [0.2, 0.2, 0.2]})
    cur = pd.DataFrame({"elbo": [-104.0, -105.0, -106.0],  # 4 below, spread 1: moved
                        "recon_mse": [0.11, 0.12, 0.13],  # 0.01, spread 0.01: within 2
                        "hoyer": [0.9, 0.9, 0.9]})  # not one of the VAE's objectives
    assert moved_objectives(base, cur, "vae") == ["elbo"]


def test_each_plant_changes_its_familys_setting_as_named():
    assert PLANTS["vae-lr-x0.1"][1]({"lr": 1e-3})["lr"] == 1e-4
    assert PLANTS["gan-generator-half"][1]({})["n_critic"] == 2
    assert PLANTS["sae-k-x2"][1]({"k": 8})["k"] == 16
