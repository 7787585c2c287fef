"""The harness's callbacks and process settings (bench/callbacks.py, bench/runner.py)."""

import ctypes
import os
from pathlib import Path

import pytest
import torch

from bench.callbacks import DivergenceGuard, NetOptions, TrainThroughput, drop_failing_nvml_check
from bench.runner import harness_callbacks
from modules import Autoencoder

NVML = "PYTORCH_NVML_BASED_CUDA_CHECK"


def _fail_to_load(name, *args, **kwargs):
    raise OSError(f"{name}: cannot open shared object file")


def test_nvml_check_is_dropped_where_nvml_cannot_be_loaded(monkeypatch):
    monkeypatch.setenv(NVML, "1")
    monkeypatch.setattr(ctypes, "CDLL", _fail_to_load)
    assert drop_failing_nvml_check() is True
    assert NVML not in os.environ


def test_nvml_check_stays_where_nvml_loads(monkeypatch):
    monkeypatch.setenv(NVML, "1")
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *args, **kwargs: object())
    assert drop_failing_nvml_check() is False
    assert os.environ[NVML] == "1"


def test_nvml_setting_chosen_by_the_user_is_left_alone(monkeypatch):
    monkeypatch.setenv(NVML, "0")
    monkeypatch.setattr(ctypes, "CDLL", _fail_to_load)
    assert drop_failing_nvml_check() is False
    assert os.environ[NVML] == "0"


@pytest.mark.parametrize("options, expected", [({}, False), ({"channels_last": True}, True),
                                               ({"compile": True}, True)])
def test_net_options_join_the_callbacks_only_when_one_is_on(options, expected, tmp_path):
    net_options = NetOptions(**options)
    callbacks = harness_callbacks(TrainThroughput(), DivergenceGuard(), Path(tmp_path), 100,
                                  progress=False, net_options=net_options)
    assert (net_options in callbacks) is expected


def test_channels_last_converts_the_conv_weights():
    model = Autoencoder(backbone="conv", image_shape=(1, 28, 28))
    NetOptions(channels_last=True).setup(None, model, "fit")
    # With one input channel both layouts are the same, so look at the others.
    conv_weights = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last)
                                and not p.is_contiguous() for p in conv_weights)


def test_compile_wraps_each_net_and_keeps_the_state_dict_keys():
    model = Autoencoder(backbone="mlp", image_shape=(1, 28, 28))
    keys = list(model.state_dict())
    NetOptions(compile=True).setup(None, model, "fit")  # torch.compile is lazy: nothing runs yet
    assert model.encoder._compiled_call_impl is not None
    assert model.decoder._compiled_call_impl is not None
    assert list(model.state_dict()) == keys
