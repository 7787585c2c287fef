"""Vector-quantised autoencoder (VQ-VAE; van den Oord, Vinyals and Kavukcuoglu 2017): codes are
entries of a learned codebook, trained through the straight-through estimator, the codebook by
its loss term or by exponential moving averages; samples come from a prior over the codes."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric as TorchMetric

from bench.errors import UserError, check_choice
from bench.metrics import SPLIT, Metric
from modules.autoencoder import RECON_LOSSES, reconstruction_loss
from modules.family import Family
from modules.nets import as_tuple_shape, make_decoder, make_encoder
from modules.steps import RECONSTRUCTION_FIGURES, FitsLatentDensity, LossSteps, first_tensor

CODEBOOK_UPDATES = ("ema", "loss")
CODE_PRIORS = ("empirical", "uniform")
CODEBOOK_INITS = ("data", "normal")


def nearest_codes(vectors: Tensor, codebook: Tensor) -> Tensor:
    """argmin_j ||v - e_j||^2 for each row v of `vectors` (N x D) against the codebook's rows
    e_j (K x D), computed as ||v||^2 - 2 v.e_j + ||e_j||^2: indices (N,), long."""
    distances = (vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ codebook.T
                 + codebook.pow(2).sum(1))
    return distances.argmin(1)


def straight_through(z_e: Tensor, z_q: Tensor) -> Tensor:
    """z_q in the forward pass, the gradient of z_q passed to z_e unchanged in the backward:
    z_e + sg(z_q - z_e) (van den Oord et al. 2017, sec. 3.1)."""
    return z_e + (z_q - z_e).detach()


def vq_loss_terms(z_e: Tensor, z_q: Tensor) -> tuple[Tensor, Tensor]:
    """(codebook, commitment) terms of van den Oord et al. 2017, eq. 3, as means over elements:
    ||sg(z_e) - e||^2, which moves the codes to the encoder's outputs, and ||z_e - sg(e)||^2,
    which the loss weighs by beta to keep the encoder near its codes."""
    return F.mse_loss(z_q, z_e.detach()), F.mse_loss(z_e, z_q.detach())


def ema_codebook(cluster_size: Tensor, code_sums: Tensor, counts: Tensor, sums: Tensor,
                 decay: float, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """One EMA update of the codebook (van den Oord et al. 2017, appendix A.1):
    N_j <- decay N_j + (1 - decay) n_j, m_j <- decay m_j + (1 - decay) sum_{i -> j} z_e,i,
    e_j = m_j / N~_j with Laplace-smoothed counts N~_j = (N_j + eps) / (sum N + K eps) sum N
    (as Sonnet's VectorQuantizerEMA), n_j and the sums over the batch's vectors assigned to j.
    Returns (N, m, codebook)."""
    cluster_size = decay * cluster_size + (1 - decay) * counts
    code_sums = decay * code_sums + (1 - decay) * sums
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + len(cluster_size) * eps) * total
    return cluster_size, code_sums, code_sums / smoothed[:, None]


def farthest_point_rows(vectors: Tensor, k: int) -> Tensor:
    """min(k, N) rows of `vectors` (N x D) chosen greedily, each the farthest from those chosen
    before, the first the farthest from their mean: the farthest-point traversal (Gonzalez
    1985), a deterministic seeding that does not depend on the rows' order but for ties."""
    chosen = [int((vectors - vectors.mean(0)).pow(2).sum(1).argmax())]
    distance = (vectors - vectors[chosen[0]]).pow(2).sum(1)
    for _ in range(min(k, len(vectors)) - 1):
        chosen.append(int(distance.argmax()))
        distance = torch.minimum(distance, (vectors - vectors[chosen[-1]]).pow(2).sum(1))
    return vectors[chosen]


def codebook_perplexity(counts: Tensor) -> Tensor:
    """exp(-sum_j p_j log p_j), p_j the share of the vectors assigned to code j (0 log 0 = 0):
    the number of codes a uniform use of the same entropy would need (1 for one code, K for all
    K equally). A tensor on the counts' device: training logs it without a copy to the host."""
    p = counts.double() / counts.sum()
    return torch.special.xlogy(p, p).sum().neg().exp()


def dead_codes(counts: Tensor) -> int:
    """The number of codes no vector was assigned to."""
    return int((counts == 0).sum())


class CodeCounts(TorchMetric):
    """How often each code was assigned, summed across processes: torchmetrics has no bincount
    metric with a fixed length."""

    full_state_update = False

    def __init__(self, codebook_size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("counts", torch.zeros(codebook_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, indices: Tensor) -> None:
        self.counts += torch.bincount(indices.flatten(), minlength=len(self.counts))

    def compute(self) -> Tensor:
        return self.counts


class VQVAE(FitsLatentDensity, LossSteps):
    """x -> z_e = encoder(x), `latent_dim / code_dim` vectors of `code_dim` -> each replaced by
    its nearest of `codebook_size` codes -> decoder. Trained on reconstruction + beta *
    commitment (+ the codebook term with `codebook: loss`), the encoder through the
    straight-through estimator; with `codebook: ema` the codes are moving averages of the
    vectors assigned to them (decay `decay`). With `restart_below` > 0, a code whose moving
    average of assignments per batch falls below it is moved to the batch's vector worst served
    by the codebook (the farthest from its nearest code). The codes start as vectors of the
    first training batch (`codebook_init: data`, by `farthest_point_rows`) or as N(0, 1) draws
    (`normal`), which the encoder's outputs, near zero at first, mostly never reach.

    The vectors come from the backbone's linear head (mlp or conv), not from a spatial grid as
    in the paper's conv model, so both backbones share the codes' layout. Samples decode codes
    drawn position by position from `code_prior`: `empirical`, each position's code
    frequencies on the training split (fitted after training, in buffers), or `uniform`.
    Neither is the paper's PixelCNN prior: the positions are drawn independently, which keeps
    sample figures honest about what they measure (the codebook and decoder, not a prior).
    """

    family = Family(
        name="vqvae", summary="codebook by EMA or loss, straight-through; samples from a code prior",
        variants=f"backbone mlp|conv; codebook {'|'.join(CODEBOOK_UPDATES)}; codebook_init "
                 f"{'|'.join(CODEBOOK_INITS)}; code_prior {'|'.join(CODE_PRIORS)}; restart_below",
        judged_metrics=RECONSTRUCTION_FIGURES, reconstructs=True, samples=True,
        metrics=(Metric("codebook_perplexity", True, "PPL", SPLIT, "codes", per_run=True),
                 Metric("dead_codes", False, "Dead codes", SPLIT, "codes never assigned",
                        per_run=True)))

    def __init__(self, backbone: str = "mlp", image_shape: tuple[int, int, int] = (1, 28, 28),
                 latent_dim: int = 32, hidden: int = 64, width: int = 32, code_dim: int = 4,
                 codebook_size: int = 64, beta: float = 0.25, codebook: str = "ema",
                 decay: float = 0.99, restart_below: float = 0.0, codebook_init: str = "data",
                 code_prior: str = "empirical",
                 loss: str = "mse", lr: float = 1e-3, seed: int = 0) -> None:  # pragma: no mutate block
        super().__init__()
        self.save_hyperparameters()
        if code_dim < 1 or latent_dim % code_dim:
            raise UserError(f"code_dim={code_dim} must divide latent_dim={latent_dim}: the "
                            "encoder's latent_dim outputs are cut into vectors of code_dim")
        if codebook_size < 2:
            raise UserError(f"codebook_size={codebook_size}: give 2 codes or more")
        check_choice("codebook update", codebook, CODEBOOK_UPDATES)
        check_choice("codebook_init", codebook_init, CODEBOOK_INITS)
        check_choice("code_prior", code_prior, CODE_PRIORS)
        check_choice("loss", loss, RECON_LOSSES)
        if not 0 < decay < 1:
            raise UserError(f"decay={decay}: give the moving averages' decay in (0, 1), e.g. 0.99")
        self.image_shape = as_tuple_shape(image_shape)
        self.positions = latent_dim // code_dim
        self.encoder = make_encoder(backbone, self.image_shape, latent_dim, hidden, width)
        self.decoder = make_decoder(backbone, self.image_shape, latent_dim, hidden, width)
        codes = torch.randn(codebook_size, code_dim)
        if codebook == "loss":
            self.codebook = nn.Parameter(codes)
        else:
            self.register_buffer("codebook", codes)
            self.register_buffer("code_sums", codes.clone())
        # the moving average of each code's assignments per batch (the EMA codebook's N_j):
        # starting at one use each, so that an unused code stays where it is (m_j / N_j = e_j),
        # as lucidrains' vector-quantize-pytorch starts them
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("codebook_initialised", torch.tensor(False))
        self.register_buffer("prior_counts", torch.zeros(self.positions, codebook_size))
        self.register_buffer("prior_fitted", torch.tensor(False))

    # -- the common surface ------------------------------------------------------------------
    def pre_quantization(self, x: Tensor) -> Tensor:
        """The encoder's vectors z_e: B x positions x code_dim."""
        return self.encoder(x).unflatten(1, (self.positions, self.hparams.code_dim))

    def code_indices(self, x: Tensor) -> Tensor:
        """The code of each position: B x positions, long."""
        z_e = self.pre_quantization(x)
        return nearest_codes(z_e.flatten(0, 1), self.codebook).view(z_e.shape[:2])

    def encode(self, x: Tensor) -> Tensor:
        """The quantised codes z_q, flattened: B x latent_dim."""
        return self.codebook[self.code_indices(x)].flatten(1)

    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(z))

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)

    # -- training ------------------------------------------------------------------------------
    def losses(self, x: Tensor) -> dict[str, Tensor]:
        hp = self.hparams
        z_e = self.pre_quantization(x)
        flat = z_e.flatten(0, 1)
        if self.training and self.hparams.codebook_init == "data" and not self.codebook_initialised:
            with torch.no_grad():
                self._initialise_codebook(flat.detach())
        indices = nearest_codes(flat.detach(), self.codebook)
        z_q = self.codebook[indices].view_as(z_e)
        logits = self.decoder(straight_through(z_e, z_q).flatten(1))
        recon = reconstruction_loss(logits, x, hp.loss)
        codebook_term, commitment = vq_loss_terms(z_e, z_q)
        loss = recon + hp.beta * commitment
        terms = {"recon": recon, "commitment": commitment}
        if hp.codebook == "loss":
            loss = loss + codebook_term
            terms["codebook"] = codebook_term
        if self.training:
            self._update_codebook(flat.detach(), indices)
        counts = torch.bincount(indices, minlength=hp.codebook_size)
        return {"loss": loss, **terms,
                "perplexity": codebook_perplexity(counts).to(loss.dtype)}

    @torch.no_grad()
    def _update_codebook(self, vectors: Tensor, indices: Tensor) -> None:
        """The moving averages of each code's assignments (and, with the EMA codebook, of their
        vectors) from every process's batch, then the restarts: every process makes the same
        update, the one a single process makes with the whole batch."""
        hp = self.hparams
        assigned = F.one_hot(indices, hp.codebook_size).to(vectors.dtype)  # N x K
        counts, sums = self._sum_over_processes(assigned.sum(0), assigned.T @ vectors)
        if hp.codebook == "ema":
            size, code_sums, codebook = ema_codebook(self.cluster_size, self.code_sums, counts,
                                                     sums, hp.decay)
            self.code_sums.copy_(code_sums)
            self.codebook.copy_(codebook)
        else:
            size = hp.decay * self.cluster_size + (1 - hp.decay) * counts
        self.cluster_size.copy_(size)
        if hp.restart_below > 0:
            dead = (self.cluster_size < hp.restart_below).nonzero().flatten()
            if len(dead):  # the same on every process: cluster_size is
                self._restart(dead, vectors)

    def _restart(self, dead: Tensor, vectors: Tensor) -> None:
        """Move the dead codes to the vectors of every process's batch farthest from their
        nearest code, the farthest first (as many as the batch has)."""
        vectors = self._gather_rows(vectors)
        codebook = self.codebook.data
        farthest = (vectors - codebook[nearest_codes(vectors, codebook)]).pow(2).sum(1)
        dead = dead[: len(vectors)]
        chosen = vectors[farthest.topk(len(dead)).indices]
        codebook[dead] = chosen
        self.cluster_size[dead] = 1.0
        if self.hparams.codebook == "ema":
            self.code_sums[dead] = chosen

    def _initialise_codebook(self, vectors: Tensor) -> None:
        """The codes become vectors of the first batch (of every process), spread out by
        `farthest_point_rows`, so that no code starts far from the encoder's outputs, where it
        would never be assigned (the usual remedy, as k-means seeding in Dhariwal et al. 2020's
        Jukebox and lucidrains' vector-quantize-pytorch)."""
        chosen = farthest_point_rows(self._gather_rows(vectors), self.hparams.codebook_size)
        self.codebook.data[: len(chosen)] = chosen
        if self.hparams.codebook == "ema":
            self.code_sums[: len(chosen)] = chosen
        self.codebook_initialised.fill_(True)

    def _sum_over_processes(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        if self.world_size() > 1:
            for tensor in tensors:
                torch.distributed.all_reduce(tensor)
        return tensors

    def _gather_rows(self, rows: Tensor) -> Tensor:
        """Every process's rows (of any number), in rank order; `rows` alone in one process."""
        world = self.world_size()
        if world == 1:
            return rows
        sizes = [torch.zeros((), dtype=torch.long, device=rows.device) for _ in range(world)]
        torch.distributed.all_gather(sizes, torch.tensor(len(rows), device=rows.device))
        longest = int(max(sizes))
        padded = rows.new_zeros(longest, *rows.shape[1:])
        padded[: len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([part[: int(size)] for part, size in zip(parts, sizes)])

    # -- the code prior (after training: FitsLatentDensity) ----------------------------------
    @torch.no_grad()
    def fit_latent_density(self, batches) -> None:
        """Count each position's codes over the training batches (under DDP each process's
        shard, summed): the empirical code prior."""
        was_training = self.training
        self.eval()
        counts = torch.zeros_like(self.prior_counts)
        for batch in batches:
            indices = self.code_indices(first_tensor(batch).to(self.device))  # B x positions
            counts += F.one_hot(indices, self.hparams.codebook_size).sum(0)
        self._sum_over_processes(counts)
        self.prior_counts.copy_(counts)
        self.prior_fitted.fill_(True)
        self.train(was_training)

    def code_prior_probabilities(self) -> Tensor:
        """positions x codebook_size: each position's code probabilities."""
        if self.hparams.code_prior == "uniform":
            return torch.ones_like(self.prior_counts)
        if not bool(self.prior_fitted):
            raise RuntimeError("this VQ-VAE has no code prior yet: train it with bench run or a "
                               "Lightning Trainer and a datamodule, call "
                               "fit_latent_density(train_batches), or use code_prior='uniform'")
        return self.prior_counts

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n images in [0, 1] decoded from codes drawn independently at each position from the
        code prior (global RNG)."""
        indices = torch.multinomial(self.code_prior_probabilities(), n, replacement=True).T
        return self.decode(self.codebook[indices].flatten(1))

    # -- its own figures -----------------------------------------------------------------------
    @torch.inference_mode()
    def own_metrics(self, batches) -> dict[str, float]:
        """codebook_perplexity and dead_codes of the codes assigned over the test split."""
        counts = CodeCounts(self.hparams.codebook_size).to(self.device)
        for x, _ in batches:
            counts.update(self.code_indices(x.to(self.device)))
        total = counts.compute()
        return {"codebook_perplexity": codebook_perplexity(total).item(),
                "dead_codes": dead_codes(total)}
