"""Regression verdicts: a results table against a baseline (`bench compare`), and a metric's
course over many commits (`bench history`).

Three rules make a verdict trustworthy:
1. **Provenance.** A figure compares only with one measured the same way (same extractor, sample
   counts, K, test images; see `PROVENANCE`). Otherwise the pair is *incomparable*, never
   "better" or "worse".
2. **Nothing disappears.** A baseline run that is missing from the current table, or that did
   not finish there (diverged, eval_failed), is itself a regression.
3. **Seed noise.** Where both sides hold two or more seeds, a change is a regression only when it
   is worse than the tolerance *and* a t-test says it is beyond the spread over seeds: paired on
   the per-seed differences when both sides ran the same seeds (`paired_rule`), Welch's over the
   two seed distributions otherwise (`regression_rule`); with one seed only the tolerance
   speaks, and the report says so.
4. **Many comparisons, one gate.** A compare makes dozens of comparisons and fails on any one,
   so their p-values are adjusted together by Holm's step-down method (`holm_adjusted`): the
   chance that unchanged code fails the gate stays at alpha (a figure the same at every shared
   seed on both sides was untouched and is not counted). Holm rather than
   Benjamini-Hochberg because the gate's error is "any false alarm" (family-wise), which Holm
   controls under any dependence between metrics; BH controls the expected share of false
   alarms among the flagged ones, which lets a compare with many true nulls fail more often.
5. **Objectives judged, the rest shown.** Each family declares what it is trained for, one
   figure per objective (`Family.judged_metrics` on its class: recon_mse where it reconstructs, ELBO
   and IW-NLL for the VAE, FID, precision and recall where it is trained to sample, L0 and
   dead fraction for the sparse AE); every other figure (PSNR and SSIM beside recon_mse, KID
   and IS beside FID, the AE's mixture samples, the sparsity of codes not meant to be sparse;
   timings and memory unless asked) is descriptive: reported with its change, never failing
   the gate. Each judged figure costs the others power under Holm, and `bench calibrate`
   measured what that buys (docs/regression.md).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.defaults import ALPHA, TIMING_TOLERANCE, TOLERANCE
from bench.errors import UserError
from bench.machine import ENVIRONMENT_COLUMNS, HARDWARE_COLUMNS
from bench.metrics import DIRECTIONS, HEADLINE, PROVENANCE, TIMING_METRICS
from bench.results import latest_runs

# The one-sided Welch's t-test for a worsening over seeds is judged at bench.defaults.ALPHA: with
# 3 seeds a side, a 3-sigma shift gives p ~ 0.01 (flagged) and a 0.5-sigma one p ~ 0.29 (not).

RUN_KEYS = ["model", "variant", "dataset", "seed"]
GROUP_KEYS = ["model", "variant", "dataset"]

# Columns a table needs before it can be compared at all.
REQUIRED_COLUMNS = RUN_KEYS + ["status"]


def same_value(a, b) -> bool:
    """Provenance values as written by pandas: 1000 and 1000.0 agree, as do two missing ones."""
    if pd.isna(a) and pd.isna(b):
        return True
    if pd.isna(a) or pd.isna(b):
        return False
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return str(a) == str(b)


def column_differences(columns: list[str], base: pd.DataFrame, cur: pd.DataFrame) -> list[str]:
    """The columns whose values differ between two sets of rows, as 'column: base -> current'.
    A column absent from both tables is unknown on both sides, which is no difference; a column
    that one side lacks is one ("not recorded")."""
    differences = []
    for column in columns:
        if column not in base.columns and column not in cur.columns:
            continue
        base_values = base[column].drop_duplicates().tolist() if column in base else [None]
        cur_values = cur[column].drop_duplicates().tolist() if column in cur else [None]
        if len(base_values) != 1 or len(cur_values) != 1 or not same_value(base_values[0],
                                                                      cur_values[0]):
            show = lambda values: "/".join(  # noqa: E731
                "not recorded" if v is None or v != v else str(v) for v in values)
            differences.append(f"{column}: {show(base_values)} -> {show(cur_values)}")
    return differences


def provenance_differences(metric: str, base: pd.DataFrame, cur: pd.DataFrame) -> list[str]:
    """The provenance columns of `metric` (`PROVENANCE`) that differ between two sets of rows."""
    return column_differences(PROVENANCE.get(metric, []), base, cur)


def environment_differences(base: pd.DataFrame, cur: pd.DataFrame) -> tuple[str, list[str]]:
    """('other hardware' or 'other library versions' or '', the columns that differ): figures
    made in another environment drift as another seed would, so they are judged by seed noise
    only (`ONE_SEED_ACROSS_ENVIRONMENTS`)."""
    hardware = column_differences(HARDWARE_COLUMNS, base, cur)
    software = column_differences([c for c in ENVIRONMENT_COLUMNS if c not in HARDWARE_COLUMNS],
                                  base, cur)
    kind = "other hardware" if hardware else "other library versions" if software else ""
    return kind, hardware + software


ONE_SEED_ACROSS_ENVIRONMENTS = "not judged at one seed"


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(base_config, cur_config) -> str:
    """What differs between two runs' configs other than the seed ('budget.epochs: 2 -> 3'), so
    a changed budget or hyper-parameter is shown beside the figures rather than hidden."""
    def parse(text):
        try:
            return _flatten(json.loads(text)) if isinstance(text, str) else {}
        except json.JSONDecodeError:
            return {}
    a, b = parse(base_config), parse(cur_config)
    keys = sorted((set(a) | set(b)) - {"seed"})
    return "; ".join(f"{k}: {a.get(k, '-')} -> {b.get(k, '-')}" for k in keys
                     if a.get(k) != b.get(k))


@dataclass
class Verdict:
    """One metric of one model / variant / dataset, baseline against current."""

    regression: bool
    change: float  # relative change of the means in the better direction (negative = worse)
    noise: float  # standard error of the difference of means (NaN with one seed a side)
    p_value: float  # one-sided p-value for a worsening (NaN with one seed a side)
    rule: str  # "welch", "paired" or "tolerance (1 seed)"
    beyond_tolerance: bool = False  # worse than the tolerance, whatever the seed noise
    identical: bool = False  # the same value at every shared seed: untouched by the change


def regression_rule(base: np.ndarray, cur: np.ndarray, direction: int, tolerance: float,
                    alpha: float = ALPHA) -> Verdict:
    """Is `cur` worse than `base` beyond the tolerance and, with two or more seeds a side, beyond
    the seed noise?

    change = direction * (mean(cur) - mean(base)) / |mean(base)|, worse when below -tolerance.
    With n >= 2 seeds on both sides the worsening must also be significant: Welch's t-test
    (unequal variances; Welch 1947), one-sided in the worse direction, p < alpha. `noise` is
    the standard error of the difference, sqrt(s_b^2 / n_b + s_c^2 / n_c), so a reader sees the
    delta next to what seeds alone move it by.
    """
    from scipy import stats

    base, cur = np.asarray(base, float), np.asarray(cur, float)
    delta = cur.mean() - base.mean()
    change = direction * delta / max(abs(base.mean()), 1e-12)
    beyond_tolerance = bool(change < -tolerance)
    if len(base) < 2 or len(cur) < 2:
        return Verdict(beyond_tolerance, change, math.nan, math.nan, "tolerance (1 seed)",
                       beyond_tolerance)
    noise = math.sqrt(base.var(ddof=1) / len(base) + cur.var(ddof=1) / len(cur))
    if noise == 0:  # no spread at all (deterministic runs): any worsening is real
        p_value = 0.0 if direction * delta < 0 else 1.0
    else:
        worse = "less" if direction > 0 else "greater"
        with warnings.catch_warnings():  # near-identical seeds (precision 1.0 at most) are fine
            warnings.simplefilter("ignore", RuntimeWarning)
            p_value = float(stats.ttest_ind(cur, base, equal_var=False,
                                            alternative=worse).pvalue)
    return Verdict(beyond_tolerance and p_value < alpha, change, noise, p_value, "welch",
                   beyond_tolerance)


def paired_rule(base: np.ndarray, cur: np.ndarray, direction: int, tolerance: float,
                alpha: float = ALPHA) -> Verdict:
    """`regression_rule` for two sides that ran the same seeds, `base[i]` and `cur[i]` of one
    seed: the two runs of a seed share their initialisation and data order, so the per-seed
    differences d_i = cur_i - base_i carry much less noise than either side's spread. One-sided
    paired t-test (Student 1908; scipy's ttest_rel) that mean(d) lies in the worse direction;
    `noise` is the standard error of mean(d), std(d) / sqrt(n)."""
    from scipy import stats

    base, cur = np.asarray(base, float), np.asarray(cur, float)
    diff = cur - base
    change = direction * diff.mean() / max(abs(base.mean()), 1e-12)
    beyond_tolerance = bool(change < -tolerance)
    noise = float(diff.std(ddof=1) / math.sqrt(len(diff)))
    if noise == 0:  # every seed moved alike (or not at all)
        p_value = 0.0 if direction * diff.mean() < 0 else 1.0
    else:
        worse = "less" if direction > 0 else "greater"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p_value = float(stats.ttest_rel(cur, base, alternative=worse).pvalue)
    return Verdict(beyond_tolerance and p_value < alpha, change, noise, p_value, "paired",
                   beyond_tolerance, identical=bool(np.array_equal(base, cur)))


def holm_adjusted(p_values) -> np.ndarray:
    """Holm's step-down adjustment (Holm 1979, "A simple sequentially rejective multiple test
    procedure"): with the m p-values sorted, p_(1) <= ... <= p_(m), the adjusted
    p~_(i) = max over j <= i of min(1, (m - j + 1) p_(j)). Rejecting where p~ < alpha keeps the
    chance of any false rejection among the m at most alpha, whatever their dependence. NaNs
    (comparisons without a test) stay NaN and do not count in m."""
    p = np.asarray(p_values, float)
    adjusted = np.full_like(p, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    running = 0.0
    for rank, i in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def judged_metrics(model: str, timings: bool = False) -> set[str]:
    """The figures that can fail a regression check for this family (its
    `Family.judged_metrics`; every metric for a model genbench does not know), with the timings
    and memory when asked."""
    from modules import MODELS

    cls = MODELS.get(str(model))
    judged = (set(cls.family.judged_metrics) if cls is not None
              else set(DIRECTIONS) - TIMING_METRICS)
    return judged | (set(TIMING_METRICS) if timings else set())


def tolerance_for(metric: str, tolerances: dict[str, float]) -> float:
    return tolerances.get(metric, TIMING_TOLERANCE if metric in TIMING_METRICS else TOLERANCE)


def check_columns(table: pd.DataFrame, name: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"{name} lacks the column(s) {', '.join(missing)} that compare needs "
                         "(a runs.csv written by bench run has them)")


def check_numeric(table: pd.DataFrame, columns: list[str], name: str) -> pd.DataFrame:
    """Metric columns as floats; a value that is not a number names its row."""
    table = table.copy()
    for column in columns:
        if column not in table.columns:
            continue
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() & table[column].notna()
        if bad.any():
            i = bad.idxmax()
            raise UserError(f"{name}, row {i + 2} ({table.loc[i, 'model']}/"
                             f"{table.loc[i, 'variant']} seed {table.loc[i, 'seed']}): "
                             f"{column}={table.loc[i, column]!r} is not a number")
        table[column] = values
    return table


@dataclass
class Comparison:
    runs: pd.DataFrame  # one row per run key: status "ok", "missing", "diverged", "new", ...
    metrics: pd.DataFrame  # one row per model/variant/dataset and metric
    seed_aware: bool  # whether any metric was judged over seeds
    untouched: int = 0  # judged figures the same at every shared seed: not counted in Holm's m
    environment: str = ""  # "other hardware", "other library versions" or "" (the same)
    environment_differences: tuple[str, ...] = ()  # 'column: base -> current'

    @property
    def failures(self) -> dict[str, int]:
        counts = {"regression": int((self.metrics.get("verdict") == "REGRESSION").sum())
                  if len(self.metrics) else 0}
        for status in ("missing", "diverged"):
            counts[status] = int((self.runs.get("status") == status).sum()) if len(self.runs) \
                else 0
        for verdict in ("incomparable", "not judged"):
            counts[verdict] = int((self.metrics.get("verdict") == verdict).sum()) \
                if len(self.metrics) else 0
        return counts

    def exit_status(self, allow_incomparable: bool = False) -> int:
        counts = self.failures
        failed = counts["regression"] + counts["missing"] + counts["diverged"]
        if not allow_incomparable:
            failed += counts["incomparable"]
        return 1 if failed else 0

    def summary_line(self, allow_incomparable: bool = False) -> str:
        """The verdict in words: what failed among how many judged figures, then how they
        were judged."""
        counts = self.failures
        new = int((self.runs.get("status") == "new").sum()) if len(self.runs) else 0
        compared = int(self.metrics["verdict"].isin(["ok", "REGRESSION"]).sum()) \
            if len(self.metrics) else 0
        parts = [f"{n} {what}" for what, n in (
            ("regression(s)", counts["regression"]), ("missing run(s)", counts["missing"]),
            ("run(s) that did not finish", counts["diverged"]),
            ("incomparable metric(s)" + (" (allowed)" if allow_incomparable else ""),
             counts["incomparable"]),
            (f"not judged ({self.environment}, one seed)", counts["not judged"])) if n]
        head = "FAIL" if self.exit_status(allow_incomparable) else "PASS"
        body = ", ".join(parts) if parts else "no regression"
        extra = f"; {new} new run(s)" if new else ""
        rules = set(self.metrics["rule"].dropna()) if len(self.metrics) else set()
        how = []
        if self.seed_aware:
            how.append("a figure fails when it is worse beyond its tolerance and beyond seed "
                       "noise (a test over the seeds, paired where they match, corrected for "
                       "the number of figures judged)")
        if "tolerance (1 seed)" in rules:
            how.append("where a side has a single seed there is no noise to judge by: "
                       "beyond the tolerance alone fails")
        if self.untouched:
            how.append(f"{self.untouched} judged figure(s) were the same at every seed: "
                       "unchanged, so not counted in that correction")
        descriptive = int((self.metrics.get("verdict") == "descriptive").sum()) \
            if len(self.metrics) else 0
        if descriptive:
            how.append(f"{descriptive} other figure(s) are descriptive: reported, never failing")
        explained = "; ".join(how)
        return (f"{head}: {body} among {compared} judged figure(s){extra}."
                + (f" {explained[0].upper()}{explained[1:]}." if how else ""))

    def environment_line(self) -> str:
        """What differs between the machines or libraries of the two sides, and what follows."""
        if not self.environment:
            return ""
        return (f"{self.environment.capitalize()}: {'; '.join(self.environment_differences)}. "
                "Figures from another environment drift as another seed would: they are "
                "judged by seed noise only, so at one seed a side they are not judged "
                "(--across-hardware judges those by the tolerance too).")


def judge_together(records: list[dict], alpha: float, correction: str = "holm") -> None:
    """Set each judged record's verdict from its tolerance and its p-value adjusted with the
    others' (`holm_adjusted`; "none" leaves them raw): one adjustment per gate decision.

    A figure with the same value at every shared seed on both sides (`identical`) is no
    hypothesis under test: the change did not touch it (on a deterministic machine a family
    whose code did not change reproduces bitwise), so it is ok and does not count in Holm's m.
    Counted, a commit that changes one family would be judged as if every other family's
    untouched figures could have raised a false alarm, and its own regressions would need a
    p-value m times smaller; not counted, the changed family is judged as if compared alone.
    """
    for record in records:
        if record.get("verdict") == "pending" and record.get("identical"):
            note = "the same at every seed (not counted in Holm's m)"
            record |= {"verdict": "ok", "p_adjusted": record["p_value"],
                       "detail": "; ".join(filter(None, [record.get("detail"), note]))}
    tested = [r for r in records if r.get("verdict") == "pending"]
    raw = [r["p_value"] for r in tested]
    adjusted = holm_adjusted(raw) if correction == "holm" else np.asarray(raw, float)
    for record, p_adjusted in zip(tested, adjusted):
        record["p_adjusted"] = p_adjusted
        significant = True if math.isnan(p_adjusted) else p_adjusted < alpha  # 1 seed: tolerance
        record["verdict"] = "REGRESSION" if record["beyond_tolerance"] and significant else "ok"


def compare(baseline: pd.DataFrame, current: pd.DataFrame,
            tolerances: dict[str, float] | None = None, metrics: list[str] | None = None,
            alpha: float = ALPHA,
            names: tuple[str, str] = ("the baseline table", "the current table"),
            paired: bool = True, correction: str = "holm", judge: str = "objectives",
            timings: bool = False, across_hardware: bool = False) -> Comparison:
    """Runs matched on model / variant / dataset / seed (with `paired=False`, on model / variant
    / dataset: the seed sets may differ), then each metric per model / variant / dataset
    judged over the seeds that finished on each side: `paired_rule` where both sides ran the
    same seeds (unless `paired=False`), else `regression_rule`; p-values adjusted together
    (`correction`: holm or none). Only the family's objectives can fail (`judge`: objectives,
    or all; named `metrics` are all judged), timings too with `timings`; the rest is
    descriptive. Figures made on other hardware or library versions (`environment_differences`)
    are judged by seed noise only: at one seed a side they are "not judged", unless
    `across_hardware` asks for the tolerance's verdict. Reruns count once (the latest row of a
    config hash). `names` (file paths) go into error messages."""
    tolerances = tolerances or {}
    for option, given in (("--tol", tolerances), ("--metrics", metrics or [])):
        unknown = set(given) - set(DIRECTIONS)
        if unknown:
            raise UserError(f"unknown metric(s) in {option}: {sorted(unknown)}; choose from: "
                             f"{', '.join(DIRECTIONS)}")
    check_columns(baseline, names[0])
    check_columns(current, names[1])
    chosen = list(metrics or DIRECTIONS)
    # rows are picked by index label below: tables joined without ignore_index repeat labels,
    # and .loc would then pick other runs' rows too
    baseline = check_numeric(latest_runs(baseline).reset_index(drop=True), chosen, names[0])
    current = check_numeric(latest_runs(current).reset_index(drop=True), chosen, names[1])
    runs = _match_runs(baseline, current, RUN_KEYS if paired else GROUP_KEYS)

    ok = lambda t: t[t["status"] == "ok"]  # noqa: E731
    base_ok, cur_ok = ok(baseline), ok(current)
    records = []
    seed_aware = False
    groups = pd.concat([base_ok[GROUP_KEYS], cur_ok[GROUP_KEYS]]).drop_duplicates()
    for key in groups.itertuples(index=False):
        select = lambda t: t[(t[GROUP_KEYS] == pd.Series(key._asdict())).all(axis=1)]  # noqa
        b, c = select(base_ok), select(cur_ok)
        if b.empty or c.empty:
            continue  # the run table already says missing or new
        environment = environment_differences(b, c)[0]
        # metrics named by the caller are judged: they asked for exactly those
        judged = set(DIRECTIONS) if judge == "all" or metrics else judged_metrics(key.model,
                                                                                  timings)
        for metric in chosen:
            b_values = b[metric].dropna() if metric in b else pd.Series(dtype=float)
            c_values = c[metric].dropna() if metric in c else pd.Series(dtype=float)
            if b_values.empty and c_values.empty:
                continue
            record = {**key._asdict(), "metric": metric, "n_base": len(b_values),
                      "n_cur": len(c_values), "judged": metric in judged,
                      "baseline": b_values.mean() if len(b_values) else math.nan,
                      "current": c_values.mean() if len(c_values) else math.nan}
            tol = tolerance_for(metric, tolerances)
            differences = provenance_differences(metric, b.loc[b_values.index],
                                                 c.loc[c_values.index])
            if b_values.empty or c_values.empty:
                verdict = "REGRESSION" if c_values.empty else "new metric"
                record |= {"verdict": verdict, "detail": "no figure in the current table"
                           if c_values.empty else "no figure in the baseline"}
            elif differences:
                record |= {"verdict": "incomparable", "detail": "; ".join(differences)}
            else:
                b_seeds = b.loc[b_values.index, "seed"].tolist()
                c_seeds = c.loc[c_values.index, "seed"].tolist()
                same_seeds = sorted(b_seeds) == sorted(c_seeds) and len(set(b_seeds)) > 1 \
                    and len(set(b_seeds)) == len(b_seeds)
                if paired and same_seeds:
                    b_by_seed = dict(zip(b_seeds, b_values.to_numpy()))
                    c_by_seed = dict(zip(c_seeds, c_values.to_numpy()))
                    order = sorted(b_by_seed)
                    v = paired_rule(np.array([b_by_seed[k] for k in order]),
                                    np.array([c_by_seed[k] for k in order]), DIRECTIONS[metric],
                                    tol, alpha)
                else:
                    v = regression_rule(b_values.to_numpy(), c_values.to_numpy(),
                                        DIRECTIONS[metric], tol, alpha)
                seed_aware |= v.rule != "tolerance (1 seed)"
                record |= {"delta": record["current"] - record["baseline"], "change": v.change,
                           "noise": v.noise, "p_value": v.p_value, "tolerance": tol,
                           "rule": v.rule, "beyond_tolerance": v.beyond_tolerance,
                           "identical": v.identical, "verdict": "pending"}
                if environment and v.rule == "tolerance (1 seed)" and not across_hardware:
                    record |= {"verdict": "not judged",
                               "detail": f"{environment}: {ONE_SEED_ACROSS_ENVIRONMENTS}"}
            if not record["judged"]:  # descriptive: shown with its change, never failing
                record["verdict"] = "descriptive"
            record.setdefault("detail", "")
            configs = config_differences(b["config"].iloc[-1], c["config"].iloc[-1]) \
                if "config" in b and "config" in c else ""
            if configs:
                record["detail"] = "; ".join(filter(None, [record["detail"], "config " + configs]))
            records.append(record)
    judge_together(records, alpha, correction)
    columns = GROUP_KEYS + ["metric", "baseline", "current", "delta", "change", "noise",
                            "p_value", "p_adjusted", "n_base", "n_cur", "tolerance", "rule",
                            "verdict", "detail"]
    untouched = sum(1 for r in records if r.get("identical") and r["judged"])
    environment, differences = environment_differences(base_ok, cur_ok)
    return Comparison(runs, pd.DataFrame(records).reindex(columns=columns), seed_aware, untouched,
                      environment, tuple(differences))


def _match_runs(baseline: pd.DataFrame, current: pd.DataFrame,
                keys: list[str] = RUN_KEYS) -> pd.DataFrame:
    """Each run key with its status on both sides; a baseline run that finished but is missing
    or unfinished now is a regression ("missing", "diverged"); a run only in the current table
    is "new". Matched on model / variant / dataset alone (unpaired compares), a side's status is
    ok when all its seeds are, else the first other status."""
    def statuses(table: pd.DataFrame) -> pd.DataFrame:
        if keys == RUN_KEYS:
            return table[RUN_KEYS + ["status"]]
        first_bad = lambda s: next((v for v in s if v != "ok"), "ok")  # noqa: E731
        return table.groupby(keys, sort=False)["status"].agg(first_bad).reset_index()

    merged = statuses(baseline).merge(
        statuses(current), on=keys, how="outer", suffixes=("_base", "_cur"),
        indicator=True, sort=False)

    def status(row) -> str:
        if row["_merge"] == "left_only":
            return "missing" if row["status_base"] == "ok" else "gone (was not ok)"
        if row["_merge"] == "right_only":
            return "new"
        if row["status_base"] == "ok" and row["status_cur"] != "ok":
            return "diverged"
        if row["status_base"] != "ok" and row["status_cur"] == "ok":
            return "recovered"
        return "ok" if row["status_cur"] == "ok" else "still not ok"

    merged["status"] = merged.apply(status, axis=1) if len(merged) else []
    return merged[keys + ["status_base", "status_cur", "status"]]


def change_in_words(change: float, direction: int) -> str:
    """'+116.65% (worse)': the current figure's relative change, signed as the figure moved,
    and whether that is better or worse for it (`change` is signed so that + is better)."""
    if pd.isna(change):
        return ""
    word = "better" if change > 0 else "worse" if change < 0 else "same"
    return f"{change * direction * 100:+.2f}% ({word})"


# What the report's table shows of each figure: enough to read the verdict, narrow enough for a
# terminal (--all adds the rest).
REPORT_COLUMNS = ["model", "variant", "dataset", "metric", "baseline", "current", "change",
                  "seeds", "p", "verdict", "detail"]


def format_report(report: Comparison, allow_incomparable: bool = False,
                  show_all: bool = False, timings: bool = False) -> str:
    """What `bench compare` prints: the runs that are not plainly matched, the figures that are
    not plainly ok (all of them with `show_all`), and the verdict in words. Timings from
    another machine are left out unless asked for (`timings`): they only say which machine
    was faster."""
    lines = []
    unusual = report.runs[report.runs["status"] != "ok"]
    if len(unusual):
        lines += ["Runs:", unusual.to_markdown(index=False), ""]
    m = report.metrics
    if report.environment and not timings and len(m):
        m = m[~m["metric"].isin(TIMING_METRICS)]
    if show_all or m.empty:
        shown = m
    else:  # what is not plainly ok: failures, and descriptive figures that moved
        unjudged = m["verdict"].isin(["descriptive", "not judged"])
        moved = unjudged & (m["change"].abs() > m["tolerance"])
        shown = m[~m["verdict"].isin(["ok"]) & ~unjudged | moved]
    if len(shown):
        shown = shown.copy()
        shown["change"] = [change_in_words(c, DIRECTIONS.get(metric, 1))
                           for c, metric in zip(shown["change"], shown["metric"])]
        shown["seeds"] = [f"{b:.0f} vs {c:.0f}" for b, c in zip(shown["n_base"], shown["n_cur"])]
        shown["p"] = shown["p_adjusted"].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
        shown["verdict"] = shown["verdict"].replace({"descriptive": "shown only",
                                                     "REGRESSION": "WORSE: fails"})
        columns = (REPORT_COLUMNS + [c for c in shown.columns if c not in REPORT_COLUMNS
                                     and c not in ("n_base", "n_cur")]
                   if show_all else REPORT_COLUMNS)
        shown = shown[columns].dropna(axis=1, how="all")
        shown = shown.loc[:, [c for c in shown.columns
                              if not (shown[c].astype(str) == "").all()]]
        what = ("Every figure" if show_all else
                "Figures that failed or moved beyond their tolerance (--all shows every one)")
        lines += [f"{what}; baseline and current are means over seeds:",
                  shown.fillna("").to_markdown(index=False, floatfmt=".5g"), ""]
    if report.environment:
        lines.append(report.environment_line())
    lines.append(report.summary_line(allow_incomparable))
    return "\n".join(lines)


# -- history over commits --------------------------------------------------------------------------
def refuse_pooled_settings(key: tuple, group: pd.DataFrame) -> None:
    """One point of a history is one setting at one commit: runs of one model, variant and
    dataset whose configs differ beyond the seed (the same variant name at lr 1e-3 and 1e-4)
    would be pooled into one mean, so they are refused, naming the difference."""
    if "config" not in group:
        return
    for commit, at_commit in group.groupby("git_commit", sort=False):
        configs = at_commit["config"].dropna().unique()
        for other in configs[1:]:
            differ = config_differences(configs[0], other)
            if differ:
                raise UserError(
                    f"{'/'.join(map(str, key[:2]))} on {key[2]} at commit {commit} has runs of "
                    f"more than one setting ({differ}): history would pool them into one "
                    "point; give each setting its own variant name, or pass the tables of one "
                    "setting")


def commit_order(rows: pd.DataFrame) -> list[str]:
    """Commits in the order their runs were made (earliest timestamp of each commit's rows)."""
    first_seen = rows.groupby("git_commit", sort=False)["timestamp"].min()
    return first_seen.sort_values(kind="stable").index.tolist()


def history(rows: pd.DataFrame, metrics: list[str] | None = None,
            tolerances: dict[str, float] | None = None, alpha: float = ALPHA,
            timings: bool = False, across_hardware: bool = False) -> pd.DataFrame:
    """Per model / variant / dataset, metric and commit: mean, std and seed count over the runs
    that finished, and whether a regression began there: each commit against the previous
    commit that measured the metric the same way (a change of provenance starts afresh), by
    the rules of `compare` (paired over shared seeds, else Welch; the family's objectives
    only), the p-values of one commit's comparisons Holm-adjusted together; a step between
    environments (other hardware or library versions) is judged by seed noise only, as in
    `compare`, and says so in its note. A rerun supersedes an earlier row within its commit
    only: across commits the rows are the history."""
    for column in ("git_commit", "timestamp"):
        if column not in rows.columns:
            raise UserError(f"the tables lack the column {column!r} that history orders by")
    check_columns(rows, "the tables")
    tolerances = tolerances or {}
    rows = latest_runs(rows, per_commit=True).reset_index(drop=True)  # see compare
    rows = rows[rows["status"] == "ok"]
    chosen = [m for m in (metrics or HEADLINE) if m in rows.columns and rows[m].notna().any()]
    rows = check_numeric(rows, chosen, "the tables")
    order = {commit: i for i, commit in enumerate(commit_order(rows))}
    records = []
    for key, group in rows.groupby(GROUP_KEYS, sort=False):
        refuse_pooled_settings(key, group)
        judged = judged_metrics(key[0], timings)
        for metric in chosen:
            previous = None
            for commit, at_commit in sorted(group.groupby("git_commit"),
                                            key=lambda item: order[item[0]]):
                values = at_commit[metric].dropna()
                if values.empty:
                    continue
                record = dict(zip(GROUP_KEYS, key)) | {
                    "metric": metric, "commit": commit, "commit_index": order[commit],
                    "mean": values.mean(), "std": values.std(ddof=1) if len(values) > 1
                    else math.nan, "n": len(values), "regression": False, "note": "",
                    "judged": metric in judged}
                seeds = at_commit.loc[values.index, "seed"].tolist()
                if previous is not None:
                    prev_rows, prev_values, prev_seeds = previous
                    differences = provenance_differences(metric, prev_rows,
                                                         at_commit.loc[values.index])
                    if differences:
                        record["note"] = "measured differently: " + "; ".join(differences)
                    else:
                        tol = tolerance_for(metric, tolerances)
                        if sorted(seeds) == sorted(prev_seeds) and len(set(seeds)) > 1 \
                                and len(set(seeds)) == len(seeds):
                            mine, theirs = dict(zip(seeds, values)), dict(zip(prev_seeds,
                                                                              prev_values))
                            v = paired_rule(np.array([theirs[k] for k in sorted(mine)]),
                                            np.array([mine[k] for k in sorted(mine)]),
                                            DIRECTIONS[metric], tol, alpha)
                        else:
                            v = regression_rule(prev_values, values.to_numpy(),
                                                DIRECTIONS[metric], tol, alpha)
                        record |= {"previous_mean": prev_values.mean(), "change": v.change,
                                   "p_value": v.p_value, "beyond_tolerance": v.beyond_tolerance,
                                   "identical": v.identical,
                                   "verdict": "pending" if metric in judged else "descriptive"}
                        configs = config_differences(prev_rows["config"].iloc[-1],
                                                     at_commit["config"].iloc[-1]) \
                            if "config" in at_commit else ""
                        environment = environment_differences(prev_rows,
                                                              at_commit.loc[values.index])[0]
                        if environment:
                            unjudged = v.rule == "tolerance (1 seed)" and not across_hardware
                            record["note"] = f"{environment}" + (
                                f": {ONE_SEED_ACROSS_ENVIRONMENTS}" if unjudged else "")
                            if unjudged:
                                record["verdict"] = "not judged"
                        if configs:  # the change compare shows, where a regression may begin
                            record["note"] = "; ".join(filter(None, [record["note"],
                                                                     f"config {configs}"]))
                previous = (at_commit.loc[values.index], values.to_numpy(), seeds)
                records.append(record)
    for commit in order:  # one gate decision per commit step
        judge_together([r for r in records if r["commit"] == commit], alpha)
    for record in records:
        record["regression"] = record.pop("verdict", None) == "REGRESSION"
    return pd.DataFrame(records)
