"""Variational autoencoder (VAE) with a Gaussian posterior, ELBO and importance-weighted NLL."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric as TorchMetric

from bench.errors import UserError, check_choice
from bench.metrics import SPLIT, Metric
from modules.nets import as_tuple_shape, decoder_directions, make_decoder, make_encoder
from modules.family import Family
from modules.steps import RECONSTRUCTION_FIGURES, SAMPLE_FIGURES, LossSteps

LIKELIHOODS = ("bernoulli", "gaussian")
LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per image, in nats:
    0.5 * sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j) (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def gaussian_log_density(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last axis, in nats."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) / logvar.exp()).sum(dim=-1)


def bernoulli_log_likelihood(logits: Tensor, x: Tensor) -> Tensor:
    """log p(x | z) = sum_pixels x log sigmoid(l) + (1 - x) log(1 - sigmoid(l)) per image, in nats.
    Exact for binary x; for grey x in [0, 1] it is the usual continuous relaxation."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(-3).sum(-1)


def gaussian_log_likelihood(logits: Tensor, x: Tensor, log_scale: Tensor) -> Tensor:
    """log N(x; sigmoid(logits), exp(log_scale)^2 I) summed over pixels, in nats per image, with
    one learned scale shared by all pixels (Rybkin et al. 2021, "sigma-VAE")."""
    mean = torch.sigmoid(logits)
    return -(0.5 * LOG_2PI + log_scale
             + 0.5 * ((x - mean) / log_scale.exp()).pow(2)).flatten(-3).sum(-1)


def iw_bound(log_weights: Tensor) -> Tensor:
    """log (1/k) sum_i w_i over the first axis (k samples), from log w_i, per image: the
    importance-weighted bound L_k of Burda et al. 2016 (eq. 8), computed as logsumexp - log k so
    that weights of e^-1000 neither underflow nor lose their gradient. L_1 is the ELBO."""
    return torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0])


OBJECTIVES = ("elbo", "iwae")
# Burda et al. 2016 (sec. 5.2) count a latent unit active when Cov_x(E_q[z_u | x]) > 0.01.
ACTIVE_UNIT_VARIANCE = 0.01


class PosteriorMeanVariance(TorchMetric):
    """Per latent unit, the variance over images of the posterior mean E_q[z | x] (unbiased,
    float64 sums reduced across processes): torchmetrics has no per-feature variance."""

    full_state_update = False

    def __init__(self, num_units: int, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("total", "total_sq"):
            self.add_state(name, torch.zeros(num_units, dtype=torch.float64),
                           dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, means: Tensor) -> None:
        means = means.double()
        self.total += means.sum(dim=0)
        self.total_sq += means.pow(2).sum(dim=0)
        self.images += len(means)

    def compute(self) -> Tensor:
        n = self.images
        return (self.total_sq - self.total.pow(2) / n) / (n - 1)


def active_units(variances: Tensor, threshold: float = ACTIVE_UNIT_VARIANCE) -> int:
    """The number of latent units whose posterior mean varies over the images by more than
    `threshold` (Burda et al. 2016, eq. 19: A_u = Cov_x(E_q[u]) > 10^-2)."""
    return int((variances > threshold).sum())


def burda_lr_factor(epoch: int) -> float:
    """Burda et al. 2016 (section 5): for i = 0..7, 3^i passes at learning rate 0.001 * 10^(-i/7),
    3,280 passes in all; the rate stays at the last stage's beyond them. As a factor of the base
    rate for epoch `epoch` (0-based): 10^(-i/7), i the stage the epoch falls in."""
    stage, end = 0, 1
    while epoch >= end and stage < 7:
        stage += 1
        end += 3 ** stage
    return 10 ** (-stage / 7)


LR_SCHEDULES = {None: None, "burda": burda_lr_factor}


class VAE(LossSteps):
    """Gaussian-posterior VAE, q(z|x) = N(mu(x), diag(sigma^2(x))), prior N(0, I), trained on the
    negative beta-ELBO: -E_q[log p(x|z)] + beta * KL(q(z|x) || p(z)), with one reparameterised
    sample z = mu + sigma * eps (Kingma & Welling 2014); with `samples` = k > 1 the average of k
    such single-sample ELBOs (Burda et al. 2016's "VAE, k = 5" column). `objective: iwae` trains
    on the k-sample importance-weighted bound instead (`iw_bound`; Burda et al. 2016), which is
    the ELBO at k = 1 (the same code, bit for bit). Losses are logged in nats per image.
    Its draws come from the global generator, which the run seeds; `seed` is taken, as every
    family's constructor takes it, and recorded.
    """

    family = Family(
        name="vae", summary="Gaussian posterior; ELBO (k samples) or IWAE bound; IW-NLL",
        variants=f"backbone mlp|conv; likelihood {'|'.join(LIKELIHOODS)}; objective "
                 f"{'|'.join(OBJECTIVES)}, samples k",
        judged_metrics=RECONSTRUCTION_FIGURES + ("elbo", "iw_nll") + SAMPLE_FIGURES,
        reconstructs=True, codes=True, likelihood=True, samples=True,
        metrics=(Metric("active_units", True, "AU", SPLIT, "latent units", per_run=True),))

    def __init__(self, backbone: str = "mlp", image_shape: tuple[int, int, int] = (1, 28, 28),
                 latent_dim: int = 32, hidden: int = 64, width: int = 32,
                 likelihood: str = "bernoulli", beta: float = 1.0, lr: float = 1e-3,
                 depth: int = 1, activation: str = "relu", lr_schedule: str | None = None,
                 adam_eps: float = 1e-8, objective: str = "elbo", samples: int = 1,
                 seed: int = 0) -> None:  # pragma: no mutate block
        super().__init__()
        self.save_hyperparameters()
        check_choice("objective", objective, OBJECTIVES)
        if samples < 1:
            raise UserError(f"samples={samples}: give the number of posterior samples per "
                            "image, 1 or more")
        if objective == "iwae" and beta != 1.0:
            raise UserError(f"beta={beta} weighs the ELBO's KL term, which the IWAE bound does "
                            "not have: leave beta at 1 with objective iwae")
        check_choice("likelihood", likelihood, LIKELIHOODS)
        check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
        self.image_shape = as_tuple_shape(image_shape)
        self.encoder = make_encoder(backbone, self.image_shape, 2 * latent_dim, hidden, width,
                                    depth=depth, activation=activation)
        self.decoder = make_decoder(backbone, self.image_shape, latent_dim, hidden, width,
                                    depth=depth, activation=activation)
        self.log_scale = nn.Parameter(torch.zeros(())) if likelihood == "gaussian" else None

    @property
    def latent_dim(self) -> int:
        """The width of z (and of the standard normal draws `elbo_terms` takes)."""
        return self.hparams.latent_dim

    # -- the common surface ------------------------------------------------------------------
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z | x)."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def encode(self, x: Tensor) -> Tensor:
        """The posterior mean: the deterministic code used for sparsity and representation."""
        return self.posterior(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """The decoder's mean image in [0, 1]."""
        return torch.sigmoid(self.decoder(z))

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def decoder_directions(self) -> Tensor:
        """The direction each latent writes into the decoder (`nets.decoder_directions`)."""
        return decoder_directions(self.decoder)

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n mean images of p(x | z), z ~ N(0, I) (global RNG)."""
        return self.decode(torch.randn(n, self.hparams.latent_dim, device=self.device))

    # -- likelihoods ---------------------------------------------------------------------------
    def log_likelihood(self, logits: Tensor, x: Tensor) -> Tensor:
        if self.log_scale is None:
            return bernoulli_log_likelihood(logits, x)
        return gaussian_log_likelihood(logits, x, self.log_scale)

    def elbo_terms(self, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(E_q[log p(x|z)] from one reparameterised sample z = mu + sigma * eps, KL(q || p)),
        each per image; eps ~ N(0, I) from the global generator unless given (B x latent_dim)."""
        mu, logvar = self.posterior(x)
        eps = torch.randn_like(mu) if eps is None else eps
        z = mu + (0.5 * logvar).exp() * eps
        return self.log_likelihood(self.decoder(z), x), gaussian_kl(mu, logvar)

    def elbo(self, x: Tensor, eps: Tensor | None = None) -> Tensor:
        """ELBO per image in nats (one-sample estimate of the expectation, closed-form KL)."""
        log_px, kl = self.elbo_terms(x, eps)
        return log_px - kl

    @torch.no_grad()
    def iw_nll(self, x: Tensor, k: int, chunk: int = 500,
               noise: Callable[[int], Tensor] | None = None) -> Tensor:
        """Importance-weighted NLL per image in nats (Burda et al. 2016, eq. 8):
        -log (1/k) sum_i p(x, z_i) / q(z_i | x), z_i ~ q(z | x), a bound that tightens as k grows.
        The k samples are drawn `chunk` at a time and merged with logsumexp, so k = 5000 fits in
        memory; memory is batch x chunk decoder outputs. `noise(m)` gives the next m standard
        normal draws per image (m x B x latent_dim); by default the global generator's."""
        mu, logvar = self.posterior(x)
        if noise is None:
            noise = lambda m: torch.randn(m, *mu.shape, device=x.device)  # noqa: E731
        running = torch.full((len(x),), float("-inf"), device=x.device)
        for start in range(0, k, chunk):
            m = min(chunk, k - start)
            log_w = self.log_weights(x, mu, logvar, noise(m))
            running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
        return -(running - math.log(k))

    def sampled_likelihood(self, x: Tensor, mu: Tensor, logvar: Tensor,
                           eps: Tensor) -> tuple[Tensor, Tensor]:
        """(z_i = mu + sigma * eps_i, log p(x | z_i)) for m x B x latent_dim draws eps: the
        m x B x latent_dim samples and their m x B log-likelihoods in nats."""
        m = len(eps)
        z = mu + (0.5 * logvar).exp() * eps  # m, B, D
        logits = self.decoder(z.flatten(0, 1)).unflatten(0, (m, len(x)))
        return z, self.log_likelihood(logits, x.expand(m, *x.shape))

    def log_weights(self, x: Tensor, mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
        """log w_i = log p(x | z_i) + log p(z_i) - log q(z_i | x) for z_i = mu + sigma * eps_i,
        eps being m x B x latent_dim draws: m x B log importance weights in nats."""
        z, log_px = self.sampled_likelihood(x, mu, logvar, eps)
        return (log_px + gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
                - gaussian_log_density(z, mu, logvar))

    @torch.inference_mode()
    def own_metrics(self, batches) -> dict[str, float]:
        """active_units over the test split (`active_units`)."""
        variance = PosteriorMeanVariance(self.hparams.latent_dim).to(self.device)
        for x, _ in batches:
            variance.update(self.posterior(x.to(self.device))[0])
        return {"active_units": active_units(variance.compute())}

    # -- training ------------------------------------------------------------------------------
    def losses(self, x: Tensor) -> dict[str, Tensor]:
        hp = self.hparams
        if hp.samples == 1:  # the ELBO, which is also the IWAE bound at k = 1
            log_px, kl = self.elbo_terms(x)
            recon, kl = -log_px.mean(), kl.mean()
            return {"loss": recon + hp.beta * kl, "recon": recon, "kl": kl,
                    "elbo": -(recon + kl)}
        mu, logvar = self.posterior(x)
        eps = torch.randn(hp.samples, *mu.shape, device=x.device)
        if hp.objective == "iwae":
            bound = iw_bound(self.log_weights(x, mu, logvar, eps)).mean()
            return {"loss": -bound, "iw_bound": bound}
        # the average of k single-sample ELBOs: log p(x | z_i) averaged, the KL in closed form
        recon = -self.sampled_likelihood(x, mu, logvar, eps)[1].mean()
        kl = gaussian_kl(mu, logvar).mean()
        return {"loss": recon + hp.beta * kl, "recon": recon, "kl": kl, "elbo": -(recon + kl)}

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr,
                                     eps=self.hparams.adam_eps)
        schedule = LR_SCHEDULES[self.hparams.lr_schedule]
        if schedule is None:
            return optimizer
        # stepped at each epoch's end, by the Trainer or by the harness's loop (bench.loop.fit)
        return {"optimizer": optimizer, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
            "interval": "epoch"}}
