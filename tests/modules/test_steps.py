"""The base LightningModule of the families (modules/steps.py)."""

import pytest
import torch
from torch import nn

from modules import MODELS


@pytest.fixture(params=sorted(MODELS))
def model(request):
    return MODELS[request.param](backbone="mlp", image_shape=(1, 28, 28))


def test_hook_names_are_stored_as_plain_attributes(model):
    model._current_fx_name = "training_step"
    assert model._current_fx_name == "training_step"
    assert model.__dict__["_current_fx_name"] == "training_step"


def test_modules_and_parameters_still_register(model):
    model.extra_net = nn.Linear(2, 2)
    model.extra_weight = nn.Parameter(torch.zeros(3))
    state = model.state_dict()
    assert "extra_net.weight" in state and "extra_weight" in state
