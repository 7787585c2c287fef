"""The README and docs/ as a reader meets them: every `bench` command they show parses as
written, the quick ones run, and every relative link leads to a file."""

import re
import shlex
from pathlib import Path

import pytest

from bench.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def bench_commands(page: Path) -> list[str]:
    """The `bench ...` lines of a page's code blocks, without comments and line continuations."""
    commands, in_code = [], False
    for line in page.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        text = line.split("#", 1)[0].strip()
        text = re.sub(r"^(\.venv/bin/|srun .*?\s+\.venv/bin/)", "", text)
        if in_code and text.startswith("bench "):
            commands.append(text)
    return commands


COMMANDS = [(page.name, command) for page in PAGES for command in bench_commands(page)]


def test_the_pages_show_commands_at_all():
    assert len(COMMANDS) > 20 and {page for page, _ in COMMANDS} >= {"README.md", "suites.md"}


@pytest.mark.parametrize("page, command", COMMANDS)
def test_every_command_shown_parses_as_written(page, command, capsys):
    args = shlex.split(command)[1:]
    if args[0] != "fit":
        build_parser().parse_args(args)  # argparse exits with status 2 on a bad option
        return
    # LightningCLI parses bench fit's options; --print_config checks them all and exits
    with pytest.raises(SystemExit) as stop:
        main(args if "--help" in args else args + ["--print_config"])
    assert stop.value.code in (0, None), capsys.readouterr().err[-1000:]


@pytest.mark.parametrize("command", ["bench list", "bench --help", "bench run --help"])
def test_the_quick_commands_run(command, capsys):
    try:
        status = main(shlex.split(command)[1:])
    except SystemExit as stop:  # --help
        status = stop.code
    assert status == 0 and capsys.readouterr().out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    local = [link for link in links if "://" not in link]
    missing = [link for link in local if not (page.parent / link).exists()]
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_page_points_outside_the_repository(page):
    assert "../shared" not in page.read_text()
