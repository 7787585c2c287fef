import math

import pytest
import torch

from bench.errors import UserError
from modules.gan import (GAN, gradient_penalty, ns_discriminator_loss, ns_generator_loss,
                         wasserstein_critic_loss, wasserstein_generator_loss)
from tests.modules.conftest import prototype_batches, quiet_trainer, tiny_model

REAL, FAKE = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])


def softplus(v):
    return math.log1p(math.exp(v))


def test_ns_discriminator_loss_matches_hand_computation():
    # -log sigmoid(r) = softplus(-r); -log(1 - sigmoid(f)) = softplus(f)
    expected = (softplus(-2) + softplus(1)) / 2 + (softplus(0.5) + softplus(-3)) / 2
    assert ns_discriminator_loss(REAL, FAKE).item() == pytest.approx(expected, rel=1e-6)


def test_ns_generator_loss_matches_hand_computation():
    expected = (-math.log(1 / (1 + math.exp(-0.5))) - math.log(1 / (1 + math.exp(3)))) / 2
    assert ns_generator_loss(FAKE).item() == pytest.approx(expected, rel=1e-6)


def test_wasserstein_losses_match_hand_computation():
    assert wasserstein_critic_loss(REAL, FAKE).item() == pytest.approx(-1.25 - 0.5)
    assert wasserstein_generator_loss(FAKE).item() == pytest.approx(1.25)


def linear_critic(norm: float) -> torch.nn.Module:
    torch.manual_seed(0)
    linear = torch.nn.Linear(784, 1)
    with torch.no_grad():
        linear.weight.mul_(norm / linear.weight.norm())
    return torch.nn.Sequential(torch.nn.Flatten(), linear)


def test_gradient_penalty_is_zero_for_unit_norm_linear_critic():
    real, fake = torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    assert gradient_penalty(linear_critic(1.0), real, fake).item() < 1e-10


def test_gradient_penalty_is_squared_excess_norm():
    real, fake = torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    assert gradient_penalty(linear_critic(3.0), real, fake).item() == pytest.approx(4.0, rel=1e-5)


def test_wgan_gp_critic_has_no_batch_norm():
    model = tiny_model("gan", "conv", loss="wgan-gp")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.discriminator.modules())


@pytest.mark.parametrize("n_critic", [1, 5])
def test_generator_updates_every_n_critic_batches(n_critic):
    model = tiny_model("gan", "mlp", loss="wgan-gp", n_critic=n_critic)
    before = [p.detach().clone() for p in model.generator.parameters()]
    quiet_trainer(max_epochs=1, limit_train_batches=n_critic - 1 or 1).fit(
        model, train_dataloaders=prototype_batches(256, 16))
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.generator.parameters()))
    assert unchanged == (n_critic > 1)


def test_fixed_noise_gives_the_same_samples():
    model = tiny_model("gan", "conv").eval()
    assert torch.equal(model.sample(4, fixed=True), model.sample(4, fixed=True))
    with pytest.raises(UserError, match="fixed noise"):
        model.sample(100, fixed=True)


def test_unknown_gan_loss_lists_choices():
    with pytest.raises(UserError, match="choose one of: ns, wgan-gp"):
        tiny_model("gan", loss="hinge")


@pytest.mark.parametrize("loss, lr, betas", [("ns", 2e-4, (0.5, 0.999)),
                                             ("wgan-gp", 1e-4, (0.0, 0.9))])
def test_each_loss_takes_its_papers_adam_settings_unless_given(loss, lr, betas):
    """DCGAN (Radford et al. 2016): lr 2e-4, betas (0.5, 0.999); WGAN-GP (Gulrajani et al.
    2017, Algorithm 1): lr 1e-4, betas (0, 0.9)."""
    default = GAN(backbone="mlp", hidden=8, latent_dim=4, loss=loss)
    for optimizer in default.configure_optimizers():
        group = optimizer.param_groups[0]
        assert (group["lr"], group["betas"]) == (lr, betas)
    given = GAN(backbone="mlp", hidden=8, latent_dim=4, loss=loss, lr=3e-3, betas=[0.1, 0.2])
    assert {(g.param_groups[0]["lr"], g.param_groups[0]["betas"])
            for g in given.configure_optimizers()} == {(3e-3, (0.1, 0.2))}


def test_gradient_penalty_is_taken_at_random_interpolates_of_real_and_fake():
    """For C(x) = 0.5 ||x||^2 the critic's gradient is x itself, so the penalty depends on where
    it is taken: x_hat = eps x + (1 - eps) G(z), eps ~ U[0, 1] per image."""
    real, fake = torch.rand(6, 1, 4, 4), torch.rand(6, 1, 4, 4)
    torch.manual_seed(3)
    penalty = gradient_penalty(lambda v: 0.5 * v.pow(2).flatten(1).sum(1), real, fake)
    torch.manual_seed(3)
    eps = torch.rand(6, 1, 1, 1)
    x_hat = eps * real + (1 - eps) * fake
    expected = (x_hat.flatten(1).norm(dim=1) - 1).pow(2).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_penalty_trains_the_critic():
    """The penalty is a function of the critic's weights (create_graph), so it has a gradient."""
    critic = torch.nn.Linear(16, 1)
    penalty = gradient_penalty(lambda v: critic(v.flatten(1)), torch.rand(4, 1, 4, 4),
                               torch.rand(4, 1, 4, 4))
    penalty.backward()
    weight = critic.weight.detach().flatten()
    expected = 2 * (weight.norm() - 1) * weight / weight.norm()  # d/dw (||w|| - 1)^2
    assert torch.allclose(critic.weight.grad.flatten(), expected, atol=1e-6)


def test_the_discriminator_losses_are_composed_as_their_papers_say():
    real, fake = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28)
    ns = tiny_model("gan", "mlp")
    terms = ns.discriminator_loss(real, fake)
    expected = ns_discriminator_loss(ns.discriminator(real), ns.discriminator(fake))
    assert set(terms) == {"d_loss"} and terms["d_loss"].item() == pytest.approx(expected.item())

    wgan = tiny_model("gan", "mlp", loss="wgan-gp", gp_weight=7.0)
    torch.manual_seed(2)
    terms = wgan.discriminator_loss(real, fake)
    critic = wasserstein_critic_loss(wgan.discriminator(real), wgan.discriminator(fake))
    torch.manual_seed(2)
    penalty = gradient_penalty(wgan.discriminator, real, fake)
    assert terms["wasserstein"].item() == pytest.approx(-critic.item(), rel=1e-5)
    assert terms["gp"].item() == pytest.approx(penalty.item(), rel=1e-5)
    assert terms["d_loss"].item() == pytest.approx((critic + 7.0 * penalty).item(), rel=1e-5)


def test_the_discriminator_sees_real_images_in_the_generators_range(monkeypatch):
    """The generator works in [-1, 1] (tanh), so real images in [0, 1] are mapped to 2x - 1."""
    model = tiny_model("gan", "mlp")
    seen = {}
    honest = model.discriminator_loss

    def spy(real, fake, *args, **kwargs):
        seen["real"], seen["fake"] = real.detach(), fake.detach()
        return honest(real, fake, *args, **kwargs)

    monkeypatch.setattr(model, "discriminator_loss", spy)
    x, _ = next(iter(prototype_batches(8, 8)))  # the first epoch's batch, as the trainer's
    quiet_trainer(max_steps=1).fit(model, train_dataloaders=prototype_batches(8, 8))
    assert torch.allclose(seen["real"], x * 2 - 1)
    assert seen["fake"].abs().max() <= 1
