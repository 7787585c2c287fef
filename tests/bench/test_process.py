"""Process-wide settings of bench's commands (bench/process.py)."""

import logging
import warnings

import pytest

from bench.process import one_line_warnings, only_lines_of, show_lines


def test_a_warning_prints_as_one_line_without_its_source_line(monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after
    one_line_warnings()
    source = __file__
    text = warnings.formatwarning("the sky is low", UserWarning, source, 8)  # a line of this file
    assert text == f"{source}:8: UserWarning: the sky is low\n"


@pytest.mark.parametrize("rank, shown", [(0, "a line\n"), (1, "")])
def test_the_harness_lines_go_to_standard_output_from_rank_zero_only(rank, shown, capsys,
                                                                     monkeypatch):
    from lightning_utilities.core.rank_zero import rank_zero_only

    show_lines()
    show_lines()  # asked twice, shown once
    monkeypatch.setattr(rank_zero_only, "rank", rank, raising=False)
    logging.getLogger("bench.launch").info("a line")
    assert capsys.readouterr().out == shown


def test_inside_only_lines_of_the_other_modules_lines_are_not_shown(capsys):
    show_lines()
    with only_lines_of("bench.trial"):
        logging.getLogger("bench.runner").info("the runner's")
        logging.getLogger("bench.trial").info("the trial's")
    logging.getLogger("bench.runner").info("the runner's again")
    assert capsys.readouterr().out == "the trial's\nthe runner's again\n"
