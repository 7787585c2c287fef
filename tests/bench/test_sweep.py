"""`sweep:` in a suite entry (bench/suite.py): points expanded as a product or as given, each
a run with its own readable variant name and config hash."""

import pytest

from bench.suite import SuiteError, load_suite
from tests.rows import write_suite as write

HEAD = """\
name: t
defaults: {datasets: [mnist], seeds: [0, 1], budget: {epochs: 1}}
runs:
"""


def specs(tmp_path, run_line):
    return load_suite(write(tmp_path, HEAD + run_line)).specs


def test_a_mapping_sweeps_the_product_of_its_lists_in_order(tmp_path):
    got = specs(tmp_path, "  - {model: sae, variant: topk, params: {sparsity: topk}, "
                          "sweep: {params.k: [4, 8], params.aux_k: [0, 16]}}\n")
    assert [s.variant for s in got if s.seed == 0] == [
        "topk-k4-aux_k0", "topk-k4-aux_k16", "topk-k8-aux_k0", "topk-k8-aux_k16"]
    assert [(s.params["k"], s.params["aux_k"]) for s in got if s.seed == 1] == [
        (4, 0), (4, 16), (8, 0), (8, 16)]
    assert {s.entry for s in got} == {"topk"} and [s.sweep_index for s in got][:4] == [0, 0, 1, 1]
    assert all(s.params["sparsity"] == "topk" for s in got)  # the entry's own params stay


def test_a_list_of_mappings_gives_points_that_go_together(tmp_path):
    got = specs(tmp_path, "  - {model: sae, variant: topk, params: {sparsity: topk}, "
                          "sweep: [{params.k: 4, params.aux_k: 8}, {params.k: 16, "
                          "params.aux_k: 32}]}\n")
    assert [(s.variant, s.params["k"], s.params["aux_k"]) for s in got if s.seed == 0] == [
        ("topk-k4-aux_k8", 4, 8), ("topk-k16-aux_k32", 16, 32)]


def test_each_point_has_its_own_config_hash_and_the_same_one_again(tmp_path):
    line = "  - {model: vae, variant: beta, sweep: {params.beta: [0.5, 1.0, 4.0]}}\n"
    first, again = specs(tmp_path, line), specs(tmp_path, line)
    assert len({s.config_hash for s in first}) == len(first) == 6
    assert [s.config_hash for s in first] == [s.config_hash for s in again]
    assert [s.variant for s in first if s.seed == 0] == ["beta-beta0.5", "beta-beta1", "beta-beta4"]


def test_a_point_that_equals_a_plain_entry_has_its_hash_but_its_own_name(tmp_path):
    swept = specs(tmp_path, "  - {model: vae, variant: v, sweep: {params.beta: [2.0]}}\n")[0]
    plain = specs(tmp_path, "  - {model: vae, variant: v-beta2, params: {beta: 2.0}}\n")[0]
    assert swept.variant == plain.variant and swept.config_hash == plain.config_hash


def test_budget_and_data_keys_sweep_too(tmp_path):
    got = specs(tmp_path, "  - {model: ae, variant: m, sweep: {budget.steps: [5, 10], "
                          "data.batch_size: [32]}}\n")
    assert [(s.budget, s.data["batch_size"]) for s in got if s.seed == 0] == [
        ({"steps": 5}, 32), ({"steps": 10}, 32)]


@pytest.mark.parametrize("sweep, message", [
    ("{params.kk: [1, 2]}", r"key 'runs.0.sweep.params.kk': SparseAutoencoder has no 'kk'; "
                            r"it takes: .*\bk\b"),
    ("{params.k: []}", r"key 'runs.0.sweep.params.k': give a non-empty list"),
    ("{params.k: [4, 8, 4]}", r"key 'runs.0.sweep.params.k': the value 4 is listed twice"),
    ("{k: [4, 8]}", r"key 'runs.0.sweep.k': a sweep key is section.name"),
    ("{data.bach_size: [4]}", r"key 'runs.0.sweep.data.bach_size': data has no 'bach_size'"),
    ("[{params.k: 4}, {params.k: 4}]", r"key 'runs.0.sweep.1': the point .* is listed twice"),
    ("[]", r"key 'runs.0.sweep': give a mapping"),
])
def test_a_bad_sweep_names_the_file_and_key(tmp_path, sweep, message):
    with pytest.raises(SuiteError, match=r"suite.yaml, line \d+, " + message):
        specs(tmp_path, f"  - {{model: sae, variant: topk, params: {{sparsity: topk}}, "
                        f"sweep: {sweep}}}\n")
