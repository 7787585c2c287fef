import math

import pytest
import torch

from bench.errors import UserError
import modules.gan
from modules.gan import (GAN, diff_augment, gradient_penalty, hinge_discriminator_loss,
                         hinge_generator_loss, ns_discriminator_loss, ns_generator_loss,
                         r1_penalty, random_brightness, random_contrast, random_cutout,
                         random_saturation, random_translation, wasserstein_critic_loss,
                         wasserstein_generator_loss)
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
    with pytest.raises(UserError, match="choose one of: ns, wgan-gp, hinge"):
        tiny_model("gan", loss="hinged")


@pytest.mark.parametrize("loss, lr, betas", [("ns", 2e-4, (0.5, 0.999)),
                                             ("wgan-gp", 1e-4, (0.0, 0.9)),
                                             ("hinge", 2e-4, (0.0, 0.9))])
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



def test_hinge_losses_match_hand_computation():
    # D: max(0, 1 - 2) + max(0, 1 + 1) = 0 + 2 over real; max(0, 1.5) + max(0, -2) over fake
    assert hinge_discriminator_loss(REAL, FAKE).item() == pytest.approx((0 + 2) / 2 + (1.5 + 0) / 2)
    assert hinge_generator_loss(FAKE).item() == pytest.approx(-(0.5 - 3.0) / 2)


def test_the_hinge_setting_takes_five_discriminator_steps_a_generator_step():
    assert tiny_model("gan", loss="hinge").n_critic == 5


def test_r1_is_the_squared_gradient_norm_at_real_images():
    """A linear D whose weight has norm 3 has that weight as its gradient at every image."""
    real = torch.rand(8, 1, 28, 28)
    assert r1_penalty(linear_critic(3.0), real).item() == pytest.approx(9.0, rel=1e-5)


def test_r1_matches_autograd_on_a_nonlinear_discriminator():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.Tanh(),
                              torch.nn.Linear(5, 1))
    real = torch.randn(6, 3, 2, 2)
    per_image = []
    for image in real:  # one image at a time, by hand
        x = image[None].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(net(x).sum(), x)
        per_image.append(grad.pow(2).sum())
    assert r1_penalty(net, real).item() == pytest.approx(torch.stack(per_image).mean().item(),
                                                         rel=1e-5)


@pytest.mark.parametrize("every, index, weighted", [(1, 3, True), (4, 4, True), (4, 5, False)])
def test_lazy_r1_comes_every_n_steps_weighted_n_times(every, index, weighted):
    model = tiny_model("gan", "mlp", r1_weight=10.0, r1_every=every)
    real, fake = torch.rand(8, 1, 28, 28) * 2 - 1, torch.rand(8, 1, 28, 28) * 2 - 1
    calls = []
    model.discriminator_loss = (lambda real, fake, with_r1, f=model.discriminator_loss:
                                calls.append(with_r1) or f(real, fake, with_r1=with_r1))
    opt_g, opt_d = model.configure_optimizers()
    model.train_on_batch((real + 1) / 2, index, opt_g, opt_d, lambda loss: loss.backward())
    assert calls == [weighted]
    terms = GAN.discriminator_loss(model, real, fake, with_r1=True)
    plain = GAN.discriminator_loss(model, real, fake)
    assert terms["d_loss"].item() == pytest.approx(
        plain["d_loss"].item() + 10.0 / 2 * every * terms["r1"].item(), rel=1e-5)


def test_spectral_norm_bounds_each_discriminator_layer_by_one():
    model = tiny_model("gan", "conv", loss="hinge", spectral_norm="discriminator").train()
    x = torch.rand(4, 1, 28, 28)
    for _ in range(30):  # each forward pass is one power iteration
        model.discriminator(x)
    layers = [m for m in model.discriminator.modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 3 and not any(isinstance(m, torch.nn.BatchNorm2d)
                                         for m in model.discriminator.modules())
    for layer in layers:
        weight = layer.weight.detach().flatten(1)  # the normalised weight, (out, in * k * k)
        assert torch.linalg.matrix_norm(weight, ord=2).item() == pytest.approx(1.0, abs=1e-3)
    assert not any(hasattr(m, "parametrizations") for m in model.generator.modules())


def test_spectral_norms_power_iteration_resumes_with_the_checkpoint():
    model = tiny_model("gan", "mlp", spectral_norm="both").train()
    x = torch.rand(4, 1, 28, 28)
    for _ in range(3):
        model.discriminator(x)
    resumed = tiny_model("gan", "mlp", spectral_norm="both").train()
    resumed.load_state_dict(model.state_dict())
    assert any(k.endswith("parametrizations.weight.0._u") for k in model.state_dict())
    # the next power iteration continues from the same vectors: the same scores
    assert torch.equal(resumed.discriminator(x), model.discriminator(x))


def test_the_generator_ema_averages_each_generator_step_and_samples_come_from_it():
    torch.manual_seed(0)
    model = tiny_model("gan", "mlp", ema_decay=0.9)
    opt_g, opt_d = model.configure_optimizers()
    x = torch.rand(8, 1, 28, 28)
    expected = None
    for index in range(3):
        model.train_on_batch(x, index, opt_g, opt_d, lambda loss: loss.backward())
        weights = [p.detach().clone() for p in model.generator.parameters()]
        expected = weights if expected is None else [0.9 * e + 0.1 * w
                                                     for e, w in zip(expected, weights)]
    for average, value in zip(model.generator_ema.module.parameters(), expected):
        assert torch.allclose(average, value, rtol=1e-6, atol=1e-7)
    z = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(model.eval().decode(z),
                           (torch.tanh(model.generator_ema(z)) + 1) / 2)
    assert model.sample_provenance() == {"generator_ema": 0.9}
    assert tiny_model("gan").sample_provenance() == {}


@pytest.mark.parametrize("options, message", [
    ({"spectral_norm": "d"}, "unknown spectral_norm 'd'; choose one of: none, discriminator, both"),
    ({"r1_weight": -1.0}, "give a weight >= 0"), ({"r1_every": 0}, "a period of 1 or more"),
    ({"ema_decay": 1.0}, r"ema_decay=1.0 must be in \[0, 1\)")])
def test_gan_settings_are_checked(options, message):
    with pytest.raises(UserError, match=message):
        tiny_model("gan", **options)



def drawn(n, seed):
    """The per-image uniform draws an augmentation makes after manual_seed(seed)."""
    torch.manual_seed(seed)
    return torch.rand(n, 1, 1, 1)


def test_diffaugments_colour_transforms_are_the_papers_formulas():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    torch.manual_seed(1)
    assert torch.allclose(random_brightness(x), x + drawn(4, 1) - 0.5)
    torch.manual_seed(2)
    mean = x.mean(dim=1, keepdim=True)
    assert torch.allclose(random_saturation(x), (x - mean) * drawn(4, 2) * 2 + mean)
    torch.manual_seed(3)
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    assert torch.allclose(random_contrast(x), (x - mean) * (drawn(4, 3) + 0.5) + mean)


def test_translation_shifts_each_image_by_whole_pixels_filling_with_zero():
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16) + 1
    torch.manual_seed(0)
    out = random_translation(x)
    torch.manual_seed(0)
    dy, dx = (torch.randint(-2, 3, size=[2, 1, 1]).flatten() for _ in range(2))
    for i in range(2):
        expected = torch.zeros(16, 16)
        for r in range(16):
            for c in range(16):
                if 0 <= r + dy[i] < 16 and 0 <= c + dx[i] < 16:
                    expected[r, c] = x[i, 0, r + dy[i], c + dx[i]]
        assert torch.equal(out[i, 0], expected), (int(dy[i]), int(dx[i]))


def test_cutout_zeroes_one_square_of_half_the_size_and_nothing_else():
    x = torch.rand(50, 2, 28, 28) + 1  # no zero of its own
    out = random_cutout(x)
    for image, original in zip(out, x):
        zeros = image[0] == 0
        assert torch.equal(zeros, image[1] == 0)  # the same square in every channel
        rows, cols = zeros.any(1).nonzero().flatten(), zeros.any(0).nonzero().flatten()
        assert zeros.sum() == len(rows) * len(cols) and len(rows) <= 14 and len(cols) <= 14
        assert torch.equal(image[:, ~zeros], original[:, ~zeros])
    assert (out == 0).flatten(1).sum(1).max() == 2 * 14 * 14  # a whole square somewhere


def test_diffaugment_lets_the_gradient_through_to_the_generated_images():
    fake = torch.rand(4, 1, 28, 28, requires_grad=True)
    diff_augment(fake, "color,translation,cutout").sum().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_the_discriminator_sees_only_augmented_images_in_training(monkeypatch):
    seen = []
    monkeypatch.setattr(modules.gan, "diff_augment",
                        lambda images, policy: seen.append(policy) or images.flip(-1))
    model = tiny_model("gan", "mlp", diffaugment="translation,cutout")
    opt_g, opt_d = model.configure_optimizers()
    model.train_on_batch(torch.rand(8, 1, 28, 28), 0, opt_g, opt_d, lambda loss: loss.backward())
    assert seen == ["translation,cutout"] * 3  # real and fake for D, fake for G


def test_an_unknown_diffaugment_part_lists_the_parts():
    with pytest.raises(UserError, match=r"unknown part\(s\) \['colour'\]; give a comma-separated "
                                        "subset of: color, translation, cutout"):
        tiny_model("gan", diffaugment="colour,cutout")
