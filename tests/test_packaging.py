"""Installed the way users install it: a wheel built from the repository carries every data
file the packages read, and its `bench` answers from the wheel's files, not the checkout's."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "modules", "datamodules")

pytestmark = pytest.mark.slow  # builds a wheel and starts a process


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # from a copy of the files git knows (tracked, or new and not ignored): a build/ folder
    # left in the checkout by an earlier build would otherwise lend the wheel its files
    source = tmp_path_factory.mktemp("source")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    # no build isolation: setuptools comes from the environment, not the network
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                    "--no-build-isolation", "--quiet", "-w", str(out)], check=True,
                   cwd=out, capture_output=True)
    return next(out.glob("genbench-*.whl"))


def package_data_files() -> list[str]:
    """Every file in the packages that is not Python source or a maintainer's note."""
    return sorted(str(p.relative_to(REPO)) for package in PACKAGES
                  for p in (REPO / package).rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc", ".md"))


def test_the_wheel_carries_every_data_file_of_the_packages(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    files = package_data_files()
    assert "bench/references.yaml" in files and "bench/suites/smoke.yaml" in files
    assert [f for f in files if f not in names] == []


def test_bench_runs_from_the_wheel_alone(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    table = tmp_path / "runs.csv"
    table.write_bytes((REPO / "results" / "baselines" / "smoke.csv").read_bytes())
    script = ("import bench, sys; from bench.cli import main; print(bench.__file__); "
              "assert main(['list']) == 0; "
              f"assert main(['table', {str(table)!r}, '--references']) == 0")
    # the wheel's packages first on the path; run outside the checkout
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0].startswith(str(site))
    assert "sparsity" in done.stdout and "literature" in done.stdout
