"""Result rows: atomic appends to runs.csv / runs.parquet, the latest row of each run, and the
seed-pivot table. Regression verdicts live in bench.compare."""

from __future__ import annotations

import csv
import io
import os
import warnings
from pathlib import Path

import pandas as pd
from filelock import FileLock

from bench.errors import UserError
from bench.machine import ENVIRONMENT_COLUMNS
from bench.machine import describe as describe_environment
from bench.metrics import DIRECTIONS, HEADLINE, METRICS

KEY_COLUMNS = ["suite", "model", "variant", "dataset", "seed"]
# Read as text whatever they look like: a hex hash such as "123e4567..." parses as a float (inf)
# and a variant or commit of digits as an integer, and then no longer matches.
TEXT_COLUMNS = ["suite", "model", "variant", "entry", "dataset", "config_hash", "status",
                "git_commit", "features", "device", "eval_split", "data_source", "data_files",
                "data_md5", *(c for c in ENVIRONMENT_COLUMNS if c != "torch_threads")]


def _write_atomic(df: pd.DataFrame, csv_path: Path) -> None:
    """Write CSV and parquet to temporary files, then rename: a crash leaves the old table."""
    tmp_csv = csv_path.with_suffix(".csv.tmp")
    df.to_csv(tmp_csv, index=False)
    parquet = csv_path.with_suffix(".parquet")
    tmp_parquet = parquet.with_suffix(".parquet.tmp")
    # parquet needs one type per column; object columns holding mixed values become strings
    df.astype({c: "string" for c in df.columns if df[c].dtype == object}).to_parquet(
        tmp_parquet, index=False)
    os.replace(tmp_csv, csv_path)
    os.replace(tmp_parquet, parquet)


def append_row(csv_path: Path, row: dict, unique: bool = True) -> bool:
    """Append one run's row unless (with `unique`) a row with its config_hash is already there;
    returns whether it was added. The file lock makes concurrent appends from several processes safe;
    the table is rewritten whole (new columns may appear) but atomically, and earlier rows are
    carried over unchanged."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(csv_path) + ".lock"):
        existing = read_rows(csv_path)
        if unique and str(row.get("config_hash")) in finished_hashes(existing):
            return False
        new = pd.DataFrame([row])
        table = new if existing.empty else pd.concat([existing, new], ignore_index=True)
        try:
            _write_atomic(table, csv_path)
        except OSError as err:  # a full disk, most often: the table on disk is as it was
            for tmp in (csv_path.with_suffix(".csv.tmp"), csv_path.with_suffix(".parquet.tmp")):
                tmp.unlink(missing_ok=True)
            raise OSError(err.errno, f"{csv_path}: the row of {row.get('model')}/"
                          f"{row.get('variant')} seed {row.get('seed')} could not be written "
                          f"({err.strerror or err}); the table holds its earlier rows, "
                          "unchanged: free the space and run bench run again") from err
        return True


def read_rows(csv_path: Path) -> pd.DataFrame:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return pd.DataFrame()
    try:
        text = csv_path.read_text()
    except UnicodeDecodeError as err:
        raise UserError(f"{csv_path}: not a results table (not text: {err.reason} at byte "
                        f"{err.start}); give the runs.csv bench run wrote") from None
    records = list(csv.reader(io.StringIO(text)))
    if records:
        width = len(records[0])
        cut = [i for i, record in enumerate(records[1:], 2) if record and len(record) != width]
        if cut:  # a row cut short (an edit by hand, a copy broken off): named, and left out
            warnings.warn(f"{csv_path}: row(s) {', '.join(map(str, cut))} have not the header's "
                          f"{width} fields (cut short or edited by hand); read without them",
                          stacklevel=2)
            kept = io.StringIO()
            csv.writer(kept).writerows(r for i, r in enumerate(records, 1) if i not in cut)
            text = kept.getvalue()
    try:
        return pd.read_csv(io.StringIO(text), dtype={column: str for column in TEXT_COLUMNS})
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, csv.Error) as err:
        raise UserError(f"{csv_path}: not a readable results table ({err})") from err


# A run is done when it trained to the end (ok) or diverged; one whose evaluation failed keeps
# its trained checkpoint and is evaluated again by the next `bench run`.
FINISHED = ("ok", "diverged")


def finished_hashes(rows: pd.DataFrame) -> set[str]:
    if "config_hash" not in rows:
        return set()
    if "status" in rows:
        rows = rows[rows["status"].isin(FINISHED)]
    return set(rows["config_hash"].astype(str))


def done_hashes(csv_path: Path) -> set[str]:
    return finished_hashes(read_rows(csv_path))


def eval_failed_rows(csv_path: Path) -> dict[str, dict]:
    """The latest row of each run whose evaluation failed and that has not finished since."""
    rows = latest_runs(read_rows(csv_path))
    if rows.empty or "status" not in rows:
        return {}
    failed = rows[rows["status"] == "eval_failed"]
    return {str(r["config_hash"]): r.to_dict() for _, r in failed.iterrows()}


def latest_runs(rows: pd.DataFrame, per_commit: bool = False) -> pd.DataFrame:
    """One row per run: a rerun (`--force`) appends a row with the same config hash and seed, and
    the latest (last in the file) supersedes the earlier ones, which stay in the file for the
    record. With `per_commit`, one row per run and commit: the same run at another commit is
    another point of its history, not a rerun."""
    keys = [k for k in ("config_hash", "seed") + (("git_commit",) if per_commit else ())
            if k in rows.columns]
    if rows.empty or "config_hash" not in keys:
        return rows
    return rows.drop_duplicates(subset=keys, keep="last")


def metric_columns(rows: pd.DataFrame) -> list[str]:
    return [m for m in DIRECTIONS if m in rows.columns and rows[m].notna().any()]


def seed_table(rows: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """Mean and std over seeds: one row per model/variant, columns (dataset, metric, mean|std|n).
    Diverged runs are left out of the statistics, and a rerun counts once (`latest_runs`)."""
    if rows.empty:
        return pd.DataFrame()
    rows = latest_runs(rows)
    if "status" in rows:
        rows = rows[rows["status"] == "ok"]
    metrics = [m for m in (metrics or HEADLINE) if m in metric_columns(rows)]
    grouped = rows.groupby(["model", "variant", "dataset"], sort=False)[metrics]  # suite order
    stats = grouped.agg(["mean", "std", "count"])
    stats = stats.unstack("dataset")  # columns: metric, stat, dataset
    stats.columns = stats.columns.reorder_levels([2, 0, 1])
    return stats.sort_index(axis=1, level=0, sort_remaining=False)


def _cell(mean: float, std: float, count: int) -> str:
    if pd.isna(mean):
        return ""
    digits = 4 if abs(mean) < 1 else (2 if abs(mean) < 1000 else 0)
    text = f"{mean:.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if count > 1 and not pd.isna(std) else text


def run_label(model: str, variant: str, entry: str | None = None) -> str:
    """'sae / topk-conv', or for a sweep's point 'sae / topk: k8' (its entry, then the point)."""
    if entry and variant.startswith(f"{entry}-"):
        return f"{model} / {entry}: {variant[len(entry) + 1:]}"
    return f"{model} / {variant}"


def format_table(rows: pd.DataFrame, fmt: str = "md", metrics: list[str] | None = None) -> str:
    """The pivot as Markdown, LaTeX or CSV: `mean ± std` over seeds (`mean` alone for one seed)."""
    stats = seed_table(rows, metrics)
    if stats.empty:
        return "(no finished runs)"
    entries = {}  # a sweep point's entry, so its rows read as points under it
    if "entry" in rows:
        points = rows.dropna(subset=["entry"])
        entries = dict(zip(zip(points["model"], points["variant"]), points["entry"]))
    datasets = list(dict.fromkeys(stats.columns.get_level_values(0)))
    cells = {}
    for dataset in datasets:
        for metric in dict.fromkeys(stats[dataset].columns.get_level_values(0)):
            block = stats[dataset][metric]
            column = f"{metric} ({dataset})" if len(datasets) > 1 else metric
            cells[column] = [_cell(m, s, c) for m, s, c in zip(block["mean"], block["std"],
                                                                 block["count"])]
    out = pd.DataFrame(cells, index=[run_label(m, v, entries.get((m, v)))
                                     for m, v in stats.index])
    out.index.name = "model / variant"
    if fmt == "md":
        return out.to_markdown()
    if fmt == "latex":
        return latex_table(rows, metrics)
    if fmt == "csv":
        return out.to_csv()
    raise UserError(f"unknown format {fmt!r}; choose one of: md, latex, csv")


def made_on(rows: pd.DataFrame) -> str:
    """The caption line of a table: the hardware and library versions its rows were made with
    (one line each, when they differ: those figures are not comparable one to one) and whether
    the data files were checked."""
    environments = describe_environment(rows).splitlines()
    text = ("Made on: " + environments[0] if len(environments) == 1 else
            "Made on different machines or versions (figures drift between them as between "
            "seeds):\n" + "\n".join(f"- {line}" for line in environments))
    if "data_files" in rows and rows["data_files"].notna().any():
        checks = ", ".join(f"{d}: {status}" for (d, status), _ in
                           rows.groupby(["dataset", "data_files"], sort=False))
        text += f"\nData files: {checks}"
    return text


# -- LaTeX -----------------------------------------------------------------------------------------
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """Plain text for LaTeX: the ten characters it treats specially, escaped."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex_number(mean: float, std: float, count: int, bold: bool) -> str:
    cell = _cell(mean, std, count).replace(" ± ", r" \pm ").replace(",", "")
    if not cell:
        return "--"
    return f"$\\mathbf{{{cell}}}$" if bold else f"${cell}$"


def _provenance_caption(rows: pd.DataFrame) -> str:
    """What the figures were measured with, from the rows' provenance columns."""
    def shown(column) -> str | None:
        if column not in rows or rows[column].dropna().empty:
            return None
        found = sorted(set(rows[column].dropna().tolist()), key=str)
        return " or ".join(str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
                           for v in found)

    seeds = sorted(set(rows["seed"].dropna().astype(int))) if "seed" in rows else []
    if len(seeds) > 1:
        sentences = [f"Mean \\pm std over {len(seeds)} seeds ({', '.join(map(str, seeds))})"]
    else:
        sentences = [f"One run per entry (seed {', '.join(map(str, seeds)) or '?'})"]
    if shown("n_fake"):
        sentences.append(f"FID and the other sample metrics: {shown('n_fake')} generated vs "
                         f"{shown('n_real')} test images, features {shown('features')}")
    if shown("iw_k"):
        sentences.append(f"NLL: importance-weighted bound with K = {shown('iw_k')} on "
                         f"{shown('iw_images')} test images")
    if any(c in rows for c in ENVIRONMENT_COLUMNS):
        sentences.append("Made on " + "; or ".join(describe_environment(rows).splitlines()))
    return latex_escape(". ".join(sentences) + ".").replace(r"\textbackslash{}pm", r"$\pm$")


def _dataset_title(name: str) -> str:
    """The dataset's own title (Fashion-MNIST), or its name if it is not one we know."""
    from datamodules.specs import DATASETS

    return DATASETS[name].title if name in DATASETS else name


def latex_table(rows: pd.DataFrame, metrics: list[str] | None = None,
                label: str = "tab:genbench") -> str:
    """A table a paper can paste (needs \\usepackage{booktabs}): one block of rows per dataset,
    readable headers with units and direction marks, `mean $\\pm$ std` over seeds, the best
    figure of each column within a dataset in bold, and a caption with the provenance."""
    stats = seed_table(rows, metrics)
    if stats.empty:
        return "% (no finished runs)"
    datasets = list(dict.fromkeys(stats.columns.get_level_values(0)))
    shown = [m for m in (metrics or HEADLINE)
             if any(m in stats[d].columns.get_level_values(0) for d in datasets)]
    arrow = {+1: r" $\uparrow$", -1: r" $\downarrow$"}
    header = " & ".join(["Model", "Variant"] + [
        METRICS[m].latex + arrow[DIRECTIONS[m]]  # declared as LaTeX (bench/metrics.py)
        for m in shown])
    lines = [r"\begin{table}[t]", r"\centering", f"\\caption{{{_provenance_caption(rows)}}}",
             f"\\label{{{label}}}", r"\begin{tabular}{ll" + "r" * len(shown) + "}",
             r"\toprule", header + r" \\"]
    for dataset in datasets:
        block = stats[dataset]
        lines += [r"\midrule",
                  f"\\multicolumn{{{2 + len(shown)}}}{{l}}{{\\textit{{"
                  f"{latex_escape(_dataset_title(dataset))}}}}} \\\\"]
        present = block.dropna(how="all").index
        best = {}
        for metric in shown:
            if metric in block.columns.get_level_values(0):
                means = block[metric]["mean"].loc[present].dropna()
                if len(means) > 1:
                    best[metric] = means.max() if DIRECTIONS[metric] > 0 else means.min()
        for model, variant in present:
            cells = [latex_escape(model.upper()), latex_escape(variant)]
            for metric in shown:
                if metric not in block.columns.get_level_values(0):
                    cells.append("--")
                    continue
                mean, std, count = (block[metric][k].loc[(model, variant)]
                                    for k in ("mean", "std", "count"))
                cells.append(_latex_number(mean, std, count,
                                           not pd.isna(mean) and mean == best.get(metric)))
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)
