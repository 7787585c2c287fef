"""Every figure a results row can hold, declared once: its direction, unit, LaTeX header, the
provenance columns that say how it was measured, and its role (a column of the summary table,
a figure of the per-run line, a timing). Rows, tables, LaTeX, the per-run line, compare and
history, the plots' axis labels and docs/metrics.md all read it (a test checks that every key
`bench.evaluate.evaluate` emits is declared here and that docs/metrics.md lists each metric).
Pure data at the ground floor: nothing of the stack is imported.

Adding a metric is one `Metric(...)` in BUILT_IN below (and its row in docs/metrics.md), or, for
a figure only one family has, one in that family's `Family(metrics=...)`; which figures a family
is judged on is its own to declare (`Family.judged_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.machine import HARDWARE_COLUMNS

# Every figure is measured on the test split's first `test_images` images of the data files
# whose contents hash to `data_md5`; sample figures also on the features of `n_real` test and
# `n_fake` generated images; timings on one machine and device count.
SPLIT = ("eval_split", "test_images", "data_md5")
# `generator_ema`: the decay of the generator EMA the samples came from, where there was one.
GENERATION = SPLIT + ("features", "n_real", "n_fake", "generator_ema")
MACHINE = ("device", "devices", *HARDWARE_COLUMNS)


@dataclass(frozen=True)
class Metric:
    """One figure of a row, as torchmetrics' metric carries `higher_is_better`."""

    name: str
    higher_is_better: bool
    latex: str  # the column header of a paper's table, with its unit
    provenance: tuple[str, ...]  # columns that must agree for two figures to compare
    unit: str = ""  # what an axis label says it is measured in
    headline: bool = True  # a column of the summary table and `bench history` by default
    per_run: bool = False  # printed in the line after each run
    timing: bool = False  # speed or memory: descriptive unless asked for, a wider tolerance

    @property
    def direction(self) -> int:
        """+1 where higher is better, -1 where lower is."""
        return 1 if self.higher_is_better else -1


NATS = "nats per image"
BUILT_IN: tuple[Metric, ...] = (
    Metric("recon_mse", False, "MSE", SPLIT, "per pixel, images in [0, 1]", per_run=True),
    Metric("psnr", True, "PSNR (dB)", SPLIT, "dB"),
    Metric("ssim", True, "SSIM", SPLIT),
    Metric("l0", False, "$L_0$", SPLIT, "active code units per image", per_run=True),
    Metric("dead_fraction", False, "Dead", SPLIT, "share of code units", per_run=True),
    Metric("fvu", False, "FVU", SPLIT, "share of the test split's pixel variance"),
    # 1 is no shrinkage; SAEs fall below 1 (an L1 penalty shrinks codes), so higher is better
    # on the side where they are, and no family is judged on it
    Metric("shrinkage", True, "$\\|\\hat x\\| / \\|x\\|$", SPLIT, "mean image norm ratio",
           headline=False),
    Metric("dense_fraction", False, "Dense", SPLIT, "share of code units", headline=False),
    Metric("hoyer", True, "Hoyer", SPLIT, headline=False),
    Metric("max_decoder_cosine", False, "max cos", SPLIT, "cosine", headline=False),
    Metric("elbo", True, "ELBO (nats)", SPLIT, NATS, per_run=True),
    Metric("rate", False, "Rate (nats)", SPLIT, NATS),
    Metric("distortion", False, "Distortion (nats)", SPLIT, NATS),
    Metric("iw_nll", False, "NLL (nats)", SPLIT + ("iw_k", "iw_images"), NATS, per_run=True),
    Metric("fid", False, "FID", GENERATION, per_run=True),
    Metric("kid_mean", False, "KID", GENERATION + ("kid_subset_size",)),
    Metric("isc_mean", True, "IS", GENERATION, per_run=True),
    Metric("precision", True, "Prec.", GENERATION + ("prc_neighborhood",), per_run=True),
    Metric("recall", True, "Rec.", GENERATION + ("prc_neighborhood",), per_run=True),
    Metric("density", True, "Dens.", GENERATION + ("dc_neighborhood",), per_run=True),
    Metric("coverage", True, "Cov.", GENERATION + ("dc_neighborhood",), per_run=True),
    Metric("train_img_per_s", True, "img/s", MACHINE, "images per second", per_run=True,
           timing=True),
    Metric("sample_img_per_s", True, "samples/s", MACHINE, "images per second", headline=False,
           timing=True),
    Metric("eval_s", False, "eval (s)", MACHINE, "s", headline=False, timing=True),
    Metric("wall_s", False, "wall (s)", MACHINE, "s", headline=False, timing=True),
    Metric("peak_mem_mb", False, "memory (MiB)", MACHINE, "MiB", headline=False, timing=True),
)

# The figures each capability a family declares (modules/family.py) gives its rows.
CAPABILITY_FIGURES: dict[str, tuple[str, ...]] = {
    "reconstructs": ("recon_mse", "psnr", "ssim", "fvu", "shrinkage"),
    "codes": ("l0", "dead_fraction", "dense_fraction", "hoyer", "max_decoder_cosine"),
    "likelihood": ("elbo", "rate", "distortion", "iw_nll"),
    "samples": ("fid", "kid_mean", "isc_mean", "precision", "recall", "density", "coverage"),
}

# Columns evaluation writes beside the metrics: spreads and times shown, never compared.
DETAILS = {"isc_std": "std of the inception score over splits",
           "kid_std": "std of KID over subsets",
           "features_acc": "the feature classifier's test accuracy",
           "generation_s": "seconds of sampling and the sample figures",
           "iw_s": "seconds of the ELBO and IW-NLL"}

# Every declared metric, and views the rest of the code reads, derived here and nowhere else.
# Kept in step by `declare` and `withdraw` (a family's own metrics come and go with it).
METRICS: dict[str, Metric] = {}
DIRECTIONS: dict[str, int] = {}
HEADLINE: list[str] = []
PER_RUN: list[str] = []
TIMING_METRICS: set[str] = set()
PROVENANCE: dict[str, list[str]] = {}
PROVENANCE_COLUMNS: set[str] = set()


def declare(metric: Metric) -> None:
    """Add a metric to METRICS and every view (declaring an equal one again changes nothing)."""
    earlier = METRICS.get(metric.name)
    if earlier is not None and earlier != metric:
        raise ValueError(f"metric {metric.name!r} is declared twice, differently: {earlier} and "
                         f"{metric}; give one of them another name")
    if earlier is not None:
        return
    METRICS[metric.name] = metric
    DIRECTIONS[metric.name] = metric.direction
    for view, wanted in ((HEADLINE, metric.headline), (PER_RUN, metric.per_run)):
        if wanted:
            view.append(metric.name)
    if metric.timing:
        TIMING_METRICS.add(metric.name)
    PROVENANCE[metric.name] = list(metric.provenance)
    PROVENANCE_COLUMNS.update(metric.provenance)


def withdraw(name: str) -> None:
    """Remove a metric from METRICS and every view."""
    del METRICS[name], DIRECTIONS[name], PROVENANCE[name]
    for view in (HEADLINE, PER_RUN):
        if name in view:
            view.remove(name)
    TIMING_METRICS.discard(name)
    PROVENANCE_COLUMNS.clear()
    PROVENANCE_COLUMNS.update(c for m in METRICS.values() for c in m.provenance)


for _metric in BUILT_IN:
    declare(_metric)
