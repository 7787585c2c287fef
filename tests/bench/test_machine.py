"""bench.machine: what a row's figures were made on."""

import os
import warnings

import pandas as pd
import pytest
import torch

from bench.machine import ENVIRONMENT_COLUMNS, describe, hardware, onednn_isa
from bench.process import quiet_srun_hint


def test_a_cpu_row_names_the_cpu_its_instruction_sets_and_threads():
    facts = hardware()
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert facts["torch_threads"] == torch.get_num_threads()
    assert facts["onednn_isa"] == onednn_isa() and "unread" not in facts["onednn_isa"]
    assert facts["cpu"] and facts["gpu"] is facts["cuda"] is facts["cudnn"] is None
    assert set(facts) < set(ENVIRONMENT_COLUMNS)


def test_a_table_describes_each_environment_once():
    one = {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "onednn_isa": "Intel AVX2",
           "torch_threads": 1, "torch": "2.14.1"}
    rows = pd.DataFrame([one, one, {**one, "torch_threads": 2}])
    assert describe(rows).splitlines() == [
        "AMD EPYC, ATen AVX512, oneDNN Intel AVX2, 1 thread; torch 2.14.1",
        "AMD EPYC, ATen AVX512, oneDNN Intel AVX2, 2 threads; torch 2.14.1"]
    assert describe(pd.DataFrame([{"model": "ae"}])).startswith("hardware not recorded")


@pytest.fixture
def srun_on_path(tmp_path, monkeypatch):
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("in_a_job, hinted", [(False, False), (True, True)])
def test_lightnings_srun_hint_only_inside_a_slurm_job(srun_on_path, monkeypatch, in_a_job,
                                                     hinted):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if in_a_job:  # an sbatch script that started python without srun
        monkeypatch.setenv("SLURM_JOB_ID", "7")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_srun_hint()
        SLURMEnvironment.detect()
    assert any("srun" in str(w.message) for w in caught) == hinted
