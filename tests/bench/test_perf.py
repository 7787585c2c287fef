"""`bench perf` (bench/perf.py): the table it prints, on a tiny synthetic dataset. Speed itself is
measured by running the command, never asserted in a test."""

import math

import pytest

from bench.amortise import choose_steps_per_call
from bench.perf import ceiling, run_perf
from tests.data_files import write_mnist_dir

pytestmark = pytest.mark.integration  # trains through the CLI


def test_ceiling_is_the_plain_step_over_the_plain_step_plus_the_fixed_cost():
    # 128,000 img/s at batch 128 is a 1000 us step; 250 us more per step leaves 1000 / 1250.
    assert ceiling(128_000, 128, 250.0) == pytest.approx(0.8)
    assert ceiling(128_000, 128, -5.0) == 1.0  # timing noise below zero is no cost
    assert ceiling(128_000, 128, 250.0, steps_per_call=5) == pytest.approx(1000 / 1050)
    assert ceiling(128_000, 128, 250.0, 5, per_step_us=30.0) == pytest.approx(1000 / 1080)


def test_perf_times_every_family_and_backbone_four_ways(tmp_path, monkeypatch):
    write_mnist_dir(tmp_path / "mnist", n_train=300, n_test=20)
    monkeypatch.setenv("GENBENCH_DATA", str(tmp_path / "mnist"))
    lines = []
    table = run_perf(["ae", "gan"], ["mlp", "conv"], dataset="mnist", batch_size=32, steps=3,
                     warmup=1, repeats=1, accelerator="cpu", progress_bar=False,
                     log=lines.append)
    assert list(zip(table.family, table.backbone)) == [
        ("ae", "mlp"), ("ae", "conv"), ("gan", "mlp"), ("gan", "conv")]
    for row in table.itertuples():
        rates = (row.plain_img_per_s, row.harness_img_per_s, row.harness_k1_img_per_s,
                 row.loader_img_per_s)
        assert all(math.isfinite(r) and r > 0 for r in rates)
        assert row.harness_vs_plain == pytest.approx(row.harness_img_per_s / row.plain_img_per_s)
        assert row.steps_per_call == choose_steps_per_call(
            row.per_call_us, 1e6 * 32 / row.plain_img_per_s, 300 // 32, 4)  # one repeat
        assert row.ceiling == pytest.approx(ceiling(row.plain_img_per_s, 32, row.per_call_us,
                                                    row.steps_per_call, row.per_step_us))
    assert any("us per Trainer step (shared by its K steps)" in line for line in lines)
