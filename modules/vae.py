"""Variational autoencoder (VAE) with a Gaussian posterior, ELBO and importance-weighted NLL."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import UserError
from modules.nets import as_tuple_shape, make_decoder, make_encoder
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
    sample z = mu + sigma * eps (Kingma & Welling 2014). Losses are logged in nats per image.
    Its draws come from the global generator, which the run seeds; `seed` is taken, as every
    family's constructor takes it, and recorded.
    """

    family = Family(
        name="vae", summary="Gaussian posterior; ELBO and importance-weighted NLL",
        variants="backbone mlp|conv; likelihood bernoulli|gaussian",
        judged_metrics=RECONSTRUCTION_FIGURES + ("elbo", "iw_nll") + SAMPLE_FIGURES,
        reconstructs=True, codes=True, likelihood=True, samples=True)

    def __init__(self, backbone: str = "mlp", image_shape: tuple[int, int, int] = (1, 28, 28),
                 latent_dim: int = 32, hidden: int = 64, width: int = 32,
                 likelihood: str = "bernoulli", beta: float = 1.0, lr: float = 1e-3,
                 depth: int = 1, activation: str = "relu", lr_schedule: str | None = None,
                 adam_eps: float = 1e-8, seed: int = 0) -> None:  # pragma: no mutate block
        super().__init__()
        self.save_hyperparameters()
        if likelihood not in LIKELIHOODS:
            raise UserError(f"unknown likelihood {likelihood!r}; choose one of: "
                             f"{', '.join(LIKELIHOODS)}")
        if lr_schedule not in LR_SCHEDULES:
            raise UserError(f"unknown lr_schedule {lr_schedule!r}; choose one of: "
                             f"{', '.join(map(str, LR_SCHEDULES))}")
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
            z = mu + (0.5 * logvar).exp() * noise(m)  # m, B, D
            logits = self.decoder(z.flatten(0, 1)).unflatten(0, (m, len(x)))
            log_w = (self.log_likelihood(logits, x.expand(m, *x.shape))
                     + gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
                     - gaussian_log_density(z, mu, logvar))
            running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
        return -(running - math.log(k))

    # -- training ------------------------------------------------------------------------------
    def losses(self, x: Tensor) -> dict[str, Tensor]:
        log_px, kl = self.elbo_terms(x)
        recon, kl = -log_px.mean(), kl.mean()
        return {"loss": recon + self.hparams.beta * kl, "recon": recon, "kl": kl,
                "elbo": -(recon + kl)}

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
