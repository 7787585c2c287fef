"""How `auto` picks the optimiser steps per Trainer step (bench/amortise.py)."""

import pytest
import torch

from bench.amortise import (MIN_CALLS, TARGET_SHARE, AutoStepsPerCall, choose_steps_per_call,
                            model_step_us)
from tests.modules.conftest import prototype_images, tiny_model


@pytest.mark.parametrize("call_us, step_us", [(250, 1500), (300, 120), (250, 40_000)])
def test_auto_takes_the_smallest_k_that_keeps_the_call_cost_under_its_share(call_us, step_us):
    k = choose_steps_per_call(call_us, step_us, batches_per_epoch=10**6)

    def share(k):
        return call_us / (call_us + k * step_us)

    assert share(k) <= TARGET_SHARE and (k == 1 or share(k - 1) > TARGET_SHARE)


def test_auto_keeps_several_trainer_steps_per_epoch_and_budget():
    assert choose_steps_per_call(300, 10, batches_per_epoch=429) == 429 // MIN_CALLS
    assert choose_steps_per_call(300, 10, batches_per_epoch=429, budget_batches=40) == 5
    assert choose_steps_per_call(300, 10, batches_per_epoch=5) == 1
    assert choose_steps_per_call(300, float("nan"), batches_per_epoch=429) == 1


@pytest.mark.parametrize("family", ["ae", "gan"])
def test_timing_the_step_leaves_the_model_and_the_random_state_alone(family):
    model = tiny_model(family)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    step_us = model_step_us(model, prototype_images(64), batch_size=8, steps=2, warmup=1)
    assert step_us > 0 and torch.equal(torch.rand(3), expected)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_a_resumed_run_keeps_the_k_it_started_with():
    class Data:
        steps_per_call = "auto"

    class Trainer:
        datamodule = Data()

    chosen = AutoStepsPerCall(call_us=250.0)
    chosen.load_state_dict({"steps_per_call": 7})
    chosen.on_fit_start(Trainer(), pl_module=None)  # no timing: pl_module is never touched
    assert Trainer.datamodule.steps_per_call == 7 and chosen.state_dict() == {"steps_per_call": 7}
