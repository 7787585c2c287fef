"""Autoencoder (AE) with MSE or BCE reconstruction, and ex-post Gaussian-mixture sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, distributions

from bench.errors import UserError, check_choice
from modules.nets import as_tuple_shape, decoder_directions, make_decoder, make_encoder
from modules.family import Family
from modules.steps import RECONSTRUCTION_FIGURES, FitsLatentDensity, LossSteps, first_tensor

RECON_LOSSES = ("mse", "bce")


def reconstruction_loss(logits: Tensor, x: Tensor, kind: str = "mse") -> Tensor:
    """Mean over images and pixels. `mse`: (x - sigmoid(logits))^2; `bce`: binary cross-entropy
    of x against sigmoid(logits), computed on logits for stability (x in [0, 1])."""
    if kind == "mse":
        return F.mse_loss(torch.sigmoid(logits), x)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, x)
    raise UserError(f"unknown reconstruction loss {kind!r}; choose one of: {', '.join(RECON_LOSSES)}")


class Autoencoder(FitsLatentDensity, LossSteps):
    """Deterministic autoencoder x -> h = encode(x) -> x_hat = decode(h).

    After training (`on_train_end`), a Gaussian mixture is fitted to the training codes so the
    model can generate: `sample(n)` decodes draws from it (ex-post density estimation, Ghosh et
    al. 2020, "From Variational to Deterministic Autoencoders"). The mixture lives in buffers,
    so checkpoints carry it.
    """

    # It is trained to reconstruct; its samples (a mixture fitted to the codes) and the sparsity
    # of its codes are descriptive.
    family = Family(
        name="ae", summary="MSE or BCE reconstruction; samples via a latent Gaussian mixture",
        variants="backbone mlp|conv; loss mse|bce", judged_metrics=RECONSTRUCTION_FIGURES,
        reconstructs=True, codes=True, samples=True)

    def __init__(self, backbone: str = "mlp", image_shape: tuple[int, int, int] = (1, 28, 28),
                 latent_dim: int = 32, hidden: int = 64, width: int = 32, loss: str = "mse",
                 lr: float = 1e-3, gmm_components: int = 10, gmm_max_samples: int = 20000,
                 seed: int = 0) -> None:  # pragma: no mutate block
        super().__init__()
        self.save_hyperparameters()
        check_choice("loss", loss, RECON_LOSSES)
        self.image_shape = as_tuple_shape(image_shape)
        self.encoder = make_encoder(backbone, self.image_shape, latent_dim, hidden, width)
        self.decoder = make_decoder(backbone, self.image_shape, latent_dim, hidden, width)
        k, d = gmm_components, latent_dim
        self.register_buffer("gmm_logits", torch.zeros(k))
        self.register_buffer("gmm_means", torch.zeros(k, d))
        self.register_buffer("gmm_scale_tril", torch.eye(d).repeat(k, 1, 1))
        self.register_buffer("gmm_fitted", torch.tensor(False))

    def training_images_needed(self) -> dict[str, int]:
        """Training images it needs at least, by the setting that asks for them: the latent
        mixture fitted after training needs one per component."""
        return {"gmm_components": self.hparams.gmm_components}

    # -- the common surface ------------------------------------------------------------------
    def code_activation(self, pre_codes: Tensor) -> Tensor:
        """Codes are the encoder's linear output; the sparse AE overrides this."""
        return pre_codes

    def encode(self, x: Tensor) -> Tensor:
        return self.code_activation(self.encoder(x))

    def decode_logits(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.decode_logits(z))

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def decoder_directions(self) -> Tensor:
        """The direction each code unit writes into the decoder (`nets.decoder_directions`)."""
        return decoder_directions(self.decoder)

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)

    # -- training ------------------------------------------------------------------------------
    def losses(self, x: Tensor) -> dict[str, Tensor]:
        """Named loss terms for a batch; "loss" is what the optimiser minimises."""
        recon = reconstruction_loss(self.decode_logits(self.encode(x)), x, self.hparams.loss)
        return {"loss": recon, "recon": recon}

    # -- ex-post density estimation (after training: FitsLatentDensity) ---------------------
    @torch.no_grad()
    def fit_latent_density(self, batches) -> None:
        """Fit a full-covariance Gaussian mixture (scikit-learn's EM) to the codes of the first
        `gmm_max_samples` training images in the split's fixed order. Under DDP each rank holds
        images rank, rank + W, ... of that order (TensorBatches' evaluation sharding): every rank
        encodes its part of the first `gmm_max_samples`, the codes are gathered and put back in
        the split's order, and every rank fits the mixture a single process would."""
        from sklearn.mixture import GaussianMixture

        was_training = self.training
        self.eval()
        limit = self.hparams.gmm_max_samples
        world = self.world_size()
        distributed = world > 1
        # images with split index < limit: at most ceil(limit / W) on each rank
        wanted = -(-limit // world)
        codes, n = [], 0
        for batch in batches:
            x = first_tensor(batch).to(self.device)
            codes.append(self.encode(x).float())
            n += len(x)
            if n >= wanted:
                break
        local = torch.cat(codes)[:wanted]
        if distributed:
            count = self.all_gather(torch.tensor(len(local), device=self.device))  # (W,)
            padded = torch.zeros(wanted, local.shape[1], device=self.device)
            padded[: len(local)] = local
            gathered = self.all_gather(padded)  # W x wanted x D; rank r's j-th is index j*W + r
            in_order = gathered.transpose(0, 1).flatten(0, 1)
            held = (torch.arange(wanted, device=self.device)[:, None] < count[None, :]).flatten()
            local = in_order[held]
        local = local[:limit]
        gmm = GaussianMixture(self.hparams.gmm_components, covariance_type="full",
                              reg_covar=1e-5, random_state=self.hparams.seed)
        gmm.fit(local.double().cpu().numpy())
        as_buffer = lambda a: torch.as_tensor(a, dtype=torch.float32, device=self.device)  # noqa
        self.gmm_logits.copy_(as_buffer(gmm.weights_).log())
        self.gmm_means.copy_(as_buffer(gmm.means_))
        # Cholesky in float64: sklearn's covariances are positive definite there, and a nearly
        # singular one (collapsed codes) can stop being so once rounded to float32.
        scale_tril = torch.linalg.cholesky(torch.as_tensor(gmm.covariances_, dtype=torch.float64))
        self.gmm_scale_tril.copy_(as_buffer(scale_tril))
        self.gmm_fitted.fill_(True)
        self.train(was_training)

    def latent_prior(self) -> distributions.Distribution:
        if not bool(self.gmm_fitted):
            raise RuntimeError("this autoencoder has no latent density yet: train it with "
                               "bench run or a Lightning Trainer and a datamodule, or call "
                               "fit_latent_density(train_batches) first")
        return distributions.MixtureSameFamily(
            distributions.Categorical(logits=self.gmm_logits),
            distributions.MultivariateNormal(self.gmm_means, scale_tril=self.gmm_scale_tril))

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n images in [0, 1] decoded from draws of the fitted latent mixture (global RNG)."""
        return self.decode(self.latent_prior().sample((n,)))
