"""Sparse autoencoder (SAE): the autoencoder plus selectable, combinable sparsity mechanisms:
the legacy ones (L1, KL-rho, top-k) and those SAELens calls its state of the art (BatchTopK,
JumpReLU, Matryoshka)."""

from __future__ import annotations

import math
from types import MappingProxyType

import torch
from torch import Tensor, nn

from bench.errors import UserError
from modules.autoencoder import Autoencoder, reconstruction_loss
from modules.family import Family
from modules.steps import RECONSTRUCTION_FIGURES

SPARSITY_MECHANISMS = ("l1", "kl", "topk", "batchtopk", "jumprelu", "matryoshka", "input_mask")
# Each sets the code activation, so a model takes one of them at most.
ACTIVATIONS = ("topk", "batchtopk", "jumprelu")


def l1_penalty(codes: Tensor) -> Tensor:
    """mean |h| over images and code units (the lambda weight is applied by the caller)."""
    return codes.abs().mean()


def kl_sparsity_penalty(codes: Tensor, rho: float, eps: float = 1e-6) -> Tensor:
    """sum_j KL(rho || rho_hat_j) = sum_j rho log(rho / rho_hat_j)
    + (1 - rho) log((1 - rho) / (1 - rho_hat_j)), with rho_hat_j the batch mean activation of
    sigmoid unit j (Ng, "Sparse autoencoder", CS294A lecture notes, 2011). Zero at rho_hat = rho."""
    rho_hat = codes.mean(dim=0).clamp(eps, 1 - eps)
    return (rho * torch.log(rho / rho_hat)
            + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


def topk_activation(pre_codes: Tensor, k: int) -> Tensor:
    """ReLU of the k largest pre-activations per image; every other unit is zero (Makhzani & Frey
    2013; Gao et al. 2024, "Scaling and evaluating sparse autoencoders")."""
    values, indices = pre_codes.topk(k, dim=-1)
    return torch.zeros_like(pre_codes).scatter(-1, indices, values.relu())


def batch_topk_activation(pre_codes: Tensor, k: int) -> Tensor:
    """ReLU of the k x B largest pre-activations over the whole batch of B images, every other
    unit zero: the images share a budget of k active units on average, so one image may take
    more and another fewer (BatchTopK; Bussmann, Leask and Nanda 2024, eq. 2)."""
    flat = pre_codes.relu().flatten()
    values, indices = flat.topk(k * len(pre_codes))
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre_codes)


def min_positive(codes: Tensor) -> Tensor:
    """The smallest non-zero code of the batch (inf when none fires): BatchTopK's estimate of
    the threshold its batch selection amounts to (Bussmann et al. 2024, sec. 3)."""
    return codes.masked_fill(codes <= 0, math.inf).min()


def jump_relu(pre_codes: Tensor, threshold: Tensor) -> Tensor:
    """z H(z - theta): each unit passes its value where it exceeds its threshold, else 0
    (Rajamanoharan et al. 2024, eq. 3)."""
    return pre_codes * (pre_codes > threshold)


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 for |u| < 1/2, else 0: the kernel of JumpReLU's pseudo-derivatives."""
    return ((u > -0.5) & (u < 0.5)).to(u)


class JumpReLU(torch.autograd.Function):
    """z H(z - theta) per unit (Rajamanoharan et al. 2024, "Jumping Ahead", eq. 3). Backward:
    dz as for a ReLU above the threshold, and the straight-through pseudo-derivative
    d/dtheta = -(theta / eps) K((z - theta) / eps) (their eq. 11), summed over the batch."""

    @staticmethod
    def forward(ctx, pre_codes: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_codes, threshold)
        ctx.bandwidth = bandwidth
        return jump_relu(pre_codes, threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre_codes, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = (-(threshold / eps) * rectangle((pre_codes - threshold) / eps)
                          * grad).sum(dim=0)
        return (pre_codes > threshold) * grad, grad_threshold, None


class Step(torch.autograd.Function):
    """H(z - theta), the indicator that a unit fires (counted by the L0 penalty). Backward: no
    gradient to z, and d/dtheta = -(1 / eps) K((z - theta) / eps) (Rajamanoharan et al. 2024,
    eq. 12): the derivative of the step smoothed by the rectangle kernel of width eps."""

    @staticmethod
    def forward(ctx, pre_codes: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre_codes, threshold)
        ctx.bandwidth = bandwidth
        return (pre_codes > threshold).to(pre_codes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre_codes, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = (-(1.0 / eps) * rectangle((pre_codes - threshold) / eps)
                          * grad).sum(dim=0)
        return None, grad_threshold, None


def jumprelu_l0(pre_codes: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """mean over images of sum_j H(z_j - theta_j): the L0 penalty of JumpReLU SAEs, trained
    through `Step`'s straight-through estimator (the weight is applied by the caller)."""
    return Step.apply(pre_codes, threshold, bandwidth).sum(dim=-1).mean()


def target_l0_penalty(l0: Tensor, target: float) -> Tensor:
    """(L0 / target - 1)^2, L0 the batch's mean count of firing units: the penalty that holds a
    JumpReLU SAE near a chosen L0 instead of trading it off (the `target_l0` of Marks et al.'s
    dictionary_learning JumpReLU trainer; the weight is applied by the caller)."""
    return (l0 / target - 1).pow(2)


def prefix_mask(codes: Tensor, size: int) -> Tensor:
    """The codes with every unit from `size` on zeroed: a Matryoshka prefix of the dictionary."""
    keep = torch.arange(codes.shape[-1], device=codes.device) < size
    return codes * keep


def mask_inputs(x: Tensor, fraction: float) -> Tensor:
    """Zero each pixel independently with probability `fraction` (the same pixel across
    channels), for the masked-input variant that must reconstruct the full image."""
    keep = torch.rand_like(x[:, :1]) >= fraction
    return x * keep


class SparseAutoencoder(Autoencoder):
    """Autoencoder with sparse codes. `sparsity` names one or more of
    `l1` (loss + l1_weight * mean |h|, ReLU codes), `kl` (sigmoid codes, loss +
    kl_weight * sum_j KL(kl_rho || rho_hat_j)), `topk` (keep the `k` largest codes per image, with
    the AuxK loss on dead latents when `aux_k` > 0), `batchtopk` (keep the k x B largest codes of
    a training batch; at evaluation every code above a threshold tracked in training as a moving
    average, rate `threshold_lr`, of the batch's smallest kept code; AuxK as for top-k),
    `jumprelu` (a learned threshold per unit, loss + l0_weight * L0 trained through a
    straight-through estimator of bandwidth `jumprelu_bandwidth`, the thresholds at
    `jumprelu_threshold_lr`; with `jumprelu_target_l0`, loss + l0_weight * (L0 / target - 1)^2
    instead), `matryoshka` (on topk or
    batchtopk: the codes cut to each size in `prefixes` must reconstruct too, loss + the sum of
    their reconstruction losses) and `input_mask` (train on inputs with a fraction
    `mask_fraction` of pixels zeroed). Codes are sigmoid with `kl`, else ReLU.
    """

    family = Family(
        name="sae",
        summary="AE + l1 / kl / topk (AuxK) / batchtopk / jumprelu / matryoshka / input_mask",
        variants="backbone mlp|conv; sparsity "
                 + "|".join(m for m in SPARSITY_MECHANISMS if m != "matryoshka")
                 + ", +matryoshka on topk|batchtopk",
        judged_metrics=RECONSTRUCTION_FIGURES + ("l0", "dead_fraction"),
        reconstructs=True, codes=True, samples=True,
        perf_params=MappingProxyType({"sparsity": "topk", "k": 8}))

    def __init__(self, backbone: str = "mlp", image_shape: tuple[int, int, int] = (1, 28, 28),
                 latent_dim: int = 32, hidden: int = 64, width: int = 32, loss: str = "mse",
                 lr: float = 1e-3, sparsity: str | list[str] = "l1", l1_weight: float = 1e-3,
                 kl_rho: float = 0.05, kl_weight: float = 0.1, k: int = 8, aux_k: int = 0,
                 aux_weight: float = 1 / 32, dead_after_images: int = 20000,
                 threshold_lr: float = 0.01, l0_weight: float = 1e-3,
                 jumprelu_bandwidth: float = 0.05, jumprelu_init_threshold: float = 1e-3,
                 jumprelu_threshold_lr: float = 0.02, jumprelu_target_l0: float | None = None,
                 prefixes: list[int] | None = None,
                 mask_fraction: float = 0.25, gmm_components: int = 10,
                 gmm_max_samples: int = 20000, seed: int = 0) -> None:  # pragma: no mutate block
        super().__init__(backbone=backbone, image_shape=image_shape, latent_dim=latent_dim,
                         hidden=hidden, width=width, loss=loss, lr=lr,
                         gmm_components=gmm_components, gmm_max_samples=gmm_max_samples,
                         seed=seed)
        self.save_hyperparameters()
        names = sparsity.replace("+", ",").split(",") if isinstance(sparsity, str) else sparsity
        self.mechanisms = tuple(name.strip() for name in names if name.strip())
        unknown = set(self.mechanisms) - set(SPARSITY_MECHANISMS)
        if unknown or not self.mechanisms:
            raise UserError(f"unknown sparsity {sorted(unknown) or sparsity!r}; choose one or more "
                             f"of: {', '.join(SPARSITY_MECHANISMS)} (e.g. 'topk,input_mask')")
        activations = [m for m in self.mechanisms if m in ACTIVATIONS]
        if len(activations) > 1 or (activations and activations[0] != "topk"
                                    and "kl" in self.mechanisms):
            raise UserError(f"sparsity {'+'.join(self.mechanisms)}: "
                            f"{', '.join(activations + ['kl'] * ('kl' in self.mechanisms))} "
                            "each set the code activation; take one (kl combines with topk only)")
        if {"topk", "batchtopk"} & set(self.mechanisms) and not 0 < k <= latent_dim:
            raise UserError(f"k={k} must be in [1, latent_dim={latent_dim}]")
        if not 0 <= mask_fraction < 1:
            raise UserError(f"mask_fraction={mask_fraction} must be in [0, 1)")
        if jumprelu_target_l0 is not None and not 0 < jumprelu_target_l0 <= latent_dim:
            raise UserError(f"jumprelu_target_l0={jumprelu_target_l0} must be in (0, latent_dim="
                            f"{latent_dim}]")
        self.prefix_sizes = self._prefix_sizes(prefixes, latent_dim)
        # Images seen since each latent last fired; AuxK revives the ones past the threshold.
        self.register_buffer("images_since_active", torch.zeros(latent_dim, dtype=torch.long))
        if "batchtopk" in self.mechanisms:  # the evaluation threshold, a buffer: it resumes
            self.register_buffer("batchtopk_threshold", torch.zeros(()))
        if "jumprelu" in self.mechanisms:
            # theta itself (SAELens trains log theta), at a learning rate of its own: Adam moves
            # a parameter by about lr a step whatever the gradient's size, and on these budgets
            # (thousands of steps, codes of order 1) theta at the model's lr would stay where
            # the budget leaves it, not where the sparsity coefficient balances reconstruction
            self.threshold = nn.Parameter(torch.full((latent_dim,), jumprelu_init_threshold))

    def _prefix_sizes(self, prefixes: list[int] | None, latent_dim: int) -> tuple[int, ...]:
        """Matryoshka's nested dictionary sizes below the whole (a quarter and a half of it
        unless given), checked."""
        if "matryoshka" not in self.mechanisms:
            return ()
        if not {"topk", "batchtopk"} & set(self.mechanisms):
            raise UserError("sparsity matryoshka needs a base: give 'topk,matryoshka' or "
                            "'batchtopk,matryoshka'")
        sizes = tuple(prefixes) if prefixes else (latent_dim // 4, latent_dim // 2)
        if list(sizes) != sorted(set(sizes)) or not all(0 < s < latent_dim for s in sizes):
            raise UserError(f"prefixes={list(sizes)} must increase, each in [1, latent_dim="
                            f"{latent_dim}) (the whole dictionary is always the last)")
        return sizes

    def configure_optimizers(self):
        """Adam at `lr`; JumpReLU's thresholds at `jumprelu_threshold_lr`."""
        if "jumprelu" not in self.mechanisms:
            return super().configure_optimizers()
        rest = [p for name, p in self.named_parameters() if name != "threshold"]
        return torch.optim.Adam([{"params": rest}, {"params": [self.threshold],
                                                    "lr": self.hparams.jumprelu_threshold_lr}],
                                lr=self.hparams.lr)

    def code_activation(self, pre_codes: Tensor) -> Tensor:
        hp = self.hparams
        if "batchtopk" in self.mechanisms:
            if self.training:
                return batch_topk_activation(pre_codes, hp.k)
            return jump_relu(pre_codes.relu(), self.batchtopk_threshold)
        if "jumprelu" in self.mechanisms:
            return JumpReLU.apply(pre_codes, self.threshold, hp.jumprelu_bandwidth)
        codes = torch.sigmoid(pre_codes) if "kl" in self.mechanisms else pre_codes.relu()
        if "topk" in self.mechanisms:
            codes = topk_activation(codes if "kl" in self.mechanisms else pre_codes, hp.k)
        return codes

    def losses(self, x: Tensor) -> dict[str, Tensor]:
        hp = self.hparams
        x_in = mask_inputs(x, hp.mask_fraction) if ("input_mask" in self.mechanisms
                                                    and self.training) else x
        pre_codes = self.encoder(x_in)
        codes = self.code_activation(pre_codes)
        logits = self.decode_logits(codes)
        recon = reconstruction_loss(logits, x, hp.loss)
        terms = {"recon": recon}
        if "l1" in self.mechanisms:
            terms["l1"] = hp.l1_weight * l1_penalty(codes)
        if "kl" in self.mechanisms:
            terms["kl_sparsity"] = hp.kl_weight * kl_sparsity_penalty(codes, hp.kl_rho)
        if "jumprelu" in self.mechanisms:
            l0 = jumprelu_l0(pre_codes, self.threshold, hp.jumprelu_bandwidth)
            if hp.jumprelu_target_l0 is not None:
                l0 = target_l0_penalty(l0, hp.jumprelu_target_l0)
            terms["l0"] = hp.l0_weight * l0
        if self.prefix_sizes:
            terms["matryoshka"] = sum(
                reconstruction_loss(self.decode_logits(prefix_mask(codes, size)), x, hp.loss)
                for size in self.prefix_sizes)
        if ({"topk", "batchtopk"} & set(self.mechanisms)) and hp.aux_k > 0 and self.training:
            terms["aux_k"] = hp.aux_weight * self._aux_k_loss(x, pre_codes, codes, logits)
        if "batchtopk" in self.mechanisms and self.training:
            self._track_threshold(codes)
        terms["loss"] = sum(terms.values())
        return terms

    @torch.no_grad()
    def _track_threshold(self, codes: Tensor) -> None:
        """theta <- (1 - r) theta + r min_positive(batch): the moving average (SAELens'
        `topk_threshold_lr`) that BatchTopK evaluates with, so that an image's code does not
        depend on the batch it comes in. A batch where nothing fires leaves it alone."""
        smallest = min_positive(codes)
        rate = self.hparams.threshold_lr
        self.batchtopk_threshold.copy_(torch.where(
            smallest.isfinite(), (1 - rate) * self.batchtopk_threshold + rate * smallest,
            self.batchtopk_threshold))

    def _aux_k_loss(self, x: Tensor, pre_codes: Tensor, codes: Tensor, logits: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024, sec. 2.4): the top `aux_k` dead latents must reconstruct the
        residual e = x - x_hat. The paper's decoder is linear, so e_hat = W_dec z_aux; for our
        nonlinear decoders e_hat is the change of the output when z_aux is added to the codes."""
        with torch.no_grad():
            self.images_since_active += len(x)
            self.images_since_active[(codes > 0).any(dim=0)] = 0
            dead = self.images_since_active > self.hparams.dead_after_images
        # The dead latents' raw pre-activations, without the ReLU: theirs are mostly negative, and
        # a ReLU would give them no gradient, so nothing could revive them. No host sync: the
        # alive latents are -inf, picked only when fewer than aux_k are dead, and zeroed.
        values, indices = pre_codes.masked_fill(~dead, float("-inf")).topk(
            min(self.hparams.aux_k, pre_codes.shape[-1]), dim=-1)
        z_aux = torch.zeros_like(pre_codes).scatter(
            -1, indices, values.masked_fill(values == float("-inf"), 0.0))
        x_hat = torch.sigmoid(logits).detach()
        e_hat = torch.sigmoid(self.decode_logits(codes.detach() + z_aux)) - x_hat
        return (e_hat - (x - x_hat)).pow(2).mean() * dead.any()
