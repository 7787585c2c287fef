"""GAN: DCGAN generator and discriminator, non-saturating or WGAN-GP loss, manual optimisation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.errors import UserError
from modules.nets import as_tuple_shape, init_dcgan_weights, make_decoder, make_encoder
from modules.family import Family
from modules.steps import SAMPLE_FIGURES, BenchModule, first_tensor

GAN_LOSSES = ("ns", "wgan-gp")
OPTIMIZER_DEFAULTS = {"ns": (2e-4, (0.5, 0.999)), "wgan-gp": (1e-4, (0.0, 0.9))}


def ns_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """-E[log D(x)] - E[log(1 - D(G(z)))] with D = sigmoid(logits), written with softplus for
    stability: softplus(-l_real) + softplus(l_fake) (Goodfellow et al. 2014)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def ns_generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss -E[log D(G(z))] = softplus(-l_fake) (Goodfellow et al. 2014)."""
    return F.softplus(-fake_logits).mean()


def wasserstein_critic_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """E[C(G(z))] - E[C(x)] (Arjovsky et al. 2017), minimised by the critic."""
    return fake_scores.mean() - real_scores.mean()


def wasserstein_generator_loss(fake_scores: Tensor) -> Tensor:
    return -fake_scores.mean()


def adam_settings(loss: str, lr: float | None,
                  betas: tuple[float, float] | None) -> tuple[float, tuple[float, float]]:
    """Adam's (lr, betas) as each loss's paper sets them, unless given: DCGAN lr 2e-4, betas
    (0.5, 0.999) (Radford et al. 2016); WGAN-GP lr 1e-4, betas (0, 0.9) (Gulrajani et al. 2017,
    Algorithm 1)."""
    default_lr, default_betas = OPTIMIZER_DEFAULTS[loss]
    return (default_lr if lr is None else lr), tuple(default_betas if betas is None else betas)


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """E[(||grad C(x_hat)||_2 - 1)^2] at x_hat = eps x + (1 - eps) G(z), eps ~ U[0, 1] per image
    (Gulrajani et al. 2017, "Improved training of Wasserstein GANs", eq. 3)."""
    eps = torch.rand(len(real), *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


class GAN(BenchModule):
    """DCGAN (Radford et al. 2016) trained with two Adam optimisers under Lightning's manual
    optimisation: each batch updates the discriminator once, and every `n_critic`-th batch also
    the generator. The generator works in [-1, 1] (tanh); `decode` and `sample` return
    [0, 1].
    """

    # Under DDP, the discriminator's backward leaves every generator parameter without a
    # gradient, so DDP must look for unused parameters after each backward (the harness's
    # bench.loop.ManualStepDDP, like the Trainer, prepares DDP's reducer before each backward);
    # without it the first generator step fails. The search walks the autograd graph at every
    # backward, which costs time, so only the GAN asks for it.
    ddp_find_unused_parameters = True

    family = Family(name="gan", summary="DCGAN, non-saturating or WGAN-GP loss",
                    variants="backbone mlp|conv; loss ns|wgan-gp",
                    judged_metrics=SAMPLE_FIGURES, samples=True)

    def __init__(self, backbone: str = "conv", image_shape: tuple[int, int, int] = (1, 28, 28),
                 latent_dim: int = 64, hidden: int = 64, width: int = 32, loss: str = "ns",
                 n_critic: int | None = None, gp_weight: float = 10.0, lr: float | None = None,
                 betas: tuple[float, float] | None = None, n_fixed: int = 64,
                 seed: int = 0) -> None:  # pragma: no mutate block
        super().__init__()
        self.save_hyperparameters()
        if loss not in GAN_LOSSES:
            raise UserError(f"unknown GAN loss {loss!r}; choose one of: {', '.join(GAN_LOSSES)}")
        self.automatic_optimization = False
        self.image_shape = as_tuple_shape(image_shape)
        self.n_critic = n_critic if n_critic is not None else (5 if loss == "wgan-gp" else 1)
        self.lr, self.betas = adam_settings(loss, lr, betas)
        self.generator = make_decoder(backbone, self.image_shape, latent_dim, hidden, width)
        # A WGAN-GP critic must not use BatchNorm: the penalty is defined per sample.
        self.discriminator = make_encoder(backbone, self.image_shape, 1, hidden, width,
                                          batch_norm=(loss == "ns"))
        if backbone == "conv":
            self.apply(init_dcgan_weights)
        noise = torch.randn(n_fixed, latent_dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("fixed_noise", noise)

    # -- the common surface ------------------------------------------------------------------
    def decode(self, z: Tensor) -> Tensor:
        """Generator images in [0, 1]."""
        return (torch.tanh(self.generator(z)) + 1) / 2

    def forward(self, z: Tensor) -> Tensor:
        return self.decode(z)

    @torch.no_grad()
    def sample(self, n: int, fixed: bool = False) -> Tensor:
        """n images in [0, 1] from fresh noise (global RNG), or from the first n of the fixed
        noise (the same images every call, for grids that show training progress)."""
        if fixed:
            if n > len(self.fixed_noise):
                raise UserError(f"only {len(self.fixed_noise)} fixed noise vectors (n_fixed)")
            return self.decode(self.fixed_noise[:n])
        return self.decode(torch.randn(n, self.hparams.latent_dim, device=self.device))

    # -- losses --------------------------------------------------------------------------------
    def discriminator_loss(self, real: Tensor, fake: Tensor,
                           with_penalty: bool = True) -> dict[str, Tensor]:
        real_scores, fake_scores = self.discriminator(real), self.discriminator(fake)
        if self.hparams.loss == "ns":
            return {"d_loss": ns_discriminator_loss(real_scores, fake_scores)}
        critic = wasserstein_critic_loss(real_scores, fake_scores)
        terms = {"d_loss": critic, "wasserstein": -critic}
        if with_penalty:
            terms["gp"] = gradient_penalty(self.discriminator, real, fake)
            terms["d_loss"] = critic + self.hparams.gp_weight * terms["gp"]
        return terms

    def generator_loss(self, fake: Tensor) -> Tensor:
        scores = self.discriminator(fake)
        if self.hparams.loss == "ns":
            return ns_generator_loss(scores)
        return wasserstein_generator_loss(scores)

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        """One batch under manual optimisation. `batch_idx` counts the generator's schedule:
        the harness's loop passes the batch's index in the run (the schedule runs across
        epochs); a Trainer passes its index in the epoch, as Lightning's GAN examples count."""
        opt_g, opt_d = self.optimizers()
        terms = self.train_on_batch(first_tensor(batch), batch_idx, opt_g, opt_d,
                                    self.manual_backward)
        self.log_terms("train", terms, prog_bar=True)
        return terms

    def train_on_batch(self, x: Tensor, index: int, opt_g, opt_d,
                       backward: Callable[[Tensor], None]) -> dict[str, Tensor]:
        """One discriminator step, and a generator step after every n_critic-th batch (`index`
        is the batch's 0-based count); `backward` is Lightning's manual_backward, or
        Tensor.backward in a plain loop (bench perf). Returns the terms, detached; "loss" is the
        discriminator's, for the divergence look."""
        real = x * 2 - 1
        z = torch.randn(len(real), self.hparams.latent_dim, device=real.device)
        fake = torch.tanh(self.generator(z))

        terms = self.discriminator_loss(real, fake.detach())
        opt_d.zero_grad(set_to_none=True)
        backward(terms["d_loss"])
        opt_d.step()

        if (index + 1) % self.n_critic == 0:
            g_loss = self.generator_loss(fake)
            opt_g.zero_grad(set_to_none=True)
            backward(g_loss)
            opt_g.step()
            terms["g_loss"] = g_loss
        terms = {k: v.detach() for k, v in terms.items()}
        return {"loss": terms["d_loss"], **terms}

    def _eval_step(self, batch, stage: str) -> dict[str, Tensor]:
        real = first_tensor(batch) * 2 - 1
        fake = torch.tanh(self.generator(torch.randn(len(real), self.hparams.latent_dim,
                                                     device=self.device)))
        # No penalty here: evaluation runs under inference mode, and the penalty needs gradients.
        terms = self.discriminator_loss(real, fake, with_penalty=False)
        terms["g_loss"] = self.generator_loss(fake)
        self.log_terms(stage, terms, sync_dist=True)
        return terms

    def validation_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        return self._eval_step(batch, "test")

    def configure_optimizers(self):
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=self.betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=self.betas)
        return opt_g, opt_d
