import os

# Before torch is imported: one thread per process (see README, "Threads").
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_data_env(monkeypatch, tmp_path_factory):
    """No test sees the user's GENBENCH_DATA or data root: search order stays predictable."""
    monkeypatch.delenv("GENBENCH_DATA", raising=False)
    monkeypatch.setattr("datamodules.specs.DEFAULT_ROOT", tmp_path_factory.mktemp("data_root"))
