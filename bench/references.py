"""Literature figures beside our own (`bench table RUNS --references`).

A reference (bench/references.yaml) holds for one model / variant / dataset / metric and one
setting: the provenance columns it was measured with (features, sample counts, K). It shows
beside our figure only when every run behind that figure has the same setting; otherwise the
reference column stays blank and says which column differs, because a figure measured another
way is not comparable (see bench.compare).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from bench.errors import UserError
from bench.compare import same_value
from bench.metrics import DIRECTIONS
from bench.results import latest_runs

REFERENCES_FILE = Path(__file__).parent / "references.yaml"
KEYS = {"model", "variant", "dataset", "metric", "value", "source", "setting", "shortened"}


class ReferenceError(UserError):
    """A references file that cannot be read: the message names the file and the entry."""


@dataclass
class Reference:
    model: str
    variant: str
    dataset: str
    metric: str
    value: float
    source: str
    setting: dict = field(default_factory=dict)
    shortened: str | None = None  # how our entry falls short of the cited setup, if it does


def load_references(path: str | Path = REFERENCES_FILE) -> list[Reference]:
    path = Path(path)
    try:
        entries = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ReferenceError(f"{path}: cannot read references ({err})") from err
    if not isinstance(entries, list):
        raise ReferenceError(f"{path}: expected a list of references")
    references = []
    for i, entry in enumerate(entries):
        where = f"{path}, entry {i + 1}"
        if not isinstance(entry, dict):
            raise ReferenceError(f"{where}: expected a mapping")
        missing = {"model", "variant", "dataset", "metric", "value", "source"} - set(entry)
        unknown = set(entry) - KEYS
        if missing or unknown:
            raise ReferenceError(f"{where}: missing {sorted(missing)}, unknown {sorted(unknown)}; "
                                 f"keys: {', '.join(sorted(KEYS))}")
        if entry["metric"] not in DIRECTIONS:
            raise ReferenceError(f"{where}: unknown metric {entry['metric']!r}; choose one of: "
                                 f"{', '.join(DIRECTIONS)}")
        references.append(Reference(**entry))
    return references


def _text(value) -> str:
    """A provenance value as a person writes it: 1000, not 1000.0 (pandas reads counts as
    floats); a missing one as 'none'."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "none"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def setting_differences(runs: pd.DataFrame, setting: dict) -> list[str]:
    """The setting's columns on which some run differs from it, as 'column: ours vs cited'."""
    differences = []
    for column, cited in setting.items():
        ours = runs[column].tolist() if column in runs else [None]
        if not all(same_value(value, cited) for value in ours):
            shown = ", ".join(sorted({_text(v) for v in ours}))
            differences.append(f"{column}: {shown} vs {cited}")
    return differences


def reference_table(rows: pd.DataFrame, references: list[Reference]) -> pd.DataFrame:
    """One line per reference whose model / variant / dataset has finished runs: our mean over
    seeds, the cited figure and the gap (ours - cited) where the setting matches, else blank
    with what differs."""
    rows = latest_runs(rows)
    if "status" in rows:
        rows = rows[rows["status"] == "ok"]
    lines = []
    for ref in references:
        runs = rows[(rows["model"] == ref.model) & (rows["variant"] == ref.variant)
                    & (rows["dataset"] == ref.dataset)]
        if runs.empty or ref.metric not in runs or runs[ref.metric].isna().all():
            continue
        values = runs[ref.metric].astype(float)
        differences = setting_differences(runs, ref.setting)
        matches = not differences
        lines.append({
            "model / variant": f"{ref.model} / {ref.variant}", "dataset": ref.dataset,
            "metric": ref.metric, "ours": values.mean(), "seeds": int(values.count()),
            "reference": ref.value if matches else None,
            "gap": values.mean() - ref.value if matches else None,
            "setup": ("setting differs: " + "; ".join(differences) if not matches
                      else "shortened: " + ref.shortened if ref.shortened else "as cited"),
            "source": ref.source})
    return pd.DataFrame(lines)
