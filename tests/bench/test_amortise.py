"""How `auto` picks the optimiser steps per Trainer step (bench/amortise.py)."""

from types import SimpleNamespace

import pytest
import torch

from bench.amortise import (MIN_CALLS, TARGET_SHARE, AutoStepsPerCall, choose_steps_per_call,
                            model_step_us, worth_timing_the_model)
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


def test_a_model_is_timed_only_where_the_assumed_cost_would_give_k_above_four():
    assert worth_timing_the_model(2_000.0)  # an MLP step on a CPU: K 50 at 1 ms a Trainer step
    assert not worth_timing_the_model(30_000.0)  # a conv step on a CPU: K 4


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


class FakeData:
    """What AutoStepsPerCall reads of a datamodule."""

    def __init__(self, n_images: int, batch_size: int) -> None:
        self.steps_per_call = "auto"
        self.hparams = SimpleNamespace(batch_size=batch_size)
        self.train_images = torch.zeros(n_images, 1, 2, 2, dtype=torch.uint8)


def fake_trainer(data, world_size: int = 1, broadcast=lambda value: value):
    return SimpleNamespace(datamodule=data, world_size=world_size,
                           strategy=SimpleNamespace(broadcast=broadcast))


@pytest.mark.parametrize("n_images, world_size, per_rank_epoch", [(8000, 1, 800), (480, 2, 24)])
def test_a_fresh_run_takes_the_k_of_its_costs_and_of_each_ranks_epoch(n_images, world_size,
                                                                       per_rank_epoch):
    data = FakeData(n_images, batch_size=10)
    auto = AutoStepsPerCall(call_us=300.0)
    auto.step_us = 1000.0  # given: nothing is timed
    auto.on_fit_start(fake_trainer(data, world_size), pl_module=None)
    expected = choose_steps_per_call(300.0, 1000.0, per_rank_epoch)
    assert data.steps_per_call == expected == auto.state_dict()["steps_per_call"]


def test_every_rank_takes_rank_zeros_k():
    data = FakeData(8000, batch_size=10)
    auto = AutoStepsPerCall(call_us=300.0)
    auto.step_us = 1000.0
    auto.on_fit_start(fake_trainer(data, broadcast=lambda value: 5), pl_module=None)
    assert data.steps_per_call == 5
