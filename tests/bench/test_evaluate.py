import dataclasses
import itertools
import math

import pytest
import torch
import torch_fidelity

from bench.evaluate import (DeadFraction, EvalSettings, fidelity_metrics, hoyer_sparsity,
                            l0_count, likelihood_metrics, reconstruction_metrics, to_uint8_rgb)
from bench.extractor import ClassifierNet, Extractor, make_fidelity_extractor_class
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


def test_l0_and_dead_fraction_count_active_units():
    codes = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 1.0, -1.0, 0.0]])
    assert l0_count(codes).tolist() == [1.0, 2.0]
    dead = DeadFraction(4)
    dead.update(codes[:1])
    dead.update(codes[1:])
    assert dead.compute().item() == pytest.approx(0.5)  # units 0 and 3 never fire


def test_dead_fraction_merges_processes_with_a_max():
    """torchmetrics combines per-process states with each state's dist_reduce_fx, as DDP's sync
    does: a unit that fires in one process only is alive."""
    first, second = DeadFraction(4), DeadFraction(4)
    first.update(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    second.update(torch.tensor([[0.0, 3.0, 0.0, 0.0]]))
    first.merge_state(second)
    assert first.compute().item() == pytest.approx(0.5)


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


def test_likelihood_metrics_record_k_and_image_count():
    model = tiny_model("vae").eval()
    x = prototype_images(30).float() / 255
    metrics = likelihood_metrics(model, [(x[:20], None), (x[20:], None)], iw_k=5, iw_images=25)
    assert (metrics["iw_k"], metrics["iw_images"]) == (5, 25)
    assert metrics["elbo"] < 0 and metrics["iw_nll"] > 0


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
    with pytest.raises(ValueError, match=r"unknown eval setting\(s\) \['nfake'\]; allowed: .*n_fake"):
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
    dm = ImageDataModule("mnist", data_dir=str(tmp_path / "data"), val_size=0,
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
