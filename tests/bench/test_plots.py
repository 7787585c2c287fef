"""bench/plots.py's trade-off figure: points per sweep entry, the Pareto front, the PNG."""

import pandas as pd
import pytest

from bench.errors import UserError
from bench.plots import axis_label, frontier_chart, frontier_points, pareto_front


def test_the_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    # lower is better on both: (1, 5) (2, 3) (4, 1) trade off; (3, 4) is beaten by (2, 3), and
    # (2, 3.5) by (2, 3) on one axis with a tie on the other
    x = pd.Series([1.0, 2.0, 4.0, 3.0, 2.0])
    y = pd.Series([5.0, 3.0, 1.0, 4.0, 3.5])
    assert pareto_front(x, y, -1, -1).tolist() == [True, True, True, False, False]


def test_the_front_follows_each_axis_direction():
    x, y = pd.Series([1.0, 2.0]), pd.Series([1.0, 2.0])
    assert pareto_front(x, y, -1, -1).tolist() == [True, False]  # both lower-better
    assert pareto_front(x, y, +1, +1).tolist() == [False, True]  # both higher-better
    assert pareto_front(x, y, -1, +1).tolist() == [True, True]  # a trade-off


def sweep_rows():
    rows = []
    for entry, points in (("topk", [(4, 0.030), (8, 0.020), (16, 0.012)]),
                          ("l1", [(20, 0.015), (10, 0.025)])):
        for index, (l0, mse) in enumerate(points):
            for seed in range(2):
                rows.append({"model": "sae", "variant": f"{entry}-p{index}", "entry": entry,
                             "sweep_index": index, "dataset": "fashion_mnist", "seed": seed,
                             "config_hash": f"{entry}{index}{seed}", "status": "ok",
                             "l0": l0 + seed, "recon_mse": mse * (1 + 0.1 * seed)})
    rows.append({**rows[0], "config_hash": "x", "status": "diverged", "l0": 99.0})
    return pd.DataFrame(rows)


def test_points_are_seed_means_per_entry_in_sweep_order():
    points = frontier_points(sweep_rows(), "l0", "recon_mse")
    assert points["line"].tolist() == ["sae / l1"] * 2 + ["sae / topk"] * 3
    assert points["variant"].tolist() == ["l1-p0", "l1-p1", "topk-p0", "topk-p1", "topk-p2"]
    topk4 = points[points["variant"] == "topk-p0"].iloc[0]
    assert (topk4["x_mean"], topk4["n"]) == (4.5, 2)  # the diverged run is left out
    assert topk4["y_mean"] == pytest.approx(0.0315)
    assert topk4["x_std"] == pytest.approx(pd.Series([4.0, 5.0]).std())
    # top-k at 16.5 units beats both L1 points, L1 beats no top-k point
    assert points["pareto"].tolist() == [False, False, True, True, True]


def test_a_metric_the_table_lacks_is_named_with_the_choices():
    with pytest.raises(UserError, match="no figure for rate in the table; choose from: "
                                         "recon_mse, l0"):
        frontier_points(sweep_rows(), "rate", "recon_mse")


def test_axis_labels_carry_the_unit_and_direction():
    assert axis_label("rate") == "rate (nats per image), lower is better"


def test_the_chart_is_written(tmp_path):
    points = frontier_points(sweep_rows(), "l0", "recon_mse")
    path = frontier_chart(points, "l0", "recon_mse", tmp_path / "f.png")
    assert path.stat().st_size > 5000


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib figures bench.plots saves, kept open to read their words."""
    import bench.plots

    figures = []
    monkeypatch.setattr(bench.plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    yield figures
    import matplotlib.pyplot as plt

    for fig in figures:
        plt.close(fig)


def test_run_grids_say_which_run_how_long_it_trained_and_which_rows_are_originals(tmp_path,
                                                                                  drawn):
    import torch

    from bench.plots import save_run_grids

    grids = {"samples": torch.rand(64, 1, 28, 28), "reconstructions": torch.rand(64, 1, 28, 28)}
    save_run_grids(grids, tmp_path, "vae-mlp-mnist-s0", "after 3 epochs (1,407 steps)")
    samples, pairs = (fig.axes[0] for fig in drawn)
    assert samples.get_title() == "vae-mlp-mnist-s0: 64 samples after 3 epochs (1,407 steps)"
    assert pairs.get_title() == ("vae-mlp-mnist-s0: test images and their reconstructions "
                                 "after 3 epochs (1,407 steps)")
    labels = [t.get_text() for t in pairs.get_yticklabels()]
    assert labels == ["test images", "reconstructions"]
    # 32 originals at 16 a row: two rows of 29 pixels (28 and the padding) each
    assert pairs.get_yticks().tolist() == [29.0, 87.0]


def test_bar_charts_name_the_unit_the_dataset_and_the_seeds(tmp_path, drawn):
    from bench.plots import metric_bar_charts

    rows = pd.DataFrame([{"model": "vae", "variant": "mlp", "dataset": "mnist", "seed": s,
                          "config_hash": f"h{s}", "status": "ok", "rate": 10.0 + s}
                         for s in range(3)])
    metric_bar_charts(rows, tmp_path)
    (ax,) = drawn[0].axes
    assert ax.get_title() == "rate on mnist\nmean over 3 seeds, bars one std"
    assert ax.get_ylabel() == "rate (nats per image), lower is better"


def test_frontier_points_are_labelled_with_their_sweep_value(tmp_path, drawn):
    rows = sweep_rows()
    rows["variant"] = rows["variant"].str.replace("-p", "-k")
    frontier_chart(frontier_points(rows, "l0", "recon_mse"), "l0", "recon_mse", tmp_path / "f")
    labels = [text.get_text() for text in drawn[0].axes[0].texts]
    assert labels == ["k0", "k1", "k0", "k1", "k2"]


def test_a_history_of_one_commit_draws_nothing(tmp_path):
    from bench.plots import history_charts

    course = pd.DataFrame([{"commit_index": 0, "commit": "abc", "metric": "fid", "model": "vae",
                            "variant": "mlp", "dataset": "mnist", "mean": 1.0, "std": 0.1,
                            "regression": False}])
    assert history_charts(course, tmp_path / "plots") == []
    assert not (tmp_path / "plots").exists()
