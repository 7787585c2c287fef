"""GAN: DCGAN generator and discriminator under manual optimisation; the non-saturating,
Wasserstein (WGAN-GP) or hinge loss, spectral normalisation, R1, a generator EMA and
DiffAugment."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bench.errors import UserError, check_choice
from modules.nets import as_tuple_shape, init_dcgan_weights, make_decoder, make_encoder
from modules.family import Family
from modules.steps import SAMPLE_FIGURES, BenchModule, first_tensor

GAN_LOSSES = ("ns", "wgan-gp", "hinge")
# Adam's (lr, betas) and the discriminator steps per generator step, as each loss's source sets
# them: DCGAN (Radford et al. 2016); WGAN-GP (Gulrajani et al. 2017, Algorithm 1); the hinge
# loss as SNGAN is trained in Mimicry (Lee and Town 2020) and Miyato et al. 2018's ResNet runs.
OPTIMIZER_DEFAULTS = {"ns": (2e-4, (0.5, 0.999)), "wgan-gp": (1e-4, (0.0, 0.9)),
                      "hinge": (2e-4, (0.0, 0.9))}
N_CRITIC_DEFAULTS = {"ns": 1, "wgan-gp": 5, "hinge": 5}
SPECTRAL_NORM = ("none", "discriminator", "both")


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


def hinge_discriminator_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))] (Lim and Ye 2017; Miyato et al. 2018,
    eq. 16)."""
    return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()


def hinge_generator_loss(fake_scores: Tensor) -> Tensor:
    """-E[D(G(z))] (Miyato et al. 2018, eq. 17)."""
    return -fake_scores.mean()


def r1_penalty(discriminator: nn.Module, real: Tensor) -> Tensor:
    """E[||grad_x D(x)||_2^2] over real images x (Mescheder et al. 2018, eq. 9, without its
    gamma / 2, which the caller applies)."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(real).sum(), real, create_graph=True)
    return grad.flatten(1).pow(2).sum(dim=1).mean()


def spectrally_normalised(module: nn.Module) -> nn.Module:
    """Every convolution and linear layer of `module` with its weight divided by its largest
    singular value, estimated by one power iteration a forward pass (Miyato et al. 2018;
    torch's parametrisation, whose vectors u and v are buffers: they resume with the weights)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            setattr(module, name, spectral_norm(child))
        else:
            spectrally_normalised(child)
    return module


# DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"),
# written out after the authors' reference code function by function: it is a script there, not
# a package, and kornia's augmentations draw other parameters. Images are in [-1, 1]; each image
# draws its own parameters from the global generator (so a resumed run draws the same ones).
def random_brightness(x: Tensor) -> Tensor:
    """x + b, b ~ U[-0.5, 0.5) per image."""
    return x + (torch.rand(len(x), 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)


def random_saturation(x: Tensor) -> Tensor:
    """(x - m) * s + m, m the image's mean over channels per pixel, s ~ U[0, 2) per image."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (torch.rand(len(x), 1, 1, 1, dtype=x.dtype, device=x.device) * 2) + mean


def random_contrast(x: Tensor) -> Tensor:
    """(x - m) * c + m, m the image's mean, c ~ U[0.5, 1.5) per image."""
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (torch.rand(len(x), 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5) + mean


def random_translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    """Each image shifted by up to `ratio` of its size in each direction, an integer number of
    pixels drawn per image; what comes in from outside is 0."""
    n, _, height, width = x.shape
    shift_h, shift_w = int(height * ratio + 0.5), int(width * ratio + 0.5)
    dy = torch.randint(-shift_h, shift_h + 1, size=[n, 1, 1], device=x.device)
    dx = torch.randint(-shift_w, shift_w + 1, size=[n, 1, 1], device=x.device)
    batch, rows, cols = torch.meshgrid(torch.arange(n, device=x.device),
                                       torch.arange(height, device=x.device),
                                       torch.arange(width, device=x.device), indexing="ij")
    rows = torch.clamp(rows + dy + 1, 0, height + 1)
    cols = torch.clamp(cols + dx + 1, 0, width + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_cutout(x: Tensor, ratio: float = 0.5) -> Tensor:
    """A square of `ratio` of the image's size set to 0 at a position drawn per image (its
    centre anywhere in the image, the square clipped at the edges)."""
    n, _, height, width = x.shape
    size_h, size_w = int(height * ratio + 0.5), int(width * ratio + 0.5)
    top = torch.randint(0, height + (1 - size_h % 2), size=[n, 1, 1], device=x.device)
    left = torch.randint(0, width + (1 - size_w % 2), size=[n, 1, 1], device=x.device)
    batch, rows, cols = torch.meshgrid(torch.arange(n, device=x.device),
                                       torch.arange(size_h, device=x.device),
                                       torch.arange(size_w, device=x.device), indexing="ij")
    rows = torch.clamp(rows + top - size_h // 2, min=0, max=height - 1)
    cols = torch.clamp(cols + left - size_w // 2, min=0, max=width - 1)
    mask = torch.ones(n, height, width, dtype=x.dtype, device=x.device)
    mask[batch, rows, cols] = 0
    return x * mask.unsqueeze(1)


DIFFAUGMENT_POLICIES = {"color": (random_brightness, random_saturation, random_contrast),
                        "translation": (random_translation,), "cutout": (random_cutout,)}


def diff_augment(x: Tensor, policy: str) -> Tensor:
    """The augmentations of each comma-separated part of `policy` ('color,translation,cutout'),
    in order; differentiable in x, so the generator learns through them."""
    for part in filter(None, policy.split(",")):
        for augment in DIFFAUGMENT_POLICIES[part]:
            x = augment(x)
    return x


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

    family = Family(name="gan",
                    summary="DCGAN; non-saturating, WGAN-GP or hinge loss; SN, R1, EMA",
                    variants=f"backbone mlp|conv; loss {'|'.join(GAN_LOSSES)}; spectral_norm "
                             f"{'|'.join(SPECTRAL_NORM[1:])}; r1_weight; ema_decay; diffaugment "
                             f"{','.join(DIFFAUGMENT_POLICIES)}",
                    judged_metrics=SAMPLE_FIGURES, samples=True)

    def __init__(self, backbone: str = "conv", image_shape: tuple[int, int, int] = (1, 28, 28),
                 latent_dim: int = 64, hidden: int = 64, width: int = 32, loss: str = "ns",
                 n_critic: int | None = None, gp_weight: float = 10.0, lr: float | None = None,
                 betas: tuple[float, float] | None = None, spectral_norm: str = "none",
                 r1_weight: float = 0.0, r1_every: int = 1, ema_decay: float = 0.0,
                 diffaugment: str = "", n_fixed: int = 64,
                 seed: int = 0) -> None:  # pragma: no mutate block
        super().__init__()
        self.save_hyperparameters()
        check_choice("GAN loss", loss, GAN_LOSSES)
        check_choice("spectral_norm", spectral_norm, SPECTRAL_NORM)
        if r1_weight < 0 or r1_every < 1:
            raise UserError(f"r1_weight={r1_weight}, r1_every={r1_every}: give a weight >= 0 "
                            "and a period of 1 or more discriminator steps")
        if not 0 <= ema_decay < 1:
            raise UserError(f"ema_decay={ema_decay} must be in [0, 1) (0: no EMA)")
        unknown = set(filter(None, diffaugment.split(","))) - set(DIFFAUGMENT_POLICIES)
        if unknown:
            raise UserError(f"diffaugment={diffaugment!r}: unknown part(s) {sorted(unknown)}; "
                            f"give a comma-separated subset of: {', '.join(DIFFAUGMENT_POLICIES)}")
        self.automatic_optimization = False
        self.image_shape = as_tuple_shape(image_shape)
        self.n_critic = n_critic if n_critic is not None else N_CRITIC_DEFAULTS[loss]
        self.lr, self.betas = adam_settings(loss, lr, betas)
        self.generator = make_decoder(backbone, self.image_shape, latent_dim, hidden, width)
        # BatchNorm only in the DCGAN discriminator: a gradient penalty is defined per sample,
        # and a spectrally normalised one is Lipschitz-bounded layer by layer without it.
        self.discriminator = make_encoder(
            backbone, self.image_shape, 1, hidden, width,
            batch_norm=(loss == "ns" and spectral_norm == "none"))
        if backbone == "conv":
            self.apply(init_dcgan_weights)
        if spectral_norm != "none":
            spectrally_normalised(self.discriminator)
        if spectral_norm == "both":
            spectrally_normalised(self.generator)
        # The generator's exponential moving average (Yazici et al. 2019), weights and BatchNorm
        # statistics, which evaluation and sampling use when on.
        self.generator_ema = None
        if ema_decay > 0:
            self.generator_ema = AveragedModel(self.generator, use_buffers=True,
                                               multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
            self.generator_ema.requires_grad_(False)
        noise = torch.randn(n_fixed, latent_dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("fixed_noise", noise)

    def sample_provenance(self) -> dict[str, float]:
        """What a sample figure depends on beyond the evaluation settings: the EMA's decay, so
        that an EMA generator's figures are never compared with a raw generator's."""
        return {"generator_ema": self.hparams.ema_decay} if self.generator_ema is not None else {}

    # -- the common surface ------------------------------------------------------------------
    def decode(self, z: Tensor) -> Tensor:
        """Generator images in [0, 1], from the EMA generator when there is one."""
        generator = self.generator if self.generator_ema is None else self.generator_ema
        return (torch.tanh(generator(z)) + 1) / 2

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
    def discriminator_loss(self, real: Tensor, fake: Tensor, with_penalty: bool = True,
                           with_r1: bool = False) -> dict[str, Tensor]:
        """The discriminator's loss and its parts; `with_r1` adds R1 for this step, scaled by
        r1_every (lazy regularisation, Karras et al. 2020, sec. 4: the penalty every N steps
        weighs N times as much)."""
        hp = self.hparams
        real_scores, fake_scores = self.discriminator(real), self.discriminator(fake)
        if hp.loss == "ns":
            terms = {"d_loss": ns_discriminator_loss(real_scores, fake_scores)}
        elif hp.loss == "hinge":
            terms = {"d_loss": hinge_discriminator_loss(real_scores, fake_scores)}
        else:
            critic = wasserstein_critic_loss(real_scores, fake_scores)
            terms = {"d_loss": critic, "wasserstein": -critic}
            if with_penalty:
                terms["gp"] = gradient_penalty(self.discriminator, real, fake)
                terms["d_loss"] = critic + hp.gp_weight * terms["gp"]
        if with_r1:
            terms["r1"] = r1_penalty(self.discriminator, real)
            terms["d_loss"] = terms["d_loss"] + hp.r1_weight / 2 * hp.r1_every * terms["r1"]
        return terms

    def generator_loss(self, fake: Tensor) -> Tensor:
        scores = self.discriminator(fake)
        if self.hparams.loss == "ns":
            return ns_generator_loss(scores)
        if self.hparams.loss == "hinge":
            return hinge_generator_loss(scores)
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

        hp = self.hparams
        # DiffAugment: every image the discriminator sees in training, real or generated
        augment = (lambda images: diff_augment(images, hp.diffaugment)) if hp.diffaugment else (
            lambda images: images)
        terms = self.discriminator_loss(augment(real), augment(fake.detach()),
                                        with_r1=hp.r1_weight > 0 and index % hp.r1_every == 0)
        opt_d.zero_grad(set_to_none=True)
        backward(terms["d_loss"])
        opt_d.step()

        if (index + 1) % self.n_critic == 0:
            g_loss = self.generator_loss(augment(fake))
            opt_g.zero_grad(set_to_none=True)
            backward(g_loss)
            opt_g.step()
            terms["g_loss"] = g_loss
            if self.generator_ema is not None:
                self.generator_ema.update_parameters(self.generator)
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
