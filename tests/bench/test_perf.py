"""`bench perf` (bench/perf.py): the table it prints, on a tiny synthetic dataset. Speed itself is
measured by running the command, never asserted in a test."""

import math

import pandas as pd

import pytest
import torch

from bench.perf import plain_step_fn, run_perf
from tests.data_files import standing_in_for, write_mnist_dir
from tests.modules.conftest import prototype_batches, tiny_model

pytestmark = pytest.mark.integration  # trains through Fabric and the Trainer


def test_perf_times_every_family_and_backbone_four_ways(tmp_path, monkeypatch, caplog):
    write_mnist_dir(tmp_path / "mnist", n_train=300, n_test=20)
    monkeypatch.setenv("GENBENCH_DATA", str(tmp_path / "mnist"))
    standing_in_for(monkeypatch, "mnist", tmp_path / "mnist")
    table = run_perf(["ae", "gan"], ["mlp", "conv"], dataset="mnist", batch_size=32, steps=3,
                     warmup=1, repeats=1, accelerator="cpu", progress_bar=False)
    assert list(zip(table.family, table.backbone)) == [
        ("ae", "mlp"), ("ae", "conv"), ("gan", "mlp"), ("gan", "conv")]
    for row in table.itertuples():
        rates = (row.plain_img_per_s, row.harness_img_per_s, row.trainer_img_per_s,
                 row.loader_img_per_s)
        assert all(math.isfinite(r) and r > 0 for r in rates)
        assert row.harness_vs_plain == pytest.approx(row.harness_img_per_s / row.plain_img_per_s)
    assert any("harness/plain" in line for line in caplog.messages)


@pytest.mark.parametrize("family, params", [("vae", {"adam_eps": 1e-3}), ("gan", {}),
                                            ("gan", {"loss": "wgan-gp", "n_critic": 2})])
def test_the_plain_loop_trains_as_the_family_does_under_lightning(family, params):
    """The reference step is built from the module's own configure_optimizers and step (the
    VAE's Adam eps, the GAN's n_critic), so it cannot drift from what the harness trains."""
    from tests.modules.conftest import quiet_trainer

    torch.manual_seed(0)
    plain = tiny_model(family, **params)
    step = plain_step_fn(plain)
    for i, (x, _) in enumerate(prototype_batches(64, 16)):
        step(x, i)
    torch.manual_seed(0)
    reference = tiny_model(family, **params)
    steps = 4 if family != "gan" else 4 + 4 // reference.n_critic
    quiet_trainer(max_steps=steps, max_epochs=-1, deterministic=False).fit(
        reference, train_dataloaders=prototype_batches(64, 16))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor), name


@pytest.mark.parametrize("steps, verdict", [
    (20, "harness/plain not judged against the 0.95 target: 20 steps"),
    (200, "harness/plain below the 0.95 target: ae/mlp")])
def test_the_target_is_judged_only_on_a_run_long_enough_to_time(steps, verdict, monkeypatch,
                                                                 capsys):
    import bench.perf
    from bench.cli import main

    table = pd.DataFrame([{"family": "ae", "backbone": "mlp", "harness_vs_plain": 0.5}])
    monkeypatch.setattr(bench.perf, "run_perf", lambda *args, **kwargs: table)
    assert main(["perf", "--families", "ae", "--backbones", "mlp", "--steps", str(steps)]) == 0
    assert verdict in capsys.readouterr().out
