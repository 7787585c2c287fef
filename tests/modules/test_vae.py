import pytest
import torch
from torch import distributions

from bench.errors import UserError
from modules.vae import (PosteriorMeanVariance, active_units, bernoulli_log_likelihood,
                         gaussian_kl, gaussian_log_density, gaussian_log_likelihood, iw_bound)
from tests.modules.conftest import prototype_batches, prototype_images, quiet_trainer, tiny_model


def test_closed_form_kl_agrees_with_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 5), torch.randn(3, 5) * 0.5
    z = mu + (0.5 * logvar).exp() * torch.randn(200_000, 3, 5)
    monte_carlo = (gaussian_log_density(z, mu, logvar)
                   - gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))).mean(0)
    assert torch.allclose(gaussian_kl(mu, logvar), monte_carlo, rtol=0.02, atol=0.02)


def test_log_density_matches_torch_distributions():
    z, mu, logvar = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    reference = distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    assert torch.allclose(gaussian_log_density(z, mu, logvar), reference, atol=1e-5)


def test_bernoulli_likelihood_matches_torch_distributions_on_binary_images():
    logits = torch.randn(3, 1, 28, 28)
    x = torch.bernoulli(torch.full((3, 1, 28, 28), 0.3))
    reference = distributions.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(-1)
    assert torch.allclose(bernoulli_log_likelihood(logits, x), reference, atol=1e-3)


def test_gaussian_likelihood_matches_torch_distributions():
    logits, x, log_scale = torch.randn(2, 3, 32, 32), torch.rand(2, 3, 32, 32), torch.tensor(-1.3)
    reference = distributions.Normal(torch.sigmoid(logits), log_scale.exp()).log_prob(x)
    assert torch.allclose(gaussian_log_likelihood(logits, x, log_scale),
                          reference.flatten(1).sum(-1), rtol=1e-5)


def test_elbo_is_likelihood_minus_kl_in_nats_per_image(unit_images):
    model = tiny_model("vae").eval()
    torch.manual_seed(3)
    log_px, kl = model.elbo_terms(unit_images)
    torch.manual_seed(3)
    assert torch.allclose(model.elbo(unit_images), log_px - kl)
    assert model.elbo(unit_images).shape == (len(unit_images),)


def test_iw_nll_with_one_sample_is_minus_elbo_in_expectation(unit_images):
    model = tiny_model("vae").eval()
    x = unit_images[:4]
    torch.manual_seed(0)
    iw = torch.stack([model.iw_nll(x, k=1) for _ in range(2000)])
    neg_elbo = torch.stack([-model.elbo(x) for _ in range(2000)])
    stderr = (iw.std(0) ** 2 / 2000 + neg_elbo.std(0) ** 2 / 2000).sqrt()
    assert ((iw.mean(0) - neg_elbo.mean(0)).abs() < 4 * stderr).all()


@pytest.fixture(scope="module")
def trained_vae():
    torch.manual_seed(0)
    model = tiny_model("vae")
    quiet_trainer(max_steps=300).fit(model, train_dataloaders=prototype_batches(1024, 32))
    return model.eval()


def test_iw_nll_decreases_as_k_grows_on_a_trained_model(trained_vae):
    x = prototype_images(256, seed=5).float() / 255
    torch.manual_seed(0)
    nll = {k: trained_vae.iw_nll(x, k=k, chunk=50).mean().item() for k in (1, 10, 100)}
    assert nll[100] <= nll[10] + 0.05 and nll[10] <= nll[1] + 0.05, nll
    assert nll[100] < nll[1], nll  # strictly tighter with many samples


def test_iw_nll_chunks_cover_all_k_samples(trained_vae, monkeypatch):
    """A chunk size that does not divide k must still average over exactly k weights. With the
    posterior equal to the prior and a decoder that ignores z, every log weight is log p(x | .),
    so the estimate is exact for any chunking; a dropped or repeated sample would shift it by
    log(k' / k)."""
    x = prototype_images(8, seed=6).float() / 255
    constant_logits = torch.randn(1, 1, 28, 28)
    monkeypatch.setattr(trained_vae, "posterior",
                        lambda x: (torch.zeros(len(x), 8), torch.zeros(len(x), 8)))

    class ConstantDecoder(torch.nn.Module):
        def forward(self, z):
            return constant_logits.expand(len(z), 1, 28, 28)

    monkeypatch.setattr(trained_vae, "decoder", ConstantDecoder())
    exact = -trained_vae.log_likelihood(constant_logits.expand(8, 1, 28, 28), x)
    for chunk in (3, 10, 64):
        assert torch.allclose(trained_vae.iw_nll(x, k=10, chunk=chunk), exact, rtol=1e-5)


def test_gaussian_log_likelihood_sums_each_images_pixels_only():
    """iw_nll evaluates it on K x B x C x H x W: every (sample, image) pair keeps its own sum."""
    from modules.vae import gaussian_log_likelihood

    logits, x = torch.randn(3, 4, 1, 5, 5), torch.rand(3, 4, 1, 5, 5)
    log_scale = torch.tensor(-1.0)
    batched = gaussian_log_likelihood(logits, x, log_scale)
    one_by_one = torch.stack([torch.stack([gaussian_log_likelihood(logits[k, b][None],
                                                                   x[k, b][None], log_scale)[0]
                                           for b in range(4)]) for k in range(3)])
    assert batched.shape == (3, 4) and torch.allclose(batched, one_by_one)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_the_training_loss_is_the_negative_beta_elbo(likelihood):
    """loss = -E_q[log p(x|z)] + beta KL(q || p), logged with elbo = -(recon + KL), in nats."""
    from modules.vae import bernoulli_log_likelihood, gaussian_log_likelihood

    model = tiny_model("vae", likelihood=likelihood, beta=2.5)
    if model.log_scale is not None:
        model.log_scale.data.fill_(-0.7)
    x = prototype_images(12).float() / 255
    torch.manual_seed(4)
    terms = model.losses(x)
    torch.manual_seed(4)
    mu, logvar = model.posterior(x)
    logits = model.decoder(mu + (0.5 * logvar).exp() * torch.randn_like(mu))
    log_px = (bernoulli_log_likelihood(logits, x) if likelihood == "bernoulli"
              else gaussian_log_likelihood(logits, x, torch.tensor(-0.7)))
    recon, kl = -log_px.mean(), gaussian_kl(mu, logvar).mean()
    assert terms["recon"].item() == pytest.approx(recon.item(), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx((recon + 2.5 * kl).item(), rel=1e-5)
    assert terms["elbo"].item() == pytest.approx(-(recon + kl).item(), rel=1e-5)


def test_burda_schedule_is_3_to_the_i_passes_at_a_tenth_to_the_i_over_7():
    from modules.vae import burda_lr_factor

    stages = [burda_lr_factor(epoch) for epoch in range(3280)]
    assert [stages.count(10 ** (-i / 7)) for i in range(8)] == [3 ** i for i in range(8)]
    assert stages == sorted(stages, reverse=True) and burda_lr_factor(5000) == 10 ** (-1)


def test_burda_schedule_lowers_the_rate_after_the_first_pass():
    from modules.vae import VAE

    optimizer = VAE(lr_schedule="burda", hidden=8, latent_dim=2).configure_optimizers()
    scheduler = optimizer["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(5):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.step()
    assert rates == pytest.approx([1e-3] + [1e-3 * 10 ** (-1 / 7)] * 3 + [1e-3 * 10 ** (-2 / 7)])


def test_an_unknown_lr_schedule_lists_the_choices():
    from modules.vae import VAE

    with pytest.raises(UserError, match="unknown lr_schedule 'cosine'; choose one of: None, burda"):
        VAE(lr_schedule="cosine")


def test_the_iw_bound_is_the_log_of_the_mean_weight_and_survives_tiny_weights():
    log_w = torch.tensor([[-1.0, -3.0], [0.5, -2.0], [-0.2, -4.0]], dtype=torch.float64)
    direct = log_w.exp().mean(dim=0).log()
    assert torch.allclose(iw_bound(log_w), direct, rtol=1e-12)
    # e^-1000 underflows to 0 in float64: the direct form gives -inf, the bound does not
    tiny = log_w - 1000
    assert torch.isinf(tiny.exp().mean(dim=0).log()).all()
    assert torch.allclose(iw_bound(tiny), direct - 1000, rtol=1e-12)
    assert torch.equal(iw_bound(log_w[:1]), log_w[0])  # L_1: the single weight


def test_the_iw_bounds_gradient_is_autograd_of_the_direct_form():
    log_w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    iw_bound(log_w).sum().backward()
    ours, log_w.grad = log_w.grad.clone(), None
    log_w.exp().mean(dim=0).log().sum().backward()
    assert torch.allclose(ours, log_w.grad, rtol=1e-12)
    # each weight's share of the sum: the self-normalised importance weights
    assert torch.allclose(ours, torch.softmax(log_w.detach(), dim=0), rtol=1e-12)


def test_the_iwae_loss_is_minus_the_bound_on_the_papers_weights(unit_images):
    """Burda et al. 2016, eq. 8: log (1/k) sum_i p(x, z_i) / q(z_i | x), the densities from
    torch.distributions as a second implementation, the draws the model makes."""
    model = tiny_model("vae", objective="iwae", samples=5)
    x = unit_images[:6].round()
    torch.manual_seed(3)
    loss = model.losses(x)["loss"]
    torch.manual_seed(3)
    with torch.no_grad():
        mu, logvar = model.posterior(x)
        z = mu + (0.5 * logvar).exp() * torch.randn(5, *mu.shape)
        logits = model.decoder(z.flatten(0, 1)).unflatten(0, (5, 6))
        log_px = distributions.Bernoulli(logits=logits).log_prob(x).flatten(2).sum(-1)
        log_pz = distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
        log_w = (log_px + log_pz - log_qz).double()
    expected = -(log_w.exp().mean(0).log()).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_iwae_at_one_sample_is_the_elbo_bit_for_bit(unit_images):
    losses = []
    for objective in ("elbo", "iwae"):
        torch.manual_seed(0)
        model = tiny_model("vae", objective=objective, samples=1)
        torch.manual_seed(1)
        losses.append(model.losses(unit_images)["loss"])
    assert torch.equal(losses[0], losses[1])


def test_the_k_sample_elbo_is_the_average_of_k_single_sample_elbos(unit_images):
    model = tiny_model("vae", samples=4, beta=1.0)
    torch.manual_seed(2)
    terms = model.losses(unit_images)
    torch.manual_seed(2)
    eps = torch.randn(4, len(unit_images), 8)
    with torch.no_grad():
        elbos = torch.stack([model.elbo(unit_images, eps=e) for e in eps])
    assert terms["elbo"].item() == pytest.approx(elbos.mean().item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(-elbos.mean().item(), rel=1e-5)


def test_active_units_count_the_latents_whose_posterior_mean_varies():
    # unit 0 varies (variance 1), unit 1 barely (0.005), unit 2 not at all, over 4 images
    means = torch.tensor([[1.0, 0.1, 2.0], [-1.0, 0.0, 2.0], [1.0, 0.1, 2.0], [-1.0, 0.0, 2.0]])
    halves = [PosteriorMeanVariance(3), PosteriorMeanVariance(3)]
    halves[0].update(means[:1])  # uneven shards, merged as DDP's sync merges them
    halves[1].update(means[1:])
    halves[0].merge_state(halves[1])
    variance = halves[0].compute()
    assert variance.tolist() == pytest.approx(means.double().var(dim=0).tolist())
    assert variance[1].item() == pytest.approx(0.01 / 3)
    assert active_units(variance) == 1


@pytest.mark.parametrize("options, message", [
    ({"objective": "iwea"}, "unknown objective 'iwea'; choose one of: elbo, iwae"),
    ({"samples": 0}, "samples=0: give the number of posterior samples"),
    ({"objective": "iwae", "beta": 0.5}, "leave beta at 1 with objective iwae")])
def test_objective_settings_are_checked(options, message):
    with pytest.raises(UserError, match=message):
        tiny_model("vae", **options)
