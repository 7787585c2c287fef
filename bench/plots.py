"""Pictures of a suite: sample and reconstruction grids per run, a bar chart per headline metric."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from bench.results import DIRECTIONS, HEADLINE, seed_table


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    """Images (uint8 or [0, 1] floats, N x C x H x W) tiled into one PNG."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    save_image(images, path, nrow=nrow, padding=1, pad_value=0.5)
    return path


def save_run_grids(grids: dict[str, torch.Tensor], out_dir: Path, run_id: str) -> dict[str, Path]:
    """`samples`: 8 x 8; `reconstructions`: test images in the top rows, theirs below."""
    paths = {}
    if "samples" in grids:
        paths["samples"] = save_grid(grids["samples"], out_dir / f"{run_id}-samples.png", nrow=8)
    if "reconstructions" in grids:
        paths["reconstructions"] = save_grid(grids["reconstructions"],
                                             out_dir / f"{run_id}-reconstructions.png", nrow=16)
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
        means.index = [f"{m}\n{v}" for m, v in means.index]
        stds.index = means.index
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(means) + 1.5), 3.4))
        means.plot.bar(ax=ax, yerr=stds, rot=0, capsize=3, legend=means.shape[1] > 1)
        ax.set_title(f"{metric} ({better_direction(metric)} is better)")
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

    out_dir.mkdir(parents=True, exist_ok=True)
    commits = course.drop_duplicates("commit_index").sort_values("commit_index")
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
