import copy

import pytest
import torch

from bench.errors import UserError
from modules.autoencoder import reconstruction_loss
from tests.modules.conftest import prototype_images, tiny_model


def test_mse_loss_is_mean_squared_error_of_the_sigmoid_output():
    logits, x = torch.randn(3, 1, 28, 28), torch.rand(3, 1, 28, 28)
    expected = ((x - torch.sigmoid(logits)) ** 2).mean()
    assert torch.allclose(reconstruction_loss(logits, x, "mse"), expected)


def test_bce_loss_is_binary_cross_entropy_of_the_sigmoid_output():
    logits, x = torch.randn(3, 1, 28, 28), torch.rand(3, 1, 28, 28)
    p = torch.sigmoid(logits)
    expected = -(x * p.log() + (1 - x) * (1 - p).log()).mean()
    assert torch.allclose(reconstruction_loss(logits, x, "bce"), expected, atol=1e-5)


def test_unknown_loss_lists_the_choices():
    with pytest.raises(UserError, match="choose one of: mse, bce"):
        tiny_model("ae", loss="l1")


@pytest.mark.parametrize("family", ["ae", "sae"])
def test_sampling_before_fitting_the_mixture_says_what_to_do(family):
    with pytest.raises(RuntimeError, match="fit_latent_density"):
        tiny_model(family).sample(2)


def test_latent_mixture_reproduces_the_code_distribution():
    torch.manual_seed(0)
    model = tiny_model("ae", gmm_components=3).eval()
    images = prototype_images(2000).float() / 255
    model.fit_latent_density(images.split(250))
    codes = model.encode(images)
    drawn = model.latent_prior().sample((20000,))
    scale = codes.std(0).mean().item()
    assert torch.allclose(drawn.mean(0), codes.mean(0), atol=0.05 * scale)
    assert torch.allclose(drawn.std(0), codes.std(0), rtol=0.1)


def test_mixture_is_fitted_on_the_first_gmm_max_samples_codes_only():
    torch.manual_seed(0)
    images = torch.rand(128, 1, 28, 28)
    capped = tiny_model("ae", gmm_components=2, gmm_max_samples=100).eval()
    exact, everything = copy.deepcopy(capped), copy.deepcopy(capped)
    capped.fit_latent_density(iter([images[:64], images[64:], None]))  # stops after 128 read
    exact.fit_latent_density([images[:100]])
    everything.hparams.gmm_max_samples = 10**6
    everything.fit_latent_density([images])
    for key in ("gmm_logits", "gmm_means", "gmm_scale_tril"):
        assert torch.allclose(getattr(capped, key), getattr(exact, key), atol=1e-5), key
    assert not torch.allclose(capped.gmm_means, everything.gmm_means, atol=1e-5)


@pytest.mark.parametrize("family", ["ae", "sae"])
def test_training_ends_by_fitting_the_mixture_on_the_training_split_in_order(family, tmp_path):
    from datamodules import ImageDataModule
    from tests.data_files import write_mnist_dir
    from tests.modules.conftest import quiet_trainer

    write_mnist_dir(tmp_path, n_train=96, n_test=10)
    dm = ImageDataModule("mnist", data_dir=str(tmp_path), own_files=True, batch_size=16, val_size=0,
                         eval_batch_size=32)
    model = tiny_model(family, gmm_components=2, gmm_max_samples=40)
    quiet_trainer(max_steps=3, limit_val_batches=0).fit(model, datamodule=dm)
    by_hand = copy.deepcopy(model)
    by_hand.gmm_means.zero_()
    by_hand.fit_latent_density(dm.ordered_train_dataloader())
    for key in ("gmm_logits", "gmm_means", "gmm_scale_tril"):
        assert torch.equal(getattr(model, key), getattr(by_hand, key)), key
