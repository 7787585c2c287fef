"""bench.metrics: each figure declared once, and the page that documents it."""

import dataclasses
import re
from pathlib import Path

import pytest

from bench.metrics import (BUILT_IN, DIRECTIONS, HEADLINE, METRICS, PER_RUN, PROVENANCE,
                           TIMING_METRICS, Metric, declare, withdraw)
from modules import MODELS

PAGE = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def documented() -> dict[str, str]:
    """docs/metrics.md's table of figures: each column named in a row's first cell, with the
    row's 'better' cell."""
    rows = {}
    for line in PAGE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[3] in ("higher", "lower"):
            for name in re.findall(r"`([a-z0-9_]+)`", cells[0]):
                rows[name] = cells[3]
    return rows


# the built-in metrics and those of the families in modules/ (not a test's toy family)
SHIPPED = [m.name for m in BUILT_IN] + [m.name for cls in MODELS.values()
                                        if cls.__module__.startswith("modules.")
                                        for m in cls.family.metrics]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_metric_is_on_the_metrics_page_with_its_direction(name):
    assert documented().get(name) == ("higher" if METRICS[name].higher_is_better else "lower")


def test_the_page_documents_no_metric_that_is_not_declared():
    assert set(documented()) <= set(SHIPPED)


def test_declaring_and_withdrawing_a_metric_updates_every_view():
    toy = Metric("toy_ms", False, "Toy (ms)", ("eval_split",), "ms", per_run=True, timing=True)
    declare(toy)
    try:
        assert DIRECTIONS["toy_ms"] == -1 and HEADLINE[-1] == PER_RUN[-1] == "toy_ms"
        assert "toy_ms" in TIMING_METRICS and PROVENANCE["toy_ms"] == ["eval_split"]
        declare(toy)  # the same declaration again: nothing changes
        assert HEADLINE.count("toy_ms") == 1
        with pytest.raises(ValueError, match="declared twice, differently"):
            declare(dataclasses.replace(toy, higher_is_better=True))
    finally:
        withdraw("toy_ms")
    assert "toy_ms" not in METRICS and "toy_ms" not in HEADLINE + PER_RUN
    assert "toy_ms" not in DIRECTIONS and "toy_ms" not in TIMING_METRICS


def test_the_views_are_read_from_the_declarations():
    assert DIRECTIONS["fid"] == -1 and DIRECTIONS["precision"] == +1
    assert "hoyer" not in HEADLINE and "peak_mem_mb" in TIMING_METRICS
    assert PER_RUN[0] == "recon_mse" and "kid_subset_size" in PROVENANCE["kid_mean"]
    assert "cpu_capability" in PROVENANCE["train_img_per_s"]
    assert all("data_md5" in PROVENANCE[m] for m in METRICS if m not in TIMING_METRICS)
