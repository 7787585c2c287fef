"""Faults a long suite meets: a killed process, and malformed suite files."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.results import read_rows
from bench.runner import run_suite
from bench.suite import SuiteError, load_suite
from tests.data_files import write_mnist_suite


def test_a_killed_suite_loses_no_row_and_resumes_from_its_checkpoint(tmp_path):
    suite_path = write_mnist_suite(
        tmp_path, [{"model": "ae", "variant": "short", "budget": {"epochs": 1}},
                   {"model": "ae", "variant": "long", "budget": {"epochs": 120}}],
        params={"hidden": 16, "latent_dim": 4})
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENBENCH_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", "--suite", str(suite_path), "--out", str(out),
         "--wandb", "disabled", "--no-progress", "--checkpoint-every", "20"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    long_hash = load_suite(str(suite_path)).specs[1].config_hash
    checkpoint = out / "checkpoints" / long_hash / "last.ckpt"
    deadline = time.monotonic() + 120
    try:
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # let it train past the first checkpoint
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert checkpoint.exists(), "the long run never wrote a checkpoint"
    before = read_rows(out / "runs.csv")
    assert before["variant"].tolist() == ["short"]  # killed inside the second run

    messages = []
    run_suite(load_suite(str(suite_path)), out, wandb_mode="disabled", progress=False,
              log=messages.append)
    rows = read_rows(out / "runs.csv")
    assert rows["variant"].tolist() == ["short", "long"] and rows["config_hash"].is_unique
    # the finished row is unchanged (the resumed row may add a column, resumed_step)
    pd.testing.assert_frame_equal(rows.iloc[:1][before.columns], before, check_dtype=False)
    assert any("resuming from" in m for m in messages)
    resumed = rows.set_index("variant").loc["long"]
    assert resumed["status"] == "ok" and resumed["resumed_step"] >= 20
    final = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert final["epoch"] == 119  # the whole budget was trained, not restarted or cut short


def loads_or_fails_cleanly(path, text: str) -> None:
    """A suite file either loads or raises SuiteError naming the file; nothing else escapes."""
    path.write_text(text)
    try:
        load_suite(str(path))
    except SuiteError as err:
        assert str(err).startswith(str(path))


KEYS = ["name", "runs", "defaults", "model", "variant", "params", "datasets", "seeds", "budget",
        "epochs", "steps", "data", "eval", "trainer", "backbone", "sparsity", "n_fake", "junk"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["ae", "sae", "vae", "gan", "mnist",
                                                           "cifar10", "mlp", "conv", "topk"]))
DOCUMENTS = st.recursive(
    SCALARS, lambda children: st.one_of(st.lists(children, max_size=4),
                                        st.dictionaries(st.sampled_from(KEYS), children,
                                                        max_size=5)), max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=DOCUMENTS)
def test_malformed_suites_only_ever_give_clean_errors(tmp_path, document):
    loads_or_fails_cleanly(tmp_path / "fuzz.yaml", yaml.safe_dump(document))


VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.sampled_from(KEYS), SCALARS, max_size=3))
RUNS = st.fixed_dictionaries({"model": st.one_of(st.sampled_from(["ae", "sae", "vae", "gan"]),
                                                 SCALARS)},
                             optional={key: VALUES for key in ["variant", "params", "datasets",
                                                              "seeds", "budget", "data", "eval",
                                                              "trainer"]})
NEAR_VALID = st.fixed_dictionaries({"name": SCALARS, "runs": st.lists(RUNS, min_size=1,
                                                                      max_size=3)},
                                   optional={"defaults": VALUES, "wandb": VALUES})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=NEAR_VALID)
def test_suites_with_wrong_values_only_ever_give_clean_errors(tmp_path, document):
    loads_or_fails_cleanly(tmp_path / "near.yaml", yaml.safe_dump(document))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_arbitrary_text_gives_a_clean_error(tmp_path, text):
    loads_or_fails_cleanly(tmp_path / "text.yaml", text)
