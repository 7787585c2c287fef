"""Process-wide settings of bench's commands (bench/process.py)."""

import warnings

from bench.process import one_line_warnings


def test_a_warning_prints_as_one_line_without_its_source_line(monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after
    one_line_warnings()
    source = __file__
    text = warnings.formatwarning("the sky is low", UserWarning, source, 8)  # a line of this file
    assert text == f"{source}:8: UserWarning: the sky is low\n"
