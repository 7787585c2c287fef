"""K optimiser steps per Trainer step (modules/steps.py): the same batches, in the same order, to
the same weights as one batch per Trainer step."""

import pytest
import torch

from bench.runner import optimizer_steps
from datamodules import ImageDataModule
from tests.data_files import write_mnist_dir
from tests.modules.conftest import quiet_trainer, tiny_model

# Each family's variants whose step has its own schedule or randomness: the SAE's AuxK state,
# the VAE's noise on dynamically binarised images, the GAN's generator every n_critic batches.
VARIANTS = {
    "ae": ("ae", {}, {}),
    "ae-conv": ("ae", {"backbone": "conv"}, {}),  # BatchNorm's running statistics too
    "sae-topk-auxk": ("sae", {"sparsity": "topk", "k": 4, "aux_k": 8}, {}),
    "vae-binarised": ("vae", {}, {"binarize": True}),
    # Burda et al. 2016's shape and learning-rate schedule, stepped at each epoch's end
    "vae-burda": ("vae", {"depth": 2, "activation": "tanh", "lr_schedule": "burda"}, {}),
    "gan-ns": ("gan", {}, {}),
    "gan-wgan-gp": ("gan", {"loss": "wgan-gp", "n_critic": 4}, {}),
}


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mnist")
    write_mnist_dir(directory, n_train=112, n_test=10)  # 7 batches of 16 an epoch
    return directory


def train(mnist_dir, variant, steps_per_call, **budget):
    family, params, data = VARIANTS[variant]
    torch.manual_seed(0)
    model = tiny_model(family, **params)
    dm = ImageDataModule("mnist", data_dir=str(mnist_dir), batch_size=16, val_size=0, seed=3,
                         steps_per_call=steps_per_call, **data)
    if "batches" in budget:
        budget = {"max_steps": optimizer_steps(model, budget["batches"]), "max_epochs": -1}
    trainer = quiet_trainer(limit_val_batches=0, **budget)
    trainer.fit(model, datamodule=dm)
    return model, trainer


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("budget", [{"batches": 12}, {"max_epochs": 2}])
def test_k_steps_per_call_give_the_weights_of_one_batch_per_call(mnist_dir, variant, budget):
    """12 batches cross an epoch and end inside a chunk of 5; 2 epochs of 7 end with short
    chunks."""
    reference, _ = train(mnist_dir, variant, None, **budget)
    for k in (1, 5):
        model, trainer = train(mnist_dir, variant, k, **budget)
        assert model.batches_trained() == reference.batches_trained() == (
            budget.get("batches") or 14)
        for name, tensor in reference.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), (k, name)


@pytest.mark.parametrize("steps_per_call", [None, 5])
def test_the_generator_steps_after_every_n_critic_th_batch_of_the_run(mnist_dir, steps_per_call):
    """n_critic 4 over two epochs of 7 batches: generator steps after batches 4, 8 and 12 of the
    run (an epoch-relative count would give 4 and 11), so 14 + 3 optimiser steps."""
    model, trainer = train(mnist_dir, "gan-wgan-gp", steps_per_call, max_epochs=2)
    assert trainer.global_step == 17 and model.batches_trained() == 14


class Recorder:
    """A logger that keeps what the modules send it."""

    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step):
        self.calls.append((step, sorted(metrics)))


@pytest.mark.parametrize("steps_per_call", [None, 5])
def test_training_terms_reach_the_loggers_every_log_every_n_steps_batches(mnist_dir,
                                                                          steps_per_call):
    from lightning.pytorch.loggers import Logger

    recorder = Recorder()

    class Capture(Logger):
        name, version = "capture", 0

        def log_metrics(self, metrics, step=None):
            recorder.log_metrics(metrics, step)

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    torch.manual_seed(0)
    model = tiny_model("vae")
    dm = ImageDataModule("mnist", data_dir=str(mnist_dir), batch_size=16, val_size=0,
                         steps_per_call=steps_per_call)
    trainer = quiet_trainer(limit_val_batches=0, max_steps=12, max_epochs=-1,
                            logger=Capture(), log_every_n_steps=4)
    trainer.fit(model, datamodule=dm)
    training = [(step, names) for step, names in recorder.calls if names[0].startswith("train/")]
    assert [step for step, _ in training] == [3, 7, 11]  # batches 4, 8 and 12 (0-based index)
    assert training[0][1] == ["train/elbo", "train/kl", "train/loss", "train/recon"]


@pytest.mark.parametrize("setting", [{"accumulate_grad_batches": 2}, {"gradient_clip_val": 1.0},
                                     {"limit_train_batches": 3}])
def test_k_steps_per_call_refuse_what_only_automatic_optimisation_does(mnist_dir, setting):
    name = next(iter(setting))
    with pytest.raises(ValueError, match=rf"cannot honour {name}=.*set steps_per_call to null"):
        quiet_trainer(max_steps=2, **setting).fit(tiny_model("ae"), datamodule=ImageDataModule(
            "mnist", data_dir=str(mnist_dir), batch_size=16, val_size=0, steps_per_call=2))


@pytest.mark.parametrize("family", ["ae", "gan"])
def test_hook_names_are_stored_as_plain_attributes(family):
    model = tiny_model(family)
    model._current_fx_name = "training_step"
    assert model.__dict__["_current_fx_name"] == "training_step"


@pytest.mark.parametrize("family", ["ae", "gan"])
def test_modules_and_parameters_still_register(family):
    model = tiny_model(family)
    model.extra_net = torch.nn.Linear(2, 2)
    model.extra_weight = torch.nn.Parameter(torch.zeros(3))
    state = model.state_dict()
    assert "extra_net.weight" in state and "extra_weight" in state
