"""Pictures of a suite: sample and reconstruction grids per run, a bar chart per headline metric,
the trade-off of sweeps and the figures over commits, each titled with what it shows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from bench.errors import UserError
from bench.metrics import DIRECTIONS, HEADLINE, METRICS
from bench.results import seed_table


def titled_grid(images: torch.Tensor, path: Path, nrow: int, title: str,
                sections: list[tuple[str, int]] = ()) -> Path:
    """Images (uint8 or [0, 1] floats, N x C x H x W) tiled `nrow` to a row under `title`, with
    each of `sections` (label, rows) named beside its rows, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    grid = make_grid(images.clamp(0, 1), nrow=nrow, padding=1, pad_value=0.5)
    height, width = grid.shape[1:]
    scale = 2 / 110  # two screen pixels per image pixel at save_figure's dpi
    fig, ax = plt.subplots(figsize=(width * scale + 1.6, height * scale + 0.7))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    row_height, start, ticks, labels = images.shape[-2] + 1, 0, [], []
    for label, rows in sections:
        ticks.append((start + rows / 2) * row_height)
        labels.append(label)
        start += rows
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def save_run_grids(grids: dict[str, torch.Tensor], out_dir: Path, run_id: str,
                   trained: str = "") -> dict[str, Path]:
    """`samples`: 8 x 8; `reconstructions`: test images in the top rows, theirs below; each
    titled with the run and `trained` (how long it trained: 'after 3 epochs (1,407 steps)')."""
    paths = {}
    when = f" {trained}" if trained else ""
    if "samples" in grids:
        samples = grids["samples"]
        paths["samples"] = titled_grid(samples, out_dir / f"{run_id}-samples.png", 8,
                                       f"{run_id}: {len(samples)} samples{when}")
    if "reconstructions" in grids:
        pairs = grids["reconstructions"]
        rows = -(-len(pairs) // 2 // 16)  # originals, then as many rows of reconstructions
        paths["reconstructions"] = titled_grid(
            pairs, out_dir / f"{run_id}-reconstructions.png", 16,
            f"{run_id}: test images and their reconstructions{when}",
            [("test images", rows), ("reconstructions", rows)])
    return paths


def better_direction(metric: str) -> str:
    return "lower" if DIRECTIONS[metric] < 0 else "higher"


def save_figure(fig, path: Path) -> Path:
    """A matplotlib figure to PNG, closed afterwards (suites draw many)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_bar_charts(rows: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One PNG per headline metric: mean over seeds per model/variant, error bars one std,
    one bar colour per dataset."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    stats = seed_table(rows)
    if stats.empty:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in HEADLINE:
        if metric not in stats.columns.get_level_values(1):
            continue
        means = stats.xs((metric, "mean"), axis=1, level=(1, 2)).dropna(how="all")
        stds = stats.xs((metric, "std"), axis=1, level=(1, 2)).reindex(means.index).fillna(0)
        if means.empty:
            continue
        counts = stats.xs((metric, "count"), axis=1, level=(1, 2)).reindex(means.index)
        counts = counts[counts > 0].stack()
        low, high = int(counts.min()), int(counts.max())
        seeds = f"{low}" if low == high else f"{low}-{high}"
        means.index = [f"{m}\n{v}" for m, v in means.index]
        stds.index = means.index
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(means) + 1.5), 3.6))
        means.plot.bar(ax=ax, yerr=stds, rot=0, capsize=3, legend=means.shape[1] > 1)
        spread = f"mean over {seeds} seeds, bars one std" if high > 1 else "1 seed, no spread"
        ax.set_title(f"{metric} on {', '.join(means.columns)}\n{spread}", fontsize=10)
        ax.set_ylabel(axis_label(metric), fontsize=9)
        ax.set_xlabel("")
        ax.grid(axis="y", alpha=0.3)
        paths.append(save_figure(fig, out_dir / f"metric-{metric}.png"))
    return paths


def history_charts(course: pd.DataFrame, out_dir: Path) -> list[Path]:
    """One PNG per metric from `bench.compare.history`: the mean over seeds at each commit, a band
    of one std, one line per model / variant / dataset, and a red ring where a regression began."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    commits = course.drop_duplicates("commit_index").sort_values("commit_index")
    if len(commits) < 2:  # one commit would be a column of dots: bench table shows its figures
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, rows in course.groupby("metric", sort=False):
        fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(commits) + 3), 3.6))
        for key, line in rows.groupby(["model", "variant", "dataset"], sort=False):
            line = line.sort_values("commit_index")
            x, mean, std = line["commit_index"], line["mean"], line["std"].fillna(0)
            ax.plot(x, mean, marker="o", label=" / ".join(key))
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
            bad = line[line["regression"]]
            ax.scatter(bad["commit_index"], bad["mean"], s=160, facecolors="none",
                       edgecolors="red", linewidths=2, zorder=3)
        ax.set_xticks(commits["commit_index"], [str(c)[:8] for c in commits["commit"]],
                      rotation=45, ha="right")
        ax.set_title(f"{metric} over commits ({better_direction(metric)} is better)\nband: one "
                     "std over seeds; red ring: a regression began", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, out_dir / f"history-{metric}.png"))
    return paths


# one line per suite entry (a sweep's points: one mechanism), or per model family
FRONTIER_GROUPS = ("entry", "model")


def frontier_points(rows: pd.DataFrame, x: str, y: str, by: str = "entry") -> pd.DataFrame:
    """One point per model / variant / dataset: the mean and std over seeds of `x` and `y`,
    with its line (`by`: the suite entry a sweep point belongs to, or the model), its place on
    that line (the sweep's order; a run without a sweep is a line of one point) and whether it
    is on its dataset's Pareto front (`pareto_front`)."""
    from bench.results import latest_runs

    missing = [m for m in (x, y) if m not in rows.columns or rows[m].isna().all()]
    if missing:
        present = [m for m in DIRECTIONS if m in rows and rows[m].notna().any()]
        raise UserError(f"no figure for {', '.join(missing)} in the table; choose from: "
                         f"{', '.join(present)}")
    if by not in FRONTIER_GROUPS:
        raise UserError(f"--by {by!r}: choose one of {', '.join(FRONTIER_GROUPS)}")
    rows = latest_runs(rows)
    rows = rows[rows["status"] == "ok"] if "status" in rows else rows
    rows = rows.dropna(subset=[x, y]).copy()
    entry = rows["entry"] if "entry" in rows else pd.Series(float("nan"), index=rows.index)
    rows["entry"] = entry.where(entry.notna(), rows["variant"]).astype(str)
    rows["sweep_index"] = rows["sweep_index"].fillna(0) if "sweep_index" in rows else 0
    rows["line"] = (rows["model"] + " / " + rows["entry"] if by == "entry" else rows["model"])
    rows["point"] = [v[len(e) + 1:] if by == "entry" and v.startswith(f"{e}-") else v
                     for v, e in zip(rows["variant"], rows["entry"])]  # 'k8' of 'topk-k8'
    keys = ["line", "model", "variant", "dataset", "point"]
    points = rows.groupby(keys, sort=False).agg(
        x_mean=(x, "mean"), x_std=(x, "std"), y_mean=(y, "mean"), y_std=(y, "std"),
        n=(x, "count"), order=("sweep_index", "first")).reset_index()
    points[["x_std", "y_std"]] = points[["x_std", "y_std"]].fillna(0.0)
    points["pareto"] = False
    for _, panel in points.groupby("dataset", sort=False):
        points.loc[panel.index, "pareto"] = pareto_front(panel["x_mean"], panel["y_mean"],
                                                         DIRECTIONS[x], DIRECTIONS[y])
    return points.sort_values(["line", "order", "x_mean"], kind="stable").reset_index(drop=True)


def pareto_front(x: pd.Series, y: pd.Series, x_direction: int, y_direction: int) -> pd.Series:
    """True where no other point is at least as good on both axes and better on one (each axis
    in its better direction: +1 higher, -1 lower is better). Quadratic in the points, which a
    sweep keeps to tens."""
    gx, gy = x.to_numpy() * x_direction, y.to_numpy() * y_direction  # higher is better now
    front = [not any((gx[j] >= gx[i] and gy[j] >= gy[i]) and (gx[j] > gx[i] or gy[j] > gy[i])
                     for j in range(len(gx))) for i in range(len(gx))]
    return pd.Series(front, index=x.index)


def axis_label(metric: str) -> str:
    unit = f" ({METRICS[metric].unit})" if metric in METRICS and METRICS[metric].unit else ""
    return f"{metric}{unit}, {better_direction(metric)} is better"


def frontier_chart(points: pd.DataFrame, x: str, y: str, out: Path) -> Path:
    """The trade-off between two figures from `frontier_points`: per dataset a panel, per line
    its points in sweep order with one std over seeds as error bars on both axes, and the
    Pareto front over every point of the panel ringed and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(points["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.0 * len(datasets), 4.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        panel = points[points["dataset"] == dataset]
        for line, group in panel.groupby("line", sort=False):
            ax.errorbar(group["x_mean"], group["y_mean"], xerr=group["x_std"],
                        yerr=group["y_std"], marker="o", capsize=2, label=line)
            for point in group.itertuples():  # the sweep's value at each point ('k8')
                if len(group) > 1 or point.point != point.line.split(" / ")[-1]:
                    ax.annotate(point.point, (point.x_mean, point.y_mean), fontsize=7,
                                xytext=(4, 4), textcoords="offset points")
        front = panel[panel["pareto"]].sort_values("x_mean")
        ax.plot(front["x_mean"], front["y_mean"], "k--", lw=1, zorder=1)
        ax.scatter(front["x_mean"], front["y_mean"], s=140, facecolors="none",
                   edgecolors="black", linewidths=1.5, zorder=3, label="Pareto front")
        ax.set_xlabel(axis_label(x), fontsize=9)
        ax.set_ylabel(axis_label(y), fontsize=9)
        seeds = int(panel["n"].max())
        ax.set_title(f"{y} against {x} on {dataset}\nmean over {seeds} seed(s), bars one std",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out)
