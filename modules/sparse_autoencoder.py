"""Sparse autoencoder (SAE): the autoencoder plus selectable, combinable sparsity mechanisms."""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import Tensor

from bench.errors import UserError
from modules.autoencoder import Autoencoder, reconstruction_loss
from modules.family import Family
from modules.steps import RECONSTRUCTION_FIGURES

SPARSITY_MECHANISMS = ("l1", "kl", "topk", "input_mask")


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


def mask_inputs(x: Tensor, fraction: float) -> Tensor:
    """Zero each pixel independently with probability `fraction` (the same pixel across
    channels), for the masked-input variant that must reconstruct the full image."""
    keep = torch.rand_like(x[:, :1]) >= fraction
    return x * keep


class SparseAutoencoder(Autoencoder):
    """Autoencoder with sparse codes. `sparsity` names one or more of
    `l1` (loss + l1_weight * mean |h|, ReLU codes), `kl` (sigmoid codes, loss +
    kl_weight * sum_j KL(kl_rho || rho_hat_j)), `topk` (keep the `k` largest codes per image, with
    the AuxK loss on dead latents when `aux_k` > 0) and `input_mask` (train on inputs with a
    fraction `mask_fraction` of pixels zeroed). Codes are sigmoid with `kl`, else ReLU.
    """

    family = Family(
        name="sae", summary="AE + l1 / kl / topk (AuxK) / input_mask sparsity",
        variants="backbone mlp|conv; sparsity l1|kl|topk|input_mask, combinable",
        judged_metrics=RECONSTRUCTION_FIGURES + ("l0", "dead_fraction"),
        reconstructs=True, codes=True, samples=True,
        perf_params=MappingProxyType({"sparsity": "topk", "k": 8}))

    def __init__(self, backbone: str = "mlp", image_shape: tuple[int, int, int] = (1, 28, 28),
                 latent_dim: int = 32, hidden: int = 64, width: int = 32, loss: str = "mse",
                 lr: float = 1e-3, sparsity: str | list[str] = "l1", l1_weight: float = 1e-3,
                 kl_rho: float = 0.05, kl_weight: float = 0.1, k: int = 8, aux_k: int = 0,
                 aux_weight: float = 1 / 32, dead_after_images: int = 20000,
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
        if "topk" in self.mechanisms and not 0 < k <= latent_dim:
            raise UserError(f"k={k} must be in [1, latent_dim={latent_dim}]")
        if not 0 <= mask_fraction < 1:
            raise UserError(f"mask_fraction={mask_fraction} must be in [0, 1)")
        # Images seen since each latent last fired; AuxK revives the ones past the threshold.
        self.register_buffer("images_since_active", torch.zeros(latent_dim, dtype=torch.long))

    def code_activation(self, pre_codes: Tensor) -> Tensor:
        codes = torch.sigmoid(pre_codes) if "kl" in self.mechanisms else pre_codes.relu()
        if "topk" in self.mechanisms:
            codes = topk_activation(codes if "kl" in self.mechanisms else pre_codes,
                                    self.hparams.k)
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
        if "topk" in self.mechanisms and hp.aux_k > 0 and self.training:
            terms["aux_k"] = hp.aux_weight * self._aux_k_loss(x, pre_codes, codes, logits)
        terms["loss"] = sum(terms.values())
        return terms

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
