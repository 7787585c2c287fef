"""`bench calibrate`: how often the regression gate fails unchanged code, and what it catches,
measured on real runs of a suite.

Null compares (same code, disjoint seed sets; every failure is a false alarm):
- *fixed pairs*: the suite at `null_sets` disjoint seed sets of `seeds` each, every pair compared
  with `bench compare --unpaired`;
- *drawn pairs*: `draws` pairs of disjoint seed sets drawn at random from all those seeds (the
  pool). The fixed pairs share their sets (10 sets make 45 pairs, and one unlucky set is in 9
  of them), so their failure count is lumpy; drawn pairs estimate the chance that one compare
  of unchanged code fails, with a 95% interval (Clopper-Pearson).

Planted regressions (`PLANTS`): one family's entries changed on purpose (the VAE's learning rate
x0.1, the GAN's generator updated half as often, the SAE's k doubled), run at every seed of the
pool. A plant "moves" an objective when its mean over the pool moves by more than twice the
baseline's spread over the pool's seeds: both measured on many seeds, not on the three a
compare sees. It is then judged as a user would meet it: the whole suite at the first seed set
against the null run of those seeds, seed by seed ("caught"), and on `draws` seed sets drawn
from the pool (the share caught: the gate's power at this many seeds).

Every compare is judged by the gate as it is and the null and planted ones also by the rule
before it (Welch, every metric, no adjustment), so the tables show what the rules change.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from bench.defaults import (CALIBRATION_DRAWS, CALIBRATION_NULL_SETS, CALIBRATION_OUT,
                            CALIBRATION_SEEDS, CALIBRATION_SUITE)
from bench.errors import UserError
from bench.compare import compare, judged_metrics
from bench.launch import run_suite
from bench.process import EVENTS, only_lines_of
from bench.results import read_rows
from bench.suite import load_suite

log = logging.getLogger(__name__)

# name: (family, what changes in its params)
PLANTS = {
    "vae-lr-x0.1": ("vae", lambda p: {**p, "lr": p.get("lr", 1e-3) * 0.1}),
    "gan-generator-half": ("gan", lambda p: {**p, "n_critic": 2 * (p.get("n_critic") or 1)}),
    "sae-k-x2": ("sae", lambda p: {**p, "k": 2 * p.get("k", 8)}),
}
RULES = {"now": {}, "before": {"paired": False, "correction": "none", "judge": "all"}}
# The gate's promise at its alpha (bench.defaults.ALPHA, 0.05): at most one compare of
# unchanged code in 20 fails.
FALSE_ALARM_TARGET = 1 / 20


@dataclasses.dataclass
class Calibration:
    pairs: pd.DataFrame  # one row per fixed pair of seed sets
    draws: pd.DataFrame  # one row per drawn pair of disjoint seed sets
    plants: pd.DataFrame  # one row per planted change
    pool_seeds: int  # how many seeds the drawn pairs and the plants' effects come from

    def false_alarms(self) -> tuple[int, int, float, float]:
        """(failing, drawn, low, high): the drawn null compares that failed, and the 95%
        Clopper-Pearson interval of the chance that one fails."""
        failing, drawn = int(self.draws["fails_now"].sum()), len(self.draws)
        low, high = share_interval(failing, drawn)
        return failing, drawn, low, high

    def target_met(self) -> bool:
        """At most 1 drawn null compare in 20 fails, and every plant that moved an objective
        was caught at the first seed set."""
        failing, drawn, _, _ = self.false_alarms()
        missed = self.plants[(self.plants["moved"] != "") & ~self.plants["caught_now"]]
        return failing <= FALSE_ALARM_TARGET * drawn and missed.empty


def share_interval(successes: int, trials: int) -> tuple[float, float]:
    """The exact (Clopper-Pearson 1934) 95% confidence interval of a binomial share, from
    scipy's binomtest."""
    from scipy import stats

    if trials == 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(successes, trials).proportion_ci(0.95, method="exact")
    return float(ci.low), float(ci.high)


def disjoint_seed_sets(pool: list[int], size: int, draws: int,
                       rng: np.random.Generator) -> list[tuple[list[int], list[int]]]:
    """`draws` pairs of disjoint seed sets of `size` seeds each, drawn at random from `pool`."""
    if 2 * size > len(pool):
        raise UserError(f"two disjoint sets of {size} seeds need {2 * size} seeds; the pool "
                         f"has {len(pool)} (raise --null-sets)")
    pairs = []
    for _ in range(draws):
        chosen = rng.choice(pool, size=2 * size, replace=False).tolist()
        pairs.append((sorted(chosen[:size]), sorted(chosen[size:])))
    return pairs


class BriefProgress(logging.Handler):
    """A calibration's few lines from the suites' progress events: how many runs are to do, and
    each one as it starts."""

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if event == "suite_planned":
            log.info(f"  suite {record.suite}: {record.pending} of {record.total} runs to do")
        elif event == "run_started":
            log.info(f"  [{record.index}/{record.total}] {record.run_id}")


def _run(suite_name: str, seeds: list[int], out: Path, change=None) -> pd.DataFrame:
    """The suite (or, with a plant, its family's entries changed) at `seeds` into `out`, runs
    already there skipped; its rows at those seeds (the folder may hold more: a calibration
    at more seeds left them)."""
    suite = load_suite(suite_name, seeds=seeds)
    if change is not None:
        family, edit = change
        suite.specs = [dataclasses.replace(s, params=edit(dict(s.params)))
                       for s in suite.specs if s.model == family]

    brief = BriefProgress()
    EVENTS.addHandler(brief)
    try:
        with only_lines_of(__name__):
            run_suite(suite, out)
    finally:
        EVENTS.removeHandler(brief)
    rows = read_rows(out / "runs.csv")
    return rows[rows["seed"].isin(seeds)].reset_index(drop=True)


def moved_objectives(base: pd.DataFrame, cur: pd.DataFrame, family: str) -> dict[str, float]:
    """The family's objectives whose mean moved by more than twice the baseline's spread over
    seeds (in either direction), each with its move in spreads: (mean(cur) - mean(base)) /
    std(base)."""
    moved = {}
    for metric in sorted(judged_metrics(family)):
        if metric not in base or metric not in cur or base[metric].isna().all():
            continue
        spread = base[metric].std(ddof=1)
        shift = cur[metric].mean() - base[metric].mean()
        if abs(shift) > 2 * spread:
            moved[metric] = shift / spread if spread > 0 else float("inf")
    return moved


def _verdict(base: pd.DataFrame, cur: pd.DataFrame, **options) -> tuple[bool, str]:
    """(fails, what failed) of one compare."""
    report = compare(base, cur, **options)
    failing = report.metrics[report.metrics["verdict"] == "REGRESSION"]
    return bool(report.exit_status()), ", ".join(f"{r.model}/{r.metric}"
                                                 for r in failing.itertuples())


def _with_seeds(table: pd.DataFrame, seeds: list[int]) -> pd.DataFrame:
    return table[table["seed"].isin(seeds)]


def run_calibration(suite_name: str = CALIBRATION_SUITE, seeds: int = CALIBRATION_SEEDS,
                    null_sets: int = CALIBRATION_NULL_SETS, draws: int = CALIBRATION_DRAWS,
                    out: Path = Path(CALIBRATION_OUT),
                    draw_seed: int = 0, progress: bool = True) -> Calibration:
    """Run the null seed sets and the plants (runs already in `out` are reused), then judge
    the fixed pairs, `draws` drawn null pairs and `draws` drawn seed sets per plant."""
    from tqdm import tqdm

    if seeds < 2 or null_sets < 2 or draws < 1:  # before anything trains
        raise UserError(f"--seeds {seeds} --null-sets {null_sets} --draws {draws}: a compare "
                         "over seed noise needs 2 or more seeds a side, the null pairs 2 or "
                         "more seed sets, the estimate 1 or more draws")
    rng = np.random.default_rng(draw_seed)
    pool_seeds = list(range(null_sets * seeds))
    log.info(f"null runs: the {suite_name} suite at seeds 0-{pool_seeds[-1]}")
    pool = _run(suite_name, pool_seeds, out / "null")
    tables = [_with_seeds(pool, pool_seeds[k * seeds:(k + 1) * seeds]) for k in range(null_sets)]

    pair_rows = []
    for i, j in tqdm(list(itertools.combinations(range(null_sets), 2)), desc="fixed pairs",
                     unit="pair", disable=not progress):
        record = {"pair": f"{i}-{j}"}
        for rule, options in RULES.items():
            record[f"fails_{rule}"], record[f"flagged_{rule}"] = _verdict(
                tables[i], tables[j], **{"paired": False, **options})
        pair_rows.append(record)

    draw_rows = []
    for a, b in tqdm(disjoint_seed_sets(pool_seeds, seeds, draws, rng), desc="null draws",
                     unit="compare", disable=not progress):
        record = {"base_seeds": a, "cur_seeds": b}
        for rule, options in RULES.items():
            record[f"fails_{rule}"], record[f"flagged_{rule}"] = _verdict(
                _with_seeds(pool, a), _with_seeds(pool, b), **{"paired": False, **options})
        draw_rows.append(record)

    plant_rows = []
    for name, change in PLANTS.items():
        family = change[0]
        log.info(f"planted: {name} at {len(pool_seeds)} seeds")
        planted = _run(suite_name, pool_seeds, out / f"plant-{name}", change)
        base_family = pool[pool["model"] == family]
        moved = moved_objectives(base_family, planted, family)
        record = {"plant": name, "moved": ", ".join(f"{m} ({s:+.1f} spreads)"
                                                     for m, s in moved.items())}
        # as a user meets it: the whole suite, the other families untouched
        changed = pd.concat([pool[pool["model"] != family], planted], ignore_index=True)
        first = pool_seeds[:seeds]
        for rule, options in RULES.items():
            record[f"caught_{rule}"], record[f"by_{rule}"] = _verdict(
                _with_seeds(pool, first), _with_seeds(changed, first), **options)
        # the family alone judges alike (the untouched families' figures are not counted in
        # Holm's m) at a quarter of the cost
        seed_sets = [sorted(rng.choice(pool_seeds, seeds, replace=False).tolist())
                     for _ in range(draws)]
        caught = [_verdict(_with_seeds(base_family, s), _with_seeds(planted, s))[0]
                  for s in tqdm(seed_sets, desc=f"{name} draws", unit="compare",
                                disable=not progress)]
        record["power_now"] = float(np.mean(caught)) if caught else float("nan")
        plant_rows.append(record)

    return Calibration(pd.DataFrame(pair_rows), pd.DataFrame(draw_rows),
                       pd.DataFrame(plant_rows), len(pool_seeds))


def format_calibration(c: Calibration, seeds: int) -> str:
    """What `bench calibrate` prints: the failing fixed pairs, the drawn null compares with
    their interval and what failed, the plants, and the verdict against the target."""
    lines = []
    pairs = c.pairs
    failing_pairs = pairs[pairs["fails_now"]]
    lines.append(f"Fixed pairs (disjoint seed sets of {seeds}): {len(failing_pairs)} of "
                 f"{len(pairs)} fail now; {int(pairs['fails_before'].sum())} by the rule before")
    if len(failing_pairs):
        lines.append(failing_pairs[["pair", "flagged_now"]].to_markdown(index=False))
    failing, drawn, low, high = c.false_alarms()
    lines.append(f"\nDrawn null pairs ({seeds} seeds a side from a pool of {c.pool_seeds}): "
                 f"{failing} of {drawn} fail = {failing / max(drawn, 1):.1%} "
                 f"(95% interval {low:.1%}-{high:.1%}; target at most "
                 f"{FALSE_ALARM_TARGET:.0%}); {int(c.draws['fails_before'].sum())} by the "
                 "rule before")
    flagged = c.draws.loc[c.draws["fails_now"], "flagged_now"].str.split(", ").explode()
    if len(flagged):
        counts = flagged.value_counts()
        lines.append("  failed through: " + ", ".join(f"{m} {n}" for m, n in counts.items()))
    plants = c.plants.copy()
    plants["power_now"] = plants["power_now"].map(lambda v: f"{v:.0%}")
    lines.append(f"\nPlanted changes (moved: over {c.pool_seeds} seeds; caught: the suite at "
                 f"the first {seeds} seeds; power_now: the share caught over drawn seed sets):")
    lines.append(plants.to_markdown(index=False))
    moved = c.plants["moved"] != ""
    lines.append(f"\nplanted changes that moved an objective by > 2 seed spreads: "
                 f"{int(moved.sum())}, caught now: {int((moved & c.plants['caught_now']).sum())}")
    lines.append("target met" if c.target_met() else "TARGET NOT MET")
    return "\n".join(lines)
