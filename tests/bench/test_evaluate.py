import dataclasses
import itertools
import math
import time

import pytest
import torch
import torch_fidelity

from bench.errors import UserError
from bench.evaluate import (EvalSettings, FiringRates, dead_fraction, dense_fraction,
                            density_coverage, fidelity_metrics, hoyer_sparsity, image_norm_ratio,
                            l0_count, likelihood_metrics, max_decoder_cosine,
                            reconstruction_metrics, to_uint8_rgb)
from bench.extractor import ClassifierNet, Extractor, make_fidelity_extractor_class
from bench.metrics import DETAILS, METRICS, PROVENANCE_COLUMNS, TIMING_METRICS
from tests.modules.conftest import prototype_images, tiny_model

_names = itertools.count()


def test_hoyer_is_one_for_a_single_active_unit_and_zero_for_equal_magnitudes():
    codes = torch.tensor([[0.0, 3.0, 0.0, 0.0], [1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert hoyer_sparsity(codes).tolist() == pytest.approx([1.0, 0.0, 1.0])


def test_hoyer_matches_its_formula():
    codes = torch.randn(5, 16)
    n, l1, l2 = 16, codes.abs().sum(1), codes.norm(dim=1)
    expected = (math.sqrt(n) - l1 / l2) / (math.sqrt(n) - 1)
    assert torch.allclose(hoyer_sparsity(codes), expected)


def test_l0_dead_and_dense_fractions_count_active_units():
    codes = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 1.0, -1.0, 0.0]] + [[0.0, 1.0, 0.0, 0.0]] * 8)
    assert l0_count(codes[:2]).tolist() == [1.0, 2.0]
    rates = FiringRates(4)
    rates.update(codes[:1])
    rates.update(codes[1:])
    assert rates.compute().tolist() == [0.0, 1.0, 0.1, 0.0]
    assert dead_fraction(rates.compute()) == 0.5  # units 0 and 3 never fire
    # unit 1 fires on every image; unit 2 on 1 of 10, which is not more than 10%
    assert dense_fraction(rates.compute()) == 0.25


def test_firing_rates_merge_processes_by_summing_counts():
    """torchmetrics combines per-process states with each state's dist_reduce_fx, as DDP's sync
    does: a unit that fires in one process only is alive, and its rate is over all images."""
    first, second = FiringRates(4), FiringRates(4)
    first.update(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    second.update(torch.tensor([[0.0, 3.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    first.merge_state(second)
    assert first.compute().tolist() == [0.25, 0.5, 0.0, 0.0]


def test_max_decoder_cosine_is_the_closest_pair_of_directions():
    # columns: e1, e2, (e1 + e2) / sqrt 2 at 45 degrees to both, a zero column left out
    directions = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert max_decoder_cosine(directions) == pytest.approx(math.sqrt(0.5))
    assert max_decoder_cosine(torch.tensor([[1.0, 0.0], [0.0, -2.0]])) == 0.0
    assert max_decoder_cosine(torch.tensor([[1.0, 2.0], [1.0, 2.0]])) == pytest.approx(1.0)


def test_the_norm_ratio_is_per_image_and_skips_black_images():
    x = torch.stack([torch.full((1, 2, 2), 0.5), torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    x_hat = torch.stack([torch.full((1, 2, 2), 0.25), torch.ones(1, 2, 2), torch.ones(1, 2, 2)])
    assert image_norm_ratio(x_hat, x).tolist() == [0.5, 1.0]


def test_reconstruction_metrics_match_direct_computation():
    model = tiny_model("sae", sparsity="topk", k=3).eval()
    x = prototype_images(40).float() / 255
    metrics = reconstruction_metrics(model, [(x[:25], None), (x[25:], None)])
    with torch.no_grad():
        x_hat = model.reconstruct(x)
        codes = model.encode(x)
    per_image_mse = ((x - x_hat) ** 2).flatten(1).mean(1)
    assert metrics["recon_mse"] == pytest.approx(per_image_mse.mean().item(), rel=1e-5)
    assert metrics["psnr"] == pytest.approx((10 * torch.log10(1 / per_image_mse)).mean().item(),
                                            rel=1e-4)
    assert metrics["l0"] == pytest.approx((codes != 0).sum(1).float().mean().item())
    assert metrics["dead_fraction"] == pytest.approx(1 - (codes != 0).any(0).float().mean().item())
    # FVU's dataset-level formula, in float64: residual over total sum of squares of the split
    x64, x_hat64 = x.double(), x_hat.double()
    fvu = ((x64 - x_hat64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum()
    assert metrics["fvu"] == pytest.approx(fvu.item(), rel=1e-9)
    ratio = x_hat.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    assert metrics["shrinkage"] == pytest.approx(ratio.mean().item(), rel=1e-5)
    dense = ((codes != 0).float().mean(0) > 0.1).float().mean().item()
    assert metrics["dense_fraction"] == pytest.approx(dense)
    weight = model.decoder[0].weight  # the MLP decoder's first layer: 8 code units in
    cosine = torch.nn.functional.cosine_similarity(weight[:, :, None], weight[:, None, :], dim=0)
    assert metrics["max_decoder_cosine"] == pytest.approx(
        (cosine - 2 * torch.eye(8)).max().item(), rel=1e-5)


def test_likelihood_metrics_record_k_and_image_count():
    model = tiny_model("vae").eval()
    x = prototype_images(30).float() / 255
    metrics = likelihood_metrics(model, [(x[:20], None), (x[20:], None)], iw_k=5, iw_images=25)
    assert (metrics["iw_k"], metrics["iw_images"]) == (5, 25)
    assert metrics["elbo"] < 0 and metrics["iw_nll"] > 0


def test_rate_and_distortion_are_the_elbos_two_terms():
    """rate = KL(q || p) and distortion = -E_q[log p(x|z)] per image, so that their sum is
    -ELBO; the rate checked against torch.distributions' KL on the same posteriors."""
    from torch.distributions import Normal, kl_divergence

    model = tiny_model("vae").eval()
    x = prototype_images(30).float() / 255
    metrics = likelihood_metrics(model, [(x[:20], None), (x[20:], None)], iw_k=2, iw_images=5)
    assert metrics["rate"] + metrics["distortion"] == pytest.approx(-metrics["elbo"], rel=1e-6)
    with torch.no_grad():
        mu, logvar = model.posterior(x)
        kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    assert metrics["rate"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert metrics["rate"] > 0 and metrics["distortion"] > 0


def test_likelihood_figures_do_not_depend_on_batching():
    model = tiny_model("vae").eval()
    x = prototype_images(30).float() / 255
    one = likelihood_metrics(model, [(x[:20], None), (x[20:], None)], iw_k=6, iw_images=25)
    other = likelihood_metrics(model, [(x[i:i + 7], None) for i in range(0, 30, 7)], iw_k=6,
                               iw_images=25)
    for metric in ("elbo", "iw_nll"):
        assert other[metric] == pytest.approx(one[metric], rel=1e-6), metric


def test_sharded_likelihood_figures_combine_to_the_single_process_ones():
    """What DDP's reduction of the two ranks' means gives: the single process's figures."""
    from datamodules import TensorBatches

    model = tiny_model("vae").eval()
    images, labels = prototype_images(31), torch.zeros(31)
    batches = lambda **kw: TensorBatches(images, labels, 4, shuffle=False,  # noqa: E731
                                         drop_last=False, **kw)
    single = likelihood_metrics(model, batches(), iw_k=5, iw_images=20, seed=3)
    shards = [likelihood_metrics(model, batches(rank=r, world_size=2), iw_k=5, iw_images=20,
                                 seed=3) for r in (0, 1)]
    sizes = [len(range(r, 31, 2)) for r in (0, 1)]
    elbo = sum(m["elbo"] * n for m, n in zip(shards, sizes)) / 31
    iw_nll = sum(m["iw_nll"] * m["iw_images"] for m in shards) / 20
    assert sum(m["iw_images"] for m in shards) == single["iw_images"] == 20
    assert elbo == pytest.approx(single["elbo"], rel=1e-6)
    assert iw_nll == pytest.approx(single["iw_nll"], rel=1e-6)


def test_to_uint8_rgb_repeats_grayscale():
    images = to_uint8_rgb(torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3))
    assert images.dtype == torch.uint8 and images.shape == (1, 3, 1, 3)
    assert images[0, :, 0].tolist() == [[0, 128, 255]] * 3


def registered_random_extractor():
    torch.manual_seed(0)
    net = ClassifierNet(1, 28, 10).eval()
    name = f"test-cnn-{next(_names)}"
    torch_fidelity.register_feature_extractor(name, make_fidelity_extractor_class(net))
    return Extractor(name, net=net)


def test_fid_agrees_with_torchmetrics_on_the_same_features(tmp_path, monkeypatch):
    from torchmetrics.image.fid import FrechetInceptionDistance

    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path))
    extractor = registered_random_extractor()
    real = to_uint8_rgb(prototype_images(300, seed=1))
    fake = to_uint8_rgb(prototype_images(300, n_prototypes=2, seed=2))
    ours = fidelity_metrics(fake, real, extractor, "real-test", EvalSettings(
        kid_subset_size=100), cuda=False)

    class Features(torch.nn.Module):
        num_features = 128

        def forward(self, x):
            return extractor.net(x[:, :1].float() / 255)[0]

    reference = FrechetInceptionDistance(feature=Features())
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert ours["fid"] == pytest.approx(reference.compute().item(), rel=1e-3)


def test_identical_sets_have_zero_fid_and_full_precision_recall(tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path))
    images = to_uint8_rgb(prototype_images(200, seed=3))
    metrics = fidelity_metrics(images, images, registered_random_extractor(), "same",
                               EvalSettings(kid_subset_size=100), cuda=False)
    assert abs(metrics["fid"]) < 1e-3
    assert metrics["precision"] == metrics["recall"] == 1.0


def test_inception_score_is_one_for_a_constant_classifier(tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path))
    extractor = registered_random_extractor()
    with torch.no_grad():
        extractor.net.head.weight.zero_()  # same logits for every image: p(y|x) = p(y)
    images = to_uint8_rgb(prototype_images(100, seed=4))
    metrics = fidelity_metrics(images, images, extractor, "const", EvalSettings(
        kid_subset_size=50), cuda=False)
    assert metrics["isc_mean"] == pytest.approx(1.0, abs=1e-5)


def test_unknown_eval_setting_lists_the_allowed_ones():
    with pytest.raises(UserError, match=r"unknown eval setting 'nfake'; did you mean 'n_fake'\? allowed: "):
        EvalSettings.from_dict({"nfake": 10})


def test_every_image_and_run_seed_gets_its_own_noise_stream():
    from bench.evaluate import ImageNoise

    draws = torch.cat([ImageNoise(torch.arange(300), seed, 2, torch.device("cpu"))()
                       for seed in range(3)])
    assert draws.unique(dim=0).shape[0] == 900


def test_an_error_is_explained_as_a_weights_problem_only_when_it_is_one():
    from bench.evaluate import explain_evaluation_error

    plain = EvalSettings()
    assert explain_evaluation_error(RuntimeError("boom\nmore"), plain) == "RuntimeError: boom"
    with_weights = EvalSettings(inception_weights="/w.pth")
    assert explain_evaluation_error(ValueError("pickle"), with_weights) == "ValueError: pickle"
    for text in ("invalid load key, pickle", "PytorchStreamReader failed reading zip archive"):
        assert "/w.pth is not" in explain_evaluation_error(RuntimeError(text), with_weights)


def test_hoyer_holds_for_codes_of_any_scale():
    """Scale-free: small codes (norm below 1) give the same figures as large ones."""
    for scale in (0.01, 1.0, 100.0):
        codes = scale * torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
        assert hoyer_sparsity(codes).tolist() == pytest.approx([1.0, 0.0], abs=1e-6), scale


@pytest.mark.parametrize("family", ["ae", "vae"])
def test_evaluate_records_every_figure_with_its_provenance(family, tmp_path, monkeypatch):
    """The row's figures and how they were measured, each against its own computation."""
    from bench.evaluate import evaluate, generate
    from bench.extractor import get_extractor
    from datamodules import ImageDataModule
    from tests.data_files import write_mnist_dir

    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path / "cache"))
    write_mnist_dir(tmp_path / "data", n_train=120, n_test=70)
    dm = ImageDataModule("mnist", data_dir=str(tmp_path / "data"), own_files=True, val_size=0,
                         eval_batch_size=32, test_subset=60)
    dm.setup()
    model = tiny_model(family).eval()
    if family == "ae":
        model.fit_latent_density([dm.train_images.float() / 255])
    settings = EvalSettings(n_fake=80, n_real=50, kid_subset_size=200, prc_neighborhood=2,
                            iw_k=3, iw_images=40, batch_size=30)
    extractor = get_extractor("classifier", dm)
    metrics, grids = evaluate(model, dm, settings, lambda: extractor, seed=9)

    assert (metrics["eval_split"], metrics["test_images"]) == ("test", 60)
    assert (metrics["n_fake"], metrics["n_real"], metrics["features"]) == (80, 50, extractor.name)
    assert (metrics["kid_subset_size"], metrics["prc_neighborhood"]) == (50, 2)
    assert metrics["features_acc"] == extractor.accuracy and metrics["sample_img_per_s"] > 0
    test_batches = dm.test_dataloader()
    assert metrics["recon_mse"] == pytest.approx(
        reconstruction_metrics(model, test_batches)["recon_mse"], rel=1e-6)
    if family == "vae":
        expected = likelihood_metrics(model, test_batches, 3, 40, seed=9)
        assert (metrics["iw_k"], metrics["iw_images"]) == (3, 40)
        assert metrics["elbo"] == pytest.approx(expected["elbo"], rel=1e-6)
        assert metrics["iw_nll"] == pytest.approx(expected["iw_nll"], rel=1e-6)
    torch.manual_seed(9)
    fake, _ = generate(model, 80, 30)
    real = to_uint8_rgb(dm.test_images[:50])
    by_hand = fidelity_metrics(fake, real, extractor, "by-hand", dataclasses.replace(
        settings, kid_subset_size=50), cuda=False)
    for key in ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std", "precision", "recall"):
        assert metrics[key] == pytest.approx(by_hand[key], rel=1e-6), key
    assert grids["samples"].shape == (64, 3, 28, 28) and torch.equal(grids["samples"], fake[:64])
    assert grids["reconstructions"].shape == (64, 1, 28, 28)
    # every column evaluation writes is declared: a metric, a provenance column or a detail;
    # the metrics are those the family's declaration names
    assert set(metrics) <= set(METRICS) | PROVENANCE_COLUMNS | set(DETAILS)
    assert set(metrics) & set(METRICS) - TIMING_METRICS == set(model.family.figures())


@pytest.mark.parametrize("name, least", [("n_fake", 2), ("batch_size", 1),
                                         ("kid_subset_size", 2), ("prc_neighborhood", 1),
                                         ("dc_neighborhood", 1), ("iw_k", 0)])
def test_a_count_setting_takes_its_least_value_and_refuses_one_below(name, least):
    assert getattr(EvalSettings.from_dict({name: least}), name) == least
    for bad in (least - 1, True, 2.5):
        with pytest.raises(UserError, match=rf"^eval.{name}={bad!r}: give an integer >= {least}$"):
            EvalSettings.from_dict({name: bad})


@pytest.mark.parametrize("name", ["n_real", "iw_images", "extractor_epochs"])
def test_an_optional_count_takes_null_or_a_positive_integer(name):
    assert getattr(EvalSettings.from_dict({name: None}), name) is None
    assert getattr(EvalSettings.from_dict({name: 1}), name) == 1
    for bad, fix in ((0, "an integer >= 1, or null"), (True, "an integer >= 1, or null"),
                     ("5", "5 without quotes")):
        with pytest.raises(UserError, match=rf"^eval.{name}={bad!r}: give {fix}"):
            EvalSettings.from_dict({name: bad})


@pytest.mark.parametrize("values, message", [
    ({"features": "clip"}, "features='clip': give one of: auto, inception, classifier"),
    ({"generation": "yes"}, "generation='yes': give true or false"),
    ({"extractor_weights": 3}, "extractor_weights=3: give a string, or null"),
    ({"inception_weights": 3}, "inception_weights=3: give a string, or null")])
def test_a_bad_eval_setting_is_named(values, message):
    with pytest.raises(UserError, match=f"^eval.{message}$"):
        EvalSettings.from_dict(values)


def knn_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019, by hand: precision is the share of fake features inside some
    real feature's ball (radius: distance to its k-th nearest other real feature); recall the
    same with the roles swapped."""
    def share_inside(ref, query):
        radii = torch.cdist(ref, ref).kthvalue(k + 1, dim=1).values  # +1: itself at distance 0
        return (torch.cdist(query, ref) <= radii).any(dim=1).float().mean().item()
    return share_inside(real, fake), share_inside(fake, real)


@pytest.mark.parametrize("k", [1, 4])
def test_precision_recall_use_the_neighbourhood_size_asked_for(k, tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path))
    extractor = registered_random_extractor()
    # noise images, the fakes a little darker: overlapping sets whose shares depend on k
    g = torch.Generator().manual_seed(5)
    real = torch.randint(0, 256, (120, 1, 28, 28), generator=g).float() / 255
    fake = torch.randint(0, 256, (120, 1, 28, 28), generator=g).float() / 255 * 0.95
    real, fake = to_uint8_rgb(real), to_uint8_rgb(fake)
    ours = fidelity_metrics(fake, real, extractor, f"real-prc-{k}", EvalSettings(
        kid_subset_size=50, prc_neighborhood=k), cuda=False)
    with torch.no_grad():
        features = [extractor.net(x[:, :1].float() / 255)[0].double() for x in (real, fake)]
    precision, recall = knn_precision_recall(*features, k)
    assert 0 < recall < precision < 1  # neither share saturated, so k shows
    assert (ours["precision"], ours["recall"]) == pytest.approx((precision, recall), abs=1e-6)
    assert ours["prc_neighborhood"] == k


@pytest.mark.parametrize("n_fake, n_real", [(30, 60), (60, 40)])
def test_kid_subsets_are_no_larger_than_either_set(n_fake, n_real, tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path))
    fake = to_uint8_rgb(prototype_images(n_fake, seed=7))
    real = to_uint8_rgb(prototype_images(n_real, seed=8))
    metrics = fidelity_metrics(fake, real, registered_random_extractor(), f"kid-{n_real}",
                               EvalSettings(kid_subset_size=1000), cuda=False)
    assert metrics["kid_subset_size"] == min(n_fake, n_real)


def _small_mnist(tmp_path):
    from datamodules import ImageDataModule
    from tests.data_files import write_mnist_dir

    write_mnist_dir(tmp_path / "data", n_train=60, n_test=40)
    dm = ImageDataModule("mnist", data_dir=str(tmp_path / "data"), own_files=True, val_size=0,
                         eval_batch_size=16)
    dm.setup()
    return dm


def test_reconstruction_grid_is_test_images_over_their_reconstructions(tmp_path):
    from bench.evaluate import evaluate

    dm = _small_mnist(tmp_path)
    model = tiny_model("ae").eval()
    _, grids = evaluate(model, dm, EvalSettings(generation=False))
    originals = dm.test_images[:32].float() / 255
    with torch.no_grad():
        assert torch.equal(grids["reconstructions"], torch.cat([originals,
                                                                model.reconstruct(originals)]))


def test_generation_metrics_are_skipped_when_turned_off(tmp_path):
    from bench.evaluate import evaluate

    dm = _small_mnist(tmp_path)
    extractor_fetched = []
    start = time.perf_counter()
    metrics, grids = evaluate(tiny_model("vae").eval(), dm, EvalSettings(generation=False, iw_k=2),
                              lambda: extractor_fetched.append(1))
    assert not extractor_fetched and "samples" not in grids
    assert not {"fid", "n_fake", "features"} & set(metrics) and "elbo" in metrics
    assert 0 < metrics["eval_s"] <= time.perf_counter() - start


def density_coverage_by_hand(real, fake, k):
    """Naeem et al. 2020, eq. 3 and 4, written out: B_k(x_i) reaches the k-th nearest other
    real feature."""
    radii = torch.cdist(real, real).kthvalue(k + 1, dim=1).values
    inside = torch.cdist(fake, real) < radii  # (fake j, real i): fake j in B_k(real i)
    return inside.sum().item() / (k * len(fake)), inside.any(dim=0).double().mean().item()


def test_identical_sets_have_density_and_coverage_one():
    features = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)).numpy()
    assert density_coverage(features, features.copy(), k=5) == pytest.approx((1.0, 1.0))


def test_disjoint_sets_have_density_and_coverage_zero():
    features = torch.randn(200, 8, generator=torch.Generator().manual_seed(0)).numpy()
    assert density_coverage(features, features + 100.0, k=5) == (0.0, 0.0)


@pytest.mark.parametrize("k", [1, 5])
def test_density_and_coverage_follow_their_definition(k):
    g = torch.Generator().manual_seed(1)
    real = torch.randn(150, 6, generator=g, dtype=torch.float64)
    fake = 0.7 * torch.randn(120, 6, generator=g, dtype=torch.float64) + 0.3  # overlapping
    density, coverage = density_coverage(real.numpy(), fake.numpy(), k)
    assert (density, coverage) == pytest.approx(density_coverage_by_hand(real, fake, k),
                                                abs=1e-12)
    assert 0 < coverage < 1 and density > 0


def test_density_and_coverage_are_measured_on_the_fid_features(tmp_path, monkeypatch):
    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path))
    extractor = registered_random_extractor()
    g = torch.Generator().manual_seed(5)
    real = to_uint8_rgb(torch.randint(0, 256, (120, 1, 28, 28), generator=g).float() / 255)
    fake = to_uint8_rgb(torch.randint(0, 256, (100, 1, 28, 28), generator=g).float() / 255 * .95)
    ours = fidelity_metrics(fake, real, extractor, "real-dc", EvalSettings(
        kid_subset_size=50, dc_neighborhood=3), cuda=False)
    with torch.no_grad():
        features = [extractor.net(x[:, :1].float() / 255)[0].double() for x in (real, fake)]
    expected = density_coverage_by_hand(*features, 3)
    assert (ours["density"], ours["coverage"]) == pytest.approx(expected, abs=1e-6)
    assert ours["dc_neighborhood"] == 3 and 0 < ours["coverage"] < 1


def test_each_image_set_goes_through_the_extractor_once_and_leaves_no_generated_cache(
        tmp_path, monkeypatch):
    import torch_fidelity.utils

    monkeypatch.setenv("GENBENCH_CACHE", str(tmp_path))
    passes = []
    extract = torch_fidelity.utils.get_featuresdict_from_dataset

    def counted(images, *args, **kwargs):
        passes.append(len(images))
        return extract(images, *args, **kwargs)

    monkeypatch.setattr(torch_fidelity.utils, "get_featuresdict_from_dataset", counted)
    real = to_uint8_rgb(prototype_images(120, seed=1))
    fake = to_uint8_rgb(prototype_images(100, seed=2))
    fidelity_metrics(fake, real, registered_random_extractor(), "real-once",
                     EvalSettings(kid_subset_size=50), cuda=False)
    assert sorted(passes) == [100, 120]  # density/coverage reuse the generated set's features
    assert {p.name.split("-")[0] for p in (tmp_path / "fidelity").iterdir()} == {"real"}
