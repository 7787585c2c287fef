"""Result rows: one file per recorded row, the collected runs.csv / runs.parquet, the latest row of
each run, and the seed-pivot table. Regression verdicts live in bench.compare.

A results folder keeps each row in a file of its own under `rows/`, written beside and renamed
(a kill leaves it whole or absent), so any number of processes on any number of hosts record
rows at once without a lock: no lock that a shared filesystem may not honour, no table rewritten
whole per row. The file name orders the rows (nanoseconds since the epoch first, as "last in the
file" ordered them) and carries the run's config hash and status, so that whether a run is done
is read from the names alone. `runs.csv` and `runs.parquet` are the collected view for people
and pandas, rebuilt whenever genbench reads the folder; genbench itself reads the row files. A
folder from before `rows/` reads as its runs.csv, and its rows are moved into files at its
first new row."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path

import pandas as pd

from bench.errors import UserError
from bench.machine import ENVIRONMENT_COLUMNS
from bench.machine import describe as describe_environment
from bench.metrics import DIRECTIONS, HEADLINE, METRICS

# Read as text whatever they look like: a hex hash such as "123e4567..." parses as a float (inf)
# and a variant or commit of digits as an integer, and then no longer matches.
TEXT_COLUMNS = ["suite", "model", "variant", "entry", "dataset", "config_hash", "status",
                "git_commit", "features", "device", "eval_split", "data_source", "data_files",
                "data_md5", *(c for c in ENVIRONMENT_COLUMNS if c != "torch_threads")]


ROWS_DIR = "rows"  # beside runs.csv: one file per row
_ROW_SUFFIX = ".json"


def holds_table(folder: Path) -> bool:
    """Whether a folder is one bench run wrote: row files, or a runs.csv from before them."""
    return (Path(folder) / ROWS_DIR).is_dir() or (Path(folder) / "runs.csv").is_file()


def rows_dir(csv_path: Path) -> Path:
    """Where the row files of the table `csv_path` (a results folder's runs.csv) live."""
    return Path(csv_path).parent / ROWS_DIR


def _has_row_files(csv_path: Path) -> bool:
    """Whether `csv_path` is the view of a folder's row files (another CSV is only itself)."""
    return Path(csv_path).name == "runs.csv" and rows_dir(csv_path).is_dir()


def _unique_tmp(path: Path) -> Path:
    """A temporary name beside `path` that no other process picks (a dot first: not a row)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _write_atomic(df: pd.DataFrame, csv_path: Path, text: str | None = None) -> None:
    """Write CSV (`text`, where the caller has it already) and parquet to temporary files, then
    rename: a crash, or another process writing the same view, leaves a whole table."""
    tmp_csv = _unique_tmp(csv_path)
    parquet = csv_path.with_suffix(".parquet")
    tmp_parquet = _unique_tmp(parquet)
    try:
        if text is None:
            df.to_csv(tmp_csv, index=False)
        else:
            tmp_csv.write_text(text)
        # parquet needs one type per column; object columns holding mixed values become strings
        df.astype({c: "string" for c in df.columns if df[c].dtype == object}).to_parquet(
            tmp_parquet, index=False)
        os.replace(tmp_csv, csv_path)
        os.replace(tmp_parquet, parquet)
    finally:
        tmp_csv.unlink(missing_ok=True)
        tmp_parquet.unlink(missing_ok=True)


def row_file_name(row: dict, order: int | None = None) -> str:
    """<order>-<config_hash>-<status>-<unique>.json, `order` nanoseconds since the epoch (a
    rerun's row sorts after the first), 20 digits so that names sort as numbers."""
    order = time.time_ns() if order is None else order
    unique = uuid.uuid4().hex[:12] if order >= 10**12 else "legacy"
    return (f"{order:020d}-{row.get('config_hash', 'none')}-{row.get('status', 'none')}-"
            f"{unique}{_ROW_SUFFIX}")


def _parse_name(name: str) -> tuple[str, str]:
    """(config_hash, status) from a row file's name."""
    _, config_hash, status, _ = name[: -len(_ROW_SUFFIX)].split("-")
    return config_hash, status


def _write_row_file(folder: Path, row: dict, order: int | None = None) -> Path:
    path = folder / row_file_name(row, order)
    tmp = _unique_tmp(path)
    try:
        # numpy scalars and the like as their text: every row is read back through CSV text
        # (`_records_csv`), which gives each column the type it has in a runs.csv
        tmp.write_text(json.dumps(row, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


_ROW_NAME = re.compile(r"\d{20}-[^-]+-[^-]+-[^-]+\.json")


def _row_files(folder: Path) -> list[str]:
    """The folder's row files' names, in the order of their rows (other files are not rows:
    a temporary one being written, a note someone left)."""
    return sorted(e.name for e in os.scandir(folder) if _ROW_NAME.fullmatch(e.name))


def _read_row_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable row ({err}); move it out of {path.parent.name}/ "
                        "(its run is then not recorded) or put the run's row back") from None


def _convert_legacy(csv_path: Path) -> None:
    """Move the rows of a runs.csv written before row files into files, in their order; the
    names are fixed by the row's position, so two processes converting at once write the same
    files, and the folder appears whole (renamed into place) or not at all."""
    rows = _read_csv(csv_path)
    staging = csv_path.parent / f".{ROWS_DIR}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for i, row in enumerate(rows.to_dict("records")):
            _write_row_file(staging, row, order=i)
        try:
            os.rename(staging, rows_dir(csv_path))
        except OSError:  # another process converted it first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def append_row(csv_path: Path, row: dict, unique: bool = True) -> bool:
    """Record one run's row in a file of its own beside `csv_path`, unless (with `unique`) its
    run (config_hash) has a finished row there already; returns whether it was recorded. No
    lock: each row is its own file. A folder from before row files is converted first."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    folder = rows_dir(csv_path)
    if not folder.is_dir():
        if csv_path.is_file():
            _convert_legacy(csv_path)
        folder.mkdir(exist_ok=True)
    if unique and str(row.get("config_hash")) in done_hashes(csv_path):
        return False
    try:
        _write_row_file(folder, row)
    except OSError as err:  # a full disk, most often: no partial row is left
        raise OSError(err.errno, f"{folder}: the row of {row.get('model')}/"
                      f"{row.get('variant')} seed {row.get('seed')} could not be written "
                      f"({err.strerror or err}); the rows recorded before are unchanged: "
                      "free the space and run bench run again") from err
    return True


def _records_csv(records: list[dict]) -> tuple[pd.DataFrame, str]:
    """Rows as a frame and as CSV text; the text is what bench parses, as it parses a runs.csv,
    so that a row read from its file has the types it has in the table."""
    table = pd.DataFrame.from_records(records)
    return table, (table.to_csv(index=False) if len(table.columns) else "")


def collect_rows(csv_path: Path) -> str:
    """The table of a folder's row files as CSV text, and the view (runs.csv, runs.parquet)
    written again when rows came since it was (a folder that cannot be written keeps its old
    view: genbench reads the rows, not the view)."""
    folder = rows_dir(csv_path)
    names = _row_files(folder)
    table, text = _records_csv([_read_row_file(folder / name) for name in names])
    stamp = folder / ".collected"
    seen = f"{len(names)} {names[-1] if names else ''}"
    try:
        if not csv_path.is_file() or not stamp.is_file() or stamp.read_text() != seen:
            _write_atomic(table, csv_path, text)
            tmp = _unique_tmp(stamp)
            tmp.write_text(seen)
            os.replace(tmp, stamp)
    except OSError:
        pass
    return text


def read_rows(csv_path: Path) -> pd.DataFrame:
    """A results table: the row files of its folder where it has them (see the module's
    docstring), else the CSV file itself."""
    csv_path = Path(csv_path)
    if _has_row_files(csv_path):
        return _parse_csv(collect_rows(csv_path), csv_path)
    return _read_csv(csv_path)


def _read_csv(csv_path: Path) -> pd.DataFrame:
    if not csv_path.is_file():
        return pd.DataFrame()
    try:
        text = csv_path.read_text()
    except UnicodeDecodeError as err:
        raise UserError(f"{csv_path}: not a results table (not text: {err.reason} at byte "
                        f"{err.start}); give the runs.csv bench run wrote") from None
    return _parse_csv(text, csv_path)


def _parse_csv(text: str, csv_path: Path) -> pd.DataFrame:
    records = list(csv.reader(io.StringIO(text)))
    if records:
        width = len(records[0])
        cut = [i for i, record in enumerate(records[1:], 2) if record and len(record) != width]
        if cut:  # a row cut short (an edit by hand, a copy broken off): named, and left out
            warnings.warn(f"{csv_path}: row(s) {', '.join(map(str, cut))} have not the header's "
                          f"{width} fields (cut short or edited by hand); read without them",
                          stacklevel=3)
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
    """The config hashes of the finished runs of a table: from its row files' names alone
    where it has them."""
    csv_path = Path(csv_path)
    if _has_row_files(csv_path):
        names = _row_files(rows_dir(csv_path))
        return {config_hash for config_hash, status in map(_parse_name, names)
                if status in FINISHED}
    return finished_hashes(read_rows(csv_path))


def eval_failed_rows(csv_path: Path) -> dict[str, dict]:
    """The latest row of each run whose evaluation failed and that has not finished since
    (where the table has row files, only those rows are read)."""
    csv_path = Path(csv_path)
    if _has_row_files(csv_path):
        latest = {}  # config hash -> its last row file, in row order
        for name in _row_files(rows_dir(csv_path)):
            latest[_parse_name(name)[0]] = name
        failed = {h: n for h, n in latest.items() if _parse_name(n)[1] == "eval_failed"}
        if not failed:
            return {}
        _, text = _records_csv([_read_row_file(rows_dir(csv_path) / n) for n in failed.values()])
        rows = _parse_csv(text, csv_path)
        return {str(r["config_hash"]): r.to_dict() for _, r in rows.iterrows()}
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
