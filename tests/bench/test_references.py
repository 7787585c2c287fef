"""The literature beside our figures (bench/references.py)."""

import pandas as pd
import pytest

from bench.references import (REFERENCES_FILE, Reference, ReferenceError, load_references,
                              reference_table)
from tests.rows import row

CITED = Reference("vae", "binarized-mlp", "mnist", "iw_nll", 86.76, "Burda et al. 2016",
                  {"iw_k": 5000, "iw_images": 10000}, shortened="784-200 ReLU, 50 epochs")


def runs(**provenance):
    return pd.DataFrame([row("vae", "binarized-mlp", "mnist", seed, iw_nll=88.0 + seed,
                             **({"iw_k": 5000, "iw_images": 10000} | provenance))
                         for seed in (0, 1)])


def test_a_matching_setting_shows_the_reference_and_the_gap():
    [line] = reference_table(runs(), [CITED]).to_dict("records")
    assert (line["ours"], line["seeds"], line["reference"]) == (88.5, 2, 86.76)
    assert line["gap"] == pytest.approx(88.5 - 86.76)
    assert line["source"] == "Burda et al. 2016"
    assert line["setup"] == "shortened: 784-200 ReLU, 50 epochs"


@pytest.mark.parametrize("provenance, differs", [({"iw_k": 100}, "iw_k: 100 vs 5000"),
                                                 ({"iw_images": 1000}, "iw_images")])
def test_a_sample_count_mismatch_shows_no_reference(provenance, differs):
    [line] = reference_table(runs(**provenance), [CITED]).to_dict("records")
    assert line["reference"] is None and line["gap"] is None and line["ours"] == 88.5
    assert line["setup"].startswith("setting differs: ") and differs in line["setup"]


def test_an_extractor_mismatch_shows_no_reference():
    cited = Reference("gan", "ns-conv", "cifar10", "fid", 58.5, "Lucic et al. 2018",
                      {"features": "inception-v3-compat", "n_fake": 10000, "n_real": 10000})
    ours = pd.DataFrame([row("gan", "ns-conv", "cifar10", 0, fid=70.0, n_fake=10000,
                             n_real=10000, features="genbench-cnn-cifar10-1234abcd")])
    [line] = reference_table(ours, [cited]).to_dict("records")
    assert line["reference"] is None
    assert "features: genbench-cnn-cifar10-1234abcd vs inception-v3-compat" in line["setup"]


def test_one_run_measured_otherwise_is_enough_to_withhold_the_reference():
    mixed = pd.concat([runs(), runs(iw_k=100).assign(seed=2, config_hash="other")])
    [line] = reference_table(mixed, [CITED]).to_dict("records")
    assert line["reference"] is None


def test_rows_without_a_reference_are_left_out():
    other = pd.DataFrame([row("ae", "mlp", "mnist", 0, recon_mse=0.01)])
    assert reference_table(other, [CITED]).empty


def test_the_shipped_references_load():
    references = load_references()
    assert any(r.metric == "iw_nll" and r.value == 86.76 for r in references)
    assert all(r.setting for r in references)


def test_a_reference_with_an_unknown_metric_names_the_entry(tmp_path):
    path = tmp_path / "refs.yaml"
    path.write_text(REFERENCES_FILE.read_text() + "\n- {model: ae, variant: mlp, dataset: mnist,"
                    " metric: fidd, value: 1, source: x}\n")
    appended = len(load_references()) + 1  # entries count from 1
    with pytest.raises(ReferenceError,
                       match=rf"refs.yaml, entry {appended}: unknown metric 'fidd'"):
        load_references(path)


@pytest.mark.parametrize("epochs, shown", [(3280, True), (2, False)])
def test_burdas_figures_show_only_beside_runs_of_their_3280_passes(epochs, shown):
    """paper-1h trains Burda's entries for 2 passes: a figure of 3,280 is not beside them."""
    shipped = [r for r in load_references() if r.variant == "binarized-mlp"]
    [line] = reference_table(runs(epochs=epochs), shipped).to_dict("records")
    assert (line["reference"] == 86.76) is shown
    assert ("epochs: 2 vs 3280" in line["setup"]) is not shown
