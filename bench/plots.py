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
        better = "lower" if DIRECTIONS[metric] < 0 else "higher"
        ax.set_title(f"{metric} ({better} is better)")
        ax.set_xlabel("")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"metric-{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
