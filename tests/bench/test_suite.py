import pytest

from bench.suite import SuiteError, load_suite
from tests.rows import write_suite as write

SUITE = """\
name: t
defaults:
  datasets: [mnist, fashion_mnist]
  seeds: [0, 1]
  budget: {epochs: 1}
runs:
  - {model: ae, variant: mlp, params: {backbone: mlp}}
  - {model: VAE, variant: conv, params: {backbone: conv}, budget: {steps: 10}}
"""


def test_runs_expand_over_datasets_and_seeds(tmp_path):
    suite = load_suite(write(tmp_path, SUITE))
    assert len(suite.specs) == 2 * 2 * 2
    vae = [s for s in suite.specs if s.model == "vae"]
    assert {(s.dataset, s.seed) for s in vae} == {("mnist", 0), ("mnist", 1),
                                                  ("fashion_mnist", 0), ("fashion_mnist", 1)}
    assert vae[0].budget == {"steps": 10}  # a run's own keys win over the defaults


def test_seeds_option_replaces_the_suite_seeds(tmp_path):
    suite = load_suite(write(tmp_path, SUITE), seeds=[7])
    assert {s.seed for s in suite.specs} == {7}


def test_config_hash_is_stable_and_follows_the_config(tmp_path):
    first = load_suite(write(tmp_path, SUITE)).specs
    again = load_suite(write(tmp_path, SUITE.replace("name: t", "name: renamed"))).specs
    changed = load_suite(write(tmp_path, SUITE.replace("backbone: mlp", "backbone: conv"))).specs
    assert [s.config_hash for s in first] == [s.config_hash for s in again]
    assert first[0].config_hash != changed[0].config_hash
    assert len({s.config_hash for s in first}) == len(first)


@pytest.mark.parametrize("name, families", [
    ("smoke", {"ae", "sae", "vae", "gan"}), ("default", {"ae", "sae", "vae", "gan"}),
    ("paper", {"ae", "sae", "vae", "gan"}), ("gan", {"gan"}), ("vqvae", {"vqvae", "ae"})])
def test_shipped_suites_load_and_cover_every_family(name, families):
    suite = load_suite(name)
    assert {s.model for s in suite.specs} == families


def test_default_suite_is_conv_ae_sae_variants_vae_gan_on_fashion_mnist():
    specs = load_suite("default").specs
    assert {s.dataset for s in specs} == {"fashion_mnist"}
    assert all(s.params["backbone"] == "conv" for s in specs)
    assert {s.params.get("sparsity") for s in specs if s.model == "sae"} == {"l1", "kl", "topk"}


def test_paper_1h_has_the_paper_suites_entries_and_evaluation_at_a_smaller_budget():
    full, short = (load_suite(name).specs for name in ("paper", "paper-1h"))
    entries = {(s.model, s.variant, s.dataset): (s.params, s.data, s.eval) for s in full}
    assert {(s.model, s.variant, s.dataset): (s.params, s.data, s.eval) for s in short} == entries
    assert {s.seed for s in short} == {0} and {s.budget["epochs"] for s in short} == {2}
    assert all(s.budget["epochs"] > 2 for s in full)


def test_paper_suite_is_three_datasets_by_three_seeds():
    specs = load_suite("paper").specs
    assert {s.dataset for s in specs} == {"mnist", "fashion_mnist", "cifar10"}
    assert {s.seed for s in specs} == {0, 1, 2}


@pytest.mark.parametrize("text, message", [
    ("name: t\nrunz: []\n", r"line 2, key 'runz': unknown key"),
    ("name: t\nruns:\n  - {model: ae}\n  - {model: flow}\n",
     r"line 4, key 'runs.1.model': unknown model 'flow'; choose one of: ae"),
    ("name: t\nruns:\n  - model: ae\n    datasets: [svhn]\n",
     r"line 4, key 'runs.0.datasets': unknown dataset 'svhn'; choose one of: mnist"),
    ("name: t\nruns:\n  - {model: ae, budget: {hours: 2}}\n",
     r"key 'runs.0.budget': must be \{epochs: N\} or \{steps: N\}"),
    ("name: t\nruns:\n  - {model: ae, budget: 3}\n",
     r"line 3, key 'runs.0.budget': must be \{epochs: N\} or \{steps: N\} with N >= 1"),
    ("name: t\nruns:\n  - {model: ae, colour: red}\n", r"line 3, key 'runs.0.colour'"),
    ("name: t\nruns:\n  - {model: sae, params: {sparsity: l1, lamda: 2}}\n",
     r"SparseAutoencoder has no argument 'lamda'; allowed: .*l1_weight"),
    ("name: t\nruns:\n  - {model: ae, trainer: {steps_per_call: auto}}\n",
     r"key 'runs.0.trainer': steps_per_call: it is gone: the harness's own loop on Lightning "
     r"Fabric runs one batch per optimiser step .*remove the key"),
    ("name: t\nruns:\n  - {model: ae, trainer: {deterministic: true}}\n",
     r"key 'runs.0.trainer': unknown key 'deterministic'; allowed: "
     r"accumulate_grad_batches, channels_last, check_val_every_n_epoch, compile, "
     r"gradient_clip_algorithm, gradient_clip_val, log_every_n_steps, precision "
     r"\(the harness's loop\)"),
    ("name: t\nruns:\n  - {model: ae, trainer: {log_every_n_steps: 0}}\n",
     r"key 'runs.0.trainer': trainer.log_every_n_steps=0: give an integer >= 1"),
    ("name: t\nruns:\n  - {model: gan, trainer: {gradient_clip_val: 1.0}}\n",
     r"gradient_clip_val: GAN steps its own optimisers \(manual optimisation\), so the loop "
     r"cannot clip or accumulate its gradients"),
    ("name: t\nruns:\n  - {model: ae, trainer: {max_steps: 5, devices: 2}}\n",
     r"key 'runs.0.trainer': max_steps is not a suite setting: set it with the run's budget: "
     r"\{steps: N\}; devices is not a suite setting: set it with bench run --devices"),
    ("name: t\nruns:\n  - {model: ae, data: {steps_per_call: 4}}\n",
     r"key 'runs.0.data.steps_per_call': unknown key 'steps_per_call'; allowed: batch_size"),
    ("name: t\nruns:\n  - {model: ae, params: {latent_dim: 8}}\n"
     "  - {model: ae, params: {latent_dim: 16}}\n",
     r"line 4, key 'runs.1': runs as ae / default like run 0 but with other settings "
     r"\(params.latent_dim: 8 -> 16\), so tables would pool the two: give each its own "
     r"'variant:'"),
    ("name: t\nruns:\n  - {model: ae}\n  - {model: vae}\n  - {model: ae}\n",
     r"line 5, key 'runs.2': repeats run 0 \(ae / default on fashion_mnist, seed 0\)"),
    ("name: t\nruns: [\n", r"not valid YAML"),
    ("- just\n- a list\n", r"a suite is a mapping"),
])
def test_malformed_suites_name_file_line_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SuiteError, match=message) as info:
        load_suite(path)
    assert str(info.value).startswith(path)


def test_unknown_suite_lists_the_shipped_ones():
    with pytest.raises(SuiteError, match="choose one of: default, gan, paper, paper-1h, smoke"):
        load_suite("nightly")


def test_a_spec_is_rebuilt_from_its_row_as_written(tmp_path):
    """What run_one writes into a row (through pandas, where an empty cell reads as NaN) gives
    back the same spec and config hash, for a sweep's point and for a plain run."""
    import json

    import pandas as pd

    from bench.suite import RunSpec

    path = write(tmp_path, SUITE.replace(
        "runs:\n", "runs:\n  - {model: sae, variant: l1, sweep: {params.l1_weight: [0.1, 1]}}\n"))
    specs = [s.on(devices=2) if i == 0 else s for i, s in enumerate(load_suite(path).specs)]
    table = pd.DataFrame([{"suite": s.suite, "config": json.dumps(s.config(), sort_keys=True)}
                          | ({"entry": s.entry, "sweep_index": s.sweep_index}
                             if s.sweep_index is not None else {}) for s in specs])
    rebuilt = [RunSpec.from_row(row) for row in table.to_dict("records")]
    assert [s.config_hash for s in rebuilt] == [s.config_hash for s in specs]
    assert rebuilt == specs


@pytest.mark.parametrize("text, message", [
    ("name: t\ndefaults:\n  seed: [5]\nruns:\n  - {model: ae}\n",
     r"line 3, key 'defaults.seed': unknown key 'seed'; did you mean 'seeds'\?"),
    ("name: t\ndefaults:\n  dataset: [mnist]\nruns:\n  - {model: ae}\n",
     r"line 3, key 'defaults.dataset': unknown key 'dataset'; did you mean 'datasets'\?"),
    ("name: t\ndefaults:\n  seeds: [1]\n  budget: {epoch: 1}\nruns:\n  - {model: ae}\n",
     r"line 4, key 'defaults.budget': must be \{epochs: N\}"),
    ("name: t\ndefaults:\n  data: {batch_size: '64'}\nruns:\n  - {model: ae}\n",
     r"line 3, key 'defaults.data': data.batch_size='64': give 64 without quotes"),
    ("name: t\nruns:\n  - {model: sae, params: {k: eight}}\n",
     r"params.k='eight': give an integer$"),
])
def test_a_mistake_under_defaults_or_of_type_is_refused_at_its_line(tmp_path, text, message):
    """A typo under `defaults:` ran another experiment without a word; a mistake there was
    reported at the first run's line; a wrong type failed later as a raw error."""
    with pytest.raises(SuiteError, match=message):
        load_suite(write(tmp_path, text))
