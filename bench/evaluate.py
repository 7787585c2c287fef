"""Evaluation on the test split: reconstruction, code sparsity, likelihood bounds and generation
metrics, each defined as docs/metrics.md states and computed by the library that owns it
(torchmetrics for running means, MSE, PSNR and SSIM; torch-fidelity for FID, IS, KID and
precision-recall; prdc for density and coverage). What is computed for a model is what its
family declares (modules/family.py), through the methods the family provides."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt, restricted_number_type
from torch import Tensor
from torchmetrics import MeanMetric, MeanSquaredError, Metric, SumMetric
from torchmetrics.regression import R2Score
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from bench.errors import UserError, unknown_key
from bench.settings import check_settings
from datamodules.image import stream_seed

log = logging.getLogger(__name__)

# KID's subsets and FID's covariance need two images at least
TwoOrMore = restricted_number_type("TwoOrMore", int, (">=", 2))


@dataclass
class EvalSettings:
    """The `eval:` section of a suite; each field's type is what it takes (checked by
    bench.settings), None (null) where said."""

    n_fake: TwoOrMore = 10000  # generated images for FID / IS / KID / PRC
    n_real: PositiveInt | None = None  # test images they are compared with (None: all)
    features: Literal["auto", "inception", "classifier"] = "auto"  # see bench.extractor
    # the classifier: None uses the shipped one (Fashion-MNIST, MNIST) or trains the default;
    # a number trains (and caches) one for that many epochs; a file is used as it is
    extractor_epochs: PositiveInt | None = None
    extractor_weights: str | None = None  # a file written by `bench extractor train`
    inception_weights: str | None = None  # a local inception-v3-compat weights file
    iw_k: NonNegativeInt = 100  # importance samples per image for iw_nll (5000 in the literature)
    iw_images: PositiveInt | None = 1000  # test images for iw_nll (None: all)
    batch_size: PositiveInt = 500
    kid_subset_size: TwoOrMore = 1000
    prc_neighborhood: PositiveInt = 3
    dc_neighborhood: PositiveInt = 5  # k of density and coverage (Naeem et al. 2020 use 5)
    generation: bool = True  # compute FID and friends for families that sample

    @classmethod
    def from_dict(cls, values: dict) -> EvalSettings:
        """The section as a suite (or bench eval's --set) gives it, checked."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(values) - known))
        if unknown:
            raise UserError(unknown_key(unknown[0], known).replace("key", "eval setting", 1))
        check_settings(cls, values, "eval")
        return cls(**values)


# -- sparsity of codes ---------------------------------------------------------------------------
def l0_count(codes: Tensor) -> Tensor:
    """Number of code units with |h| > 0, per image."""
    return (codes != 0).sum(dim=-1).float()


def hoyer_sparsity(codes: Tensor) -> Tensor:
    """Hoyer (2004) sparsity per image: (sqrt(n) - ||h||_1 / ||h||_2) / (sqrt(n) - 1), in [0, 1];
    0 when all units are equal in magnitude, 1 when one unit is non-zero. An all-zero code
    counts as 1 (nothing is active)."""
    n = codes.shape[-1]
    l1, l2 = codes.abs().sum(-1), codes.norm(dim=-1)
    ratio = torch.where(l2 > 0, l1 / l2.clamp_min(1e-12), torch.ones_like(l1))
    return (math.sqrt(n) - ratio) / (math.sqrt(n) - 1)


# A latent is dense when it fires on more than this share of images (SAEBench's threshold).
DENSE_FIRING_RATE = 0.1


class FiringRates(Metric):
    """Per code unit, the share of images on which it is non-zero: counts summed over batches
    and processes (torchmetrics has no such metric). `dead_fraction` and `dense_fraction` are
    read off it."""

    full_state_update = False

    def __init__(self, num_units: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("fires", torch.zeros(num_units, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        self.fires += (codes != 0).sum(dim=0)
        self.images += len(codes)

    def compute(self) -> Tensor:
        return self.fires.double() / self.images


def dead_fraction(firing_rates: Tensor) -> float:
    """Share of code units that fire on no image."""
    return (firing_rates == 0).double().mean().item()


def dense_fraction(firing_rates: Tensor, threshold: float = DENSE_FIRING_RATE) -> float:
    """Share of code units that fire on more than `threshold` of the images: dense latents
    (SAEBench, Karvonen et al. 2025; with sigmoid or dense codes every unit is dense)."""
    return (firing_rates > threshold).double().mean().item()


def image_norm_ratio(x_hat: Tensor, x: Tensor) -> Tensor:
    """||x_hat_i||_2 / ||x_i||_2 per image i with ||x_i|| > 0 (SAEBench's l2_ratio): below 1 the
    reconstruction is shrunk toward zero, as an L1 penalty shrinks codes."""
    norms = x.flatten(1).norm(dim=1)
    keep = norms > 0
    return x_hat.flatten(1)[keep].norm(dim=1) / norms[keep]


def max_decoder_cosine(directions: Tensor) -> float:
    """max_{i != j} cos(d_i, d_j) over the columns d_j of `directions` (features x units), the
    direction each code unit writes into the decoder: near 1, two units duplicate one feature.
    A column of zeros (a unit the decoder ignores) has no direction and is left out."""
    norms = directions.norm(dim=0)
    unit = directions[:, norms > 0] / norms[norms > 0]
    if unit.shape[1] < 2:
        return float("nan")
    cosine = unit.T @ unit
    cosine.fill_diagonal_(-math.inf)
    return cosine.max().item()


# -- the parts ---------------------------------------------------------------------------------
@torch.inference_mode()
def reconstruction_metrics(model, batches, count_codes: bool = True) -> dict[str, float]:
    """recon_mse (mean over images and pixels of (x - x_hat)^2), psnr (mean over images of the
    per-image PSNR, data_range 1), ssim (data_range 1), fvu (sum_i ||x_i - x_hat_i||^2 /
    sum_i ||x_i - mean_x||^2 over the split: torchmetrics' variance-weighted R^2, subtracted
    from 1), shrinkage (mean of `image_norm_ratio`), and, with `count_codes`, code sparsity: l0,
    dead_fraction, dense_fraction, hoyer, and max_decoder_cosine of the model's
    `decoder_directions()`."""
    device = model.device
    mse = MeanSquaredError().to(device)
    psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    shrinkage = MeanMetric().to(device)
    l0, hoyer, r2, firing = MeanMetric().to(device), MeanMetric().to(device), None, None
    for x, _ in batches:
        x = x.to(device)
        codes = model.encode(x)
        x_hat = model.decode(codes)
        mse.update(x_hat, x)
        psnr.update(x_hat, x)
        ssim.update(x_hat, x)
        shrinkage.update(image_norm_ratio(x_hat, x))
        if r2 is None:  # float64: the total sum of squares is a difference of two large sums
            r2 = R2Score(multioutput="variance_weighted").to(device).set_dtype(torch.float64)
        r2.update(x_hat.flatten(1).double(), x.flatten(1).double())
        if not count_codes:
            continue
        l0.update(l0_count(codes))
        hoyer.update(hoyer_sparsity(codes))
        if firing is None:
            firing = FiringRates(codes.shape[-1]).to(device)
        firing.update(codes)
    out = {"recon_mse": mse.compute().item(), "psnr": psnr.compute().item(),
           "ssim": ssim.compute().item(), "fvu": 1.0 - r2.compute().item(),
           "shrinkage": shrinkage.compute().item()}
    if count_codes:
        rates = firing.compute()
        out |= {"l0": l0.compute().item(), "dead_fraction": dead_fraction(rates),
                "dense_fraction": dense_fraction(rates), "hoyer": hoyer.compute().item(),
                "max_decoder_cosine": max_decoder_cosine(model.decoder_directions().detach())}
    return out


class ImageNoise:
    """Standard normal draws that belong to an image: image i's come from a generator seeded
    with (seed, i), so an estimate for it does not depend on which batch or process it is in.
    Hand-written because the estimators must be equal under any device count, and no library
    gives per-example random streams."""

    def __init__(self, indices: Tensor, seed: int, dim: int, device: torch.device) -> None:
        self.dim, self.device = dim, device
        self.generators = [torch.Generator(device=device).manual_seed(
            stream_seed(seed, "image", int(i))) for i in indices]

    def __call__(self, m: int | None = None) -> Tensor:
        """One draw per image (B x dim), or m per image (m x B x dim)."""
        shape = (self.dim,) if m is None else (m, self.dim)
        draws = [torch.randn(shape, generator=g, device=self.device) for g in self.generators]
        return torch.stack(draws, dim=0 if m is None else 1)

    def subset(self, keep: Tensor) -> ImageNoise:
        out = ImageNoise.__new__(ImageNoise)
        out.dim, out.device = self.dim, self.device
        out.generators = [g for g, k in zip(self.generators, keep.tolist()) if k]
        return out


def rate_distortion(log_px: Tensor, kl: Tensor) -> tuple[Tensor, Tensor]:
    """The ELBO's two terms per image, in nats (Alemi et al. 2018, "Fixing a Broken ELBO"):
    rate R = KL(q(z|x) || p(z)) and distortion D = -E_q[log p(x|z)], so that ELBO = -(D + R).
    A beta-VAE trades one for the other; a sweep over beta draws the rate-distortion curve."""
    return kl, -log_px


@torch.inference_mode()
def likelihood_metrics(model, batches, iw_k: int, iw_images: int | None,
                       seed: int = 0) -> dict[str, float]:
    """elbo (with its rate and distortion) over the whole test split and iw_nll over its first
    `iw_images` images, all in nats per image; records K and the image count next to them.
    Each image's samples come from its own seeded stream (`ImageNoise`), so the figures equal a
    single process's under DDP."""
    device = model.device
    elbo, iw_nll = MeanMetric().to(device), MeanMetric().to(device)
    rate, distortion = MeanMetric().to(device), MeanMetric().to(device)
    iw_count = SumMetric().to(device)  # reduced across processes, as the means are
    positions = batches.positions() if hasattr(batches, "positions") else None
    seen = 0
    for x, _ in batches:
        x = x.to(device)
        index = (positions[seen: seen + len(x)] if positions is not None
                 else torch.arange(seen, seen + len(x)))
        seen += len(x)
        noise = ImageNoise(index, seed, model.latent_dim, device)
        log_px, kl = model.elbo_terms(x, eps=noise())
        image_rate, image_distortion = rate_distortion(log_px, kl)
        rate.update(image_rate)
        distortion.update(image_distortion)
        elbo.update(log_px - kl)
        keep = index < iw_images if iw_images is not None else torch.ones(len(x), dtype=bool)
        if keep.any() and iw_k > 0:
            keep_device = keep.to(device)
            budget = int(keep.sum())
            # chunk so that chunk x batch decoder outputs stay near 50k images of memory
            iw_nll.update(model.iw_nll(x[keep_device], iw_k, chunk=max(1, 50_000 // budget),
                                       noise=noise.subset(keep)))
            iw_count.update(budget)
    out = {"elbo": elbo.compute().item(), "rate": rate.compute().item(),
           "distortion": distortion.compute().item(), "iw_k": iw_k}
    out["iw_nll"] = iw_nll.compute().item() if iw_k > 0 else float("nan")
    out["iw_images"] = int(iw_count.compute().item()) if iw_k > 0 else 0
    return out


def to_uint8_rgb(images: Tensor) -> Tensor:
    """[0, 1] floats or uint8, N x C x H x W -> uint8 N x 3 x H x W on the CPU, as torch-fidelity
    takes them (grayscale repeated to three channels)."""
    if images.dtype != torch.uint8:
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return images.cpu()


@torch.inference_mode()
def generate(model, n: int, batch_size: int) -> tuple[Tensor, float]:
    """n samples as uint8 RGB, and the sampling throughput in images per second (model time
    only, synchronised on GPU)."""
    chunks, seconds = [], 0.0
    for start in range(0, n, batch_size):
        begin = time.perf_counter()
        images = model.sample(min(batch_size, n - start))
        if images.is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - begin
        chunks.append(to_uint8_rgb(images))
    return torch.cat(chunks), n / max(seconds, 1e-9)


class UInt8Images(torch.utils.data.Dataset):
    """The dataset form torch-fidelity reads: one uint8 3 x H x W tensor per item."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def density_coverage(real_features: np.ndarray, fake_features: np.ndarray,
                     k: int) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020, "Reliable fidelity and diversity metrics for
    generative models", eq. 3 and 4), with B_k(x) the ball around a real feature x reaching its
    k-th nearest other real feature:
        density  = 1/(k M) sum_j sum_i 1[fake_j in B_k(real_i)]   (about 1 when fakes match)
        coverage = 1/N sum_i 1[some fake_j in B_k(real_i)]
    Unlike precision/recall they are not inflated by outlying fakes or reals. Computed by the
    authors' `prdc` package (which prints its sample counts: silenced here)."""
    from prdc import compute_prdc

    with contextlib.redirect_stdout(io.StringIO()):
        out = compute_prdc(real_features, fake_features, nearest_k=k)
    return float(out["density"]), float(out["coverage"])


def prc_features(**kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The features torch-fidelity computed precision/recall on, real (input2) and generated
    (input1), read back from its cache for the same `calculate_metrics` arguments: density and
    coverage are measured on the very features FID and precision/recall use."""
    from torch_fidelity.utils import (create_feature_extractor,
                                      extract_featuresdict_from_input_id_cached,
                                      resolve_feature_extractor, resolve_feature_layer_for_metric)

    layer = resolve_feature_layer_for_metric("prc", **kwargs)
    extractor = create_feature_extractor(resolve_feature_extractor(**kwargs), [layer], **kwargs)
    real, fake = (extract_featuresdict_from_input_id_cached(i, extractor, **kwargs)[layer]
                  for i in (2, 1))
    return real.double().numpy(), fake.double().numpy()


def fidelity_metrics(fake: Tensor, real: Tensor, extractor, real_cache_name: str,
                     settings: EvalSettings, cuda: bool) -> dict[str, float]:
    """FID, IS, KID and precision/recall from torch-fidelity, generated vs real uint8 RGB images.
    The real images' features are cached by torch-fidelity under `real_cache_name`."""
    import torch_fidelity

    from bench.extractor import cache_root

    subset = min(settings.kid_subset_size, len(fake), len(real))
    kwargs = dict(input1=UInt8Images(fake), input2=UInt8Images(real), cuda=cuda, fid=True,
                  isc=True, kid=True, prc=True, verbose=False, kid_subset_size=subset,
                  prc_neighborhood=settings.prc_neighborhood, batch_size=settings.batch_size,
                  feature_extractor=extractor.name, cache=True,
                  cache_root=str(cache_root() / "fidelity"), input2_cache_name=real_cache_name,
                  save_cpu_ram=True)
    if extractor.weights_path:
        kwargs["feature_extractor_weights_path"] = extractor.weights_path
    # The generated images' features are cached too, for this call only, so that density and
    # coverage read them instead of running the extractor over the samples a second time.
    fake_cache = f"genbench-fake-{uuid.uuid4().hex}"
    kwargs["input1_cache_name"] = fake_cache
    try:
        raw = torch_fidelity.calculate_metrics(**kwargs)
        real_features, fake_features = prc_features(**kwargs)
    finally:
        for path in (cache_root() / "fidelity").glob(f"{fake_cache}-*"):
            path.unlink()
    density, coverage = density_coverage(real_features, fake_features, settings.dc_neighborhood)
    return {"fid": raw["frechet_inception_distance"],
            "isc_mean": raw["inception_score_mean"], "isc_std": raw["inception_score_std"],
            "kid_mean": raw["kernel_inception_distance_mean"],
            "kid_std": raw["kernel_inception_distance_std"],
            "precision": raw["precision"], "recall": raw["recall"],
            "density": density, "coverage": coverage,
            # provenance: what KID, precision/recall and density/coverage were computed with
            "kid_subset_size": subset, "prc_neighborhood": settings.prc_neighborhood,
            "dc_neighborhood": settings.dc_neighborhood}


def evaluate(model, dm, settings: EvalSettings, extractor=None,
             seed: int = 0) -> tuple[dict[str, float | int | str], dict[str, Tensor]]:
    """All metrics that apply to `model` on dm's test split, and the image grids to save:
    `samples` (the first 64 generated) and `reconstructions` (32 test images over their
    reconstructions). Under DDP each rank reads its shard of the test split and the torchmetrics
    states are reduced across ranks, so the figures equal a single process's; generation
    metrics come from the rank given an `extractor` (rank zero): an Extractor, or a function
    that returns one when the generation metrics are reached."""
    family = model.family
    model.eval()
    # provenance of every figure below: which split, and how many of its images
    metrics: dict[str, float | int | str] = {"eval_split": "test",
                                             "test_images": len(dm.test_images)}
    grids: dict[str, Tensor] = {}
    start = time.perf_counter()
    test = dm.test_dataloader()
    if family.reconstructs:
        metrics |= reconstruction_metrics(model, test, count_codes=family.codes)
        with torch.inference_mode():
            x = dm.test_images[:32].to(model.device).float() / 255
            grids["reconstructions"] = torch.cat([x, model.reconstruct(x)]).cpu()
    if family.likelihood:
        iw_start = time.perf_counter()
        metrics |= likelihood_metrics(model, test, settings.iw_k, settings.iw_images, seed)
        metrics["iw_s"] = time.perf_counter() - iw_start  # ELBO and IW-NLL, seconds
    if family.metrics:
        metrics |= model.own_metrics(test)
    if family.samples and settings.generation and extractor is not None:
        generation_start = time.perf_counter()
        if callable(extractor):  # fetched only now: a failure here comes after every collective
            extractor = extractor()
        torch.manual_seed(seed)
        fake, metrics["sample_img_per_s"] = generate(model, settings.n_fake, settings.batch_size)
        grids["samples"] = fake[:64]
        n_real = settings.n_real or len(dm.test_images)
        real = to_uint8_rgb(dm.test_images[:n_real])
        log.info(f"  FID, IS, KID, PR, DC: {len(fake)} generated vs {len(real)} test images, "
                 f"features {extractor.features}")
        metrics |= fidelity_metrics(fake, real, extractor,
                                    f"genbench-{dm.spec.name}-test{len(real)}-{extractor.features}",
                                    settings, cuda=model.device.type == "cuda")
        metrics |= {"n_fake": len(fake), "n_real": len(real), "features": extractor.features}
        metrics |= model.sample_provenance()
        if extractor.accuracy is not None:
            metrics["features_acc"] = extractor.accuracy
        # generating, extracting features and FID & co, seconds (bench run --try scales it)
        metrics["generation_s"] = time.perf_counter() - generation_start
    metrics["eval_s"] = time.perf_counter() - start
    return metrics, grids


def explain_evaluation_error(err: BaseException, settings: EvalSettings) -> str:
    """One line that says what went wrong in an evaluation and how to fix it, for the row's
    `error` column and the log."""
    import urllib.error

    from bench.extractor import INCEPTION_WEIGHTS_FILE, ExtractorError

    text = str(err).strip().split("\n")[0][:200]
    hub = f"{torch.hub.get_dir()}/checkpoints"
    weights_fix = (f"put {INCEPTION_WEIGHTS_FILE} in {hub}, or set `eval: {{inception_weights: "
                   "FILE}}`, then rerun the suite: it evaluates the trained checkpoint again")
    if isinstance(err, (urllib.error.URLError, ConnectionError, TimeoutError)):
        return (f"a download failed ({type(err).__name__}: {text}): this machine has no network "
                f"for the Inception weights; {weights_fix}")
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return (f"GPU out of memory during evaluation at batch_size={settings.batch_size}: lower "
                f"it, e.g. `eval: {{batch_size: {max(1, settings.batch_size // 2)}}}`, and rerun")
    if isinstance(err, ExtractorError):
        return text
    if settings.inception_weights and isinstance(err, (RuntimeError, OSError, EOFError)) and (
            "state_dict" in text or "pickle" in text.lower() or "zip" in text.lower()):
        return (f"{settings.inception_weights} is not torch-fidelity's Inception weights "
                f"({type(err).__name__}: {text}); {weights_fix}")
    return f"{type(err).__name__}: {text}"
