"""Behaviour every family shares, parametrised over families, backbones and image shapes."""

import lightning as L
import pytest
import torch

from bench.errors import UserError
from modules import MODELS, get_model_class
from modules.steps import FitsLatentDensity
from tests.modules.conftest import (BACKBONES, FAMILIES, SHAPES, LossHistory, prototype_batches,
                                    prototype_images, quiet_trainer, tiny_model)

ENCODING = [name for name, cls in MODELS.items() if cls.family.reconstructs]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("family", ENCODING)
def test_encode_decode_reconstruct_shapes(family, backbone, shape):
    model = tiny_model(family, backbone, shape).eval()
    x = prototype_images(5, shape).float() / 255
    codes = model.encode(x)
    assert codes.shape == (5, 8)
    x_hat = model.reconstruct(x)
    assert x_hat.shape == (5, *shape) and model.decode(codes).shape == (5, *shape)
    assert 0 <= x_hat.min() and x_hat.max() <= 1
    assert model.image_shape == shape


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("family", FAMILIES)
def test_samples_have_image_shape_and_range(family, backbone, shape):
    model = tiny_model(family, backbone, shape).eval()
    if isinstance(model, FitsLatentDensity):  # a density fitted to its codes after training
        model.fit_latent_density([prototype_images(64, shape).float() / 255])
    samples = model.sample(6)
    assert samples.shape == (6, *shape)
    assert 0 <= samples.min() and samples.max() <= 1


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, family, backbone):
    model = tiny_model(family, backbone)
    trainer = quiet_trainer(max_steps=3)
    batches = prototype_batches(n=256, batch_size=32)
    trainer.fit(model, train_dataloaders=batches)
    if isinstance(model, FitsLatentDensity):  # no datamodule here: on_train_end fits nothing
        model.fit_latent_density(batches)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = type(model).load_from_checkpoint(tmp_path / "model.ckpt").eval()
    model.eval()
    z = torch.randn(4, 8)
    assert torch.equal(model.decode(z), loaded.decode(z))
    if family != "gan":
        x = prototype_images(4).float() / 255
        assert torch.equal(model.reconstruct(x), loaded.reconstruct(x))
    torch.manual_seed(1)
    first = model.sample(4)
    torch.manual_seed(1)
    assert torch.equal(first, loaded.sample(4))


def train_history(family, backbone, steps=200, seed=0):
    L.seed_everything(seed, verbose=False)
    model = tiny_model(family, backbone)
    history = LossHistory()
    quiet_trainer(max_steps=steps, callbacks=[history]).fit(
        model, train_dataloaders=prototype_batches(n=1024, batch_size=32))
    return history.values


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_the_loss(family, backbone):
    """For the GAN, the discriminator's loss: it starts near log 4 and falls as D learns."""
    history = train_history(family, backbone, steps=200)
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert last < 0.8 * first, f"loss {first:.4f} -> {last:.4f}"


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_the_same_loss_curve(family):
    assert train_history(family, "conv", steps=20) == train_history(family, "conv", steps=20)


@pytest.mark.parametrize("name, cls", [("ae", "Autoencoder"), ("SAE", "SparseAutoencoder"),
                                       ("VAE", "VAE"), ("gan", "GAN"),
                                       ("Autoencoder", "Autoencoder")])
def test_model_names_resolve_to_classes(name, cls):
    assert get_model_class(name).__name__ == cls


def test_unknown_model_lists_the_choices():
    with pytest.raises(UserError, match=r"choose one of: ae \(Autoencoder\), sae .*gan \(GAN\)"):
        get_model_class("diffusion")


@pytest.mark.parametrize("family", FAMILIES)
def test_hyperparameters_are_saved(family):
    model = tiny_model(family, "conv")
    assert model.hparams.width == 4 and model.hparams.backbone == "conv"
