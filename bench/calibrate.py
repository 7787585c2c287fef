"""`bench calibrate`: how often the regression gate fails unchanged code, and what it catches,
measured on real runs of a suite.

Null compares: the suite at `null_sets` disjoint seed sets of `seeds` each (same code), every
pair compared with `bench compare --unpaired`. Planted regressions (`PLANTS`): one family's
entries changed on purpose (the VAE's learning rate x0.1, the GAN's generator updated half as
often, the SAE's k doubled), run at the first seed set and compared with it, seed by seed.
Each is judged by the gate as it is (paired where the seeds match, the family's objectives,
Holm-adjusted) and by the rule before it (Welch, every metric, no adjustment), so the table
shows what the rules change. A planted change "moves" an objective when its mean moves by more
than twice the baseline's spread over seeds.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pandas as pd

from bench.compare import compare, judged_metrics
from bench.launch import run_suite
from bench.results import read_rows
from bench.suite import load_suite

# name: (family, what changes in its params)
PLANTS = {
    "vae-lr-x0.1": ("vae", lambda p: {**p, "lr": p.get("lr", 1e-3) * 0.1}),
    "gan-generator-half": ("gan", lambda p: {**p, "n_critic": 2 * (p.get("n_critic") or 1)}),
    "sae-k-x2": ("sae", lambda p: {**p, "k": 2 * p.get("k", 8)}),
}
RULES = {"now": {}, "before": {"paired": False, "correction": "none", "judge": "all"}}


def _run(suite_name: str, seeds: list[int], out: Path, change=None) -> pd.DataFrame:
    suite = load_suite(suite_name, seeds=seeds)
    if change is not None:
        family, edit = change
        suite.specs = [dataclasses.replace(s, params=edit(dict(s.params)))
                       for s in suite.specs if s.model == family]
    run_suite(suite, out, wandb_mode="disabled", progress=False, log=lambda m: None)
    return read_rows(out / "runs.csv")


def moved_objectives(base: pd.DataFrame, cur: pd.DataFrame, family: str) -> list[str]:
    """The family's objectives whose mean moved by more than twice the baseline's seed spread
    (in either direction)."""
    moved = []
    for metric in sorted(judged_metrics(family)):
        if metric not in base or metric not in cur or base[metric].isna().all():
            continue
        spread = base[metric].std(ddof=1)
        if abs(cur[metric].mean() - base[metric].mean()) > 2 * spread:
            moved.append(metric)
    return moved


def run_calibration(suite_name: str = "smoke", seeds: int = 3, null_sets: int = 7,
                    out: Path = Path("results/calibration"), log=print) -> tuple[pd.DataFrame,
                                                                                 pd.DataFrame]:
    """(null compares, planted regressions), one row each, with each rule's verdict."""
    tables = []
    for k in range(null_sets):
        seed_set = list(range(k * seeds, (k + 1) * seeds))
        log(f"null set {k + 1}/{null_sets}: seeds {seed_set}")
        tables.append(_run(suite_name, seed_set, out / f"null-{k}"))
    null_rows = []
    for i, j in itertools.combinations(range(null_sets), 2):
        record = {"pair": f"{i}-{j}"}
        for rule, options in RULES.items():
            report = compare(tables[i], tables[j], **{"paired": False, **options})
            failing = report.metrics[report.metrics["verdict"] == "REGRESSION"]
            record[f"fails_{rule}"] = bool(report.exit_status())
            record[f"flagged_{rule}"] = ", ".join(f"{r.model}/{r.metric}"
                                                  for r in failing.itertuples())
        null_rows.append(record)
    planted_rows = []
    for name, change in PLANTS.items():
        family = change[0]
        log(f"planted: {name}")
        planted = _run(suite_name, list(range(seeds)), out / f"plant-{name}", change)
        base = tables[0][tables[0]["model"] == family]
        record = {"plant": name, "moved": ", ".join(moved_objectives(base, planted, family))}
        for rule, options in RULES.items():
            report = compare(base, planted, **options)
            failing = report.metrics[report.metrics["verdict"] == "REGRESSION"]
            record[f"caught_{rule}"] = bool(report.exit_status())
            record[f"by_{rule}"] = ", ".join(failing["metric"])
        planted_rows.append(record)
    null, plants = pd.DataFrame(null_rows), pd.DataFrame(planted_rows)
    log(f"\nnull compares (same code, disjoint seed sets of {seeds}): "
        f"{int(null['fails_now'].sum())} of {len(null)} fail now, "
        f"{int(null['fails_before'].sum())} failed by the rule before")
    return null, plants

