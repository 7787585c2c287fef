import pytest
import torch
from torch import distributions

from bench.errors import UserError
from modules.sparse_autoencoder import (SparseAutoencoder, kl_sparsity_penalty, l1_penalty,
                                        mask_inputs, topk_activation)
from tests.modules.conftest import TINY, tiny_model


def test_topk_keeps_exactly_k_nonzeros_per_image():
    pre_codes = torch.randn(50, 32).abs() + 0.1  # positive, so ReLU removes none of the k
    codes = topk_activation(pre_codes, k=5)
    assert ((codes != 0).sum(dim=1) == 5).all()
    kept = codes.topk(5, dim=1).values
    assert torch.equal(kept, pre_codes.topk(5, dim=1).values)


@pytest.mark.parametrize("backbone", ["mlp", "conv"])
def test_topk_model_codes_have_at_most_k_nonzeros(unit_images, backbone):
    """ReLU after the selection (Gao et al.) can zero a selected unit with a negative input."""
    model = tiny_model("sae", backbone, sparsity="topk", k=3).eval()
    assert ((model.encode(unit_images) != 0).sum(dim=1) <= 3).all()


def test_kl_penalty_is_zero_when_mean_activation_equals_rho():
    assert kl_sparsity_penalty(torch.full((10, 6), 0.05), rho=0.05).abs() < 1e-6


def test_kl_penalty_matches_bernoulli_kl_from_torch_distributions():
    codes = torch.rand(40, 6)
    reference = distributions.kl_divergence(distributions.Bernoulli(torch.tensor(0.1)),
                                            distributions.Bernoulli(codes.mean(0))).sum()
    assert torch.allclose(kl_sparsity_penalty(codes, rho=0.1), reference, atol=1e-5)


def test_l1_penalty_is_mean_absolute_activation():
    assert l1_penalty(torch.tensor([[1.0, -3.0], [0.0, 2.0]])) == pytest.approx(1.5)


@pytest.mark.parametrize("channels", [1, 3])
def test_input_mask_zeroes_the_expected_fraction_of_pixels(channels):
    torch.manual_seed(0)
    masked = mask_inputs(torch.ones(500, channels, 28, 28), fraction=0.25)
    zero = masked == 0
    assert zero.float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert (zero == zero[:, :1]).all()  # a masked pixel is masked in every channel


def test_input_mask_applies_only_in_training(unit_images):
    model = tiny_model("sae", sparsity="input_mask", mask_fraction=0.9)
    model.eval()
    evaluated = model.losses(unit_images)["recon"]
    assert torch.allclose(evaluated, model.losses(unit_images)["recon"])  # deterministic


def test_kl_sparsity_uses_sigmoid_codes(unit_images):
    codes = tiny_model("sae", sparsity="kl").encode(unit_images)
    assert (codes > 0).all() and (codes < 1).all()


def test_mechanisms_combine_and_unknown_ones_list_the_choices():
    model = tiny_model("sae", sparsity="topk,input_mask", k=4)
    assert model.mechanisms == ("topk", "input_mask")
    with pytest.raises(UserError, match="choose one or more of: l1, kl, topk, input_mask"):
        SparseAutoencoder(sparsity="l2", **TINY)


def test_aux_k_loss_trains_dead_latents(unit_images):
    torch.manual_seed(0)
    model = tiny_model("sae", sparsity="topk", k=2, aux_k=4, dead_after_images=0).train()
    model.images_since_active.fill_(10**6)  # every latent counts as dead ...
    terms = model.losses(unit_images)  # ... except those this batch activates
    assert terms["aux_k"] > 0
    terms["aux_k"].backward()
    encoder_out = [m for m in model.encoder if isinstance(m, torch.nn.Linear)][-1]
    assert encoder_out.weight.grad.abs().sum() > 0


def test_aux_k_counts_images_since_each_latent_fired_and_resets_on_firing(unit_images):
    model = tiny_model("sae", sparsity="topk", k=2, aux_k=4, dead_after_images=10**9).train()
    model.images_since_active.fill_(500)
    with torch.no_grad():
        fired = (model.encode(unit_images) > 0).any(dim=0)
    model.losses(unit_images)
    assert fired.any() and (~fired).any()
    assert (model.images_since_active[fired] == 0).all()
    assert (model.images_since_active[~fired] == 500 + len(unit_images)).all()


def test_aux_k_loss_is_the_residual_error_of_the_top_dead_latents(unit_images):
    """Gao et al. 2024, sec. 2.4, with our nonlinear decoder: z_aux holds the aux_k largest raw
    pre-activations among dead latents; e_hat = D(codes + z_aux) - D(codes) must match the
    residual x - D(codes); the loss is the mean squared difference."""
    torch.manual_seed(0)
    model = tiny_model("sae", sparsity="topk", k=2, aux_k=3, dead_after_images=10).train()
    model.images_since_active.copy_(torch.tensor([0, 50, 50, 5, 50, 50, 50, 0]))
    with torch.no_grad():
        pre_codes = model.encoder(unit_images)
        codes = model.code_activation(pre_codes)
        fired = (codes > 0).any(0)
        dead = (model.images_since_active + len(unit_images) > 10) & ~fired
        assert dead.sum() > 3  # more dead latents than aux_k: the top 3 must be chosen
        z_aux = torch.zeros_like(pre_codes)
        top = pre_codes.masked_fill(~dead, float("-inf")).topk(3, dim=1)
        z_aux.scatter_(1, top.indices, top.values)
        x_hat = torch.sigmoid(model.decode_logits(codes))
        e_hat = torch.sigmoid(model.decode_logits(codes + z_aux)) - x_hat
        expected = (e_hat - (unit_images - x_hat)).pow(2).mean()
    terms = model.losses(unit_images)
    assert terms["aux_k"].item() == pytest.approx(model.hparams.aux_weight * expected.item(),
                                                  rel=1e-5)


def test_a_latent_is_dead_only_past_the_threshold(unit_images):
    model = tiny_model("sae", sparsity="topk", k=2, aux_k=2,
                       dead_after_images=500 + len(unit_images)).train()
    model.images_since_active.fill_(500)  # reaches the threshold exactly: not yet dead
    assert model.losses(unit_images)["aux_k"].item() == 0.0


def test_kl_penalty_stays_finite_for_units_that_never_or_always_fire():
    codes = torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, 0.5]])
    rho, eps = 0.05, 1e-6
    rho_hat = torch.tensor([eps, 1 - eps, 0.5]).double()  # clamped as float32, as the codes
    expected = (rho * torch.log(rho / rho_hat)
                + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()
    assert kl_sparsity_penalty(codes, rho, eps).item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("sparsity, options", [
    ("l1", {"l1_weight": 0.3}), ("kl", {"kl_weight": 0.7, "kl_rho": 0.2}),
    ("topk", {"k": 3, "aux_k": 1, "dead_after_images": 0}), ("topk", {"k": 3, "aux_k": 0}),
    ("input_mask", {"mask_fraction": 0.5})])
def test_the_loss_is_the_reconstruction_plus_each_weighted_penalty(sparsity, options,
                                                                   unit_images):
    from modules.autoencoder import reconstruction_loss

    model = tiny_model("sae", sparsity=sparsity, loss="bce", **options).train()
    torch.manual_seed(1)
    terms = model.losses(unit_images)
    torch.manual_seed(1)
    with torch.no_grad():
        x_in = (mask_inputs(unit_images, 0.5) if sparsity == "input_mask" else unit_images)
        codes = model.code_activation(model.encoder(x_in))
        expected = {"recon": reconstruction_loss(model.decode_logits(codes), unit_images, "bce")}
    if sparsity == "l1":
        expected["l1"] = 0.3 * l1_penalty(codes)
    if sparsity == "kl":
        expected["kl_sparsity"] = 0.7 * kl_sparsity_penalty(codes, 0.2)
    with_aux = options.get("aux_k", 0) > 0
    assert set(terms) == set(expected) | {"loss"} | ({"aux_k"} if with_aux else set())
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-5), name
    assert terms["loss"].item() == pytest.approx(sum(terms[k].item() for k in terms
                                                     if k != "loss"), rel=1e-6)
    if with_aux:  # the auxiliary loss is a training term only
        assert "aux_k" not in model.eval().losses(unit_images)
