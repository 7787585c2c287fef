import pytest
import torch
from torch import distributions

from bench.errors import UserError
from modules.sparse_autoencoder import (JumpReLU, SparseAutoencoder, batch_topk_activation,
                                        jumprelu_l0, kl_sparsity_penalty, l1_penalty,
                                        mask_inputs, min_positive, prefix_mask,
                                        target_l0_penalty, topk_activation)
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
    with pytest.raises(UserError, match="choose one or more of: l1, kl, topk, batchtopk, "
                                        "jumprelu, matryoshka, input_mask"):
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
    ("input_mask", {"mask_fraction": 0.5}), ("jumprelu", {"l0_weight": 0.2})])
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
    if sparsity == "jumprelu":  # L0 counted with the thresholds the codes were cut at
        pre_codes = model.encoder(unit_images)
        fires = (pre_codes > model.threshold).float().sum(1).mean()
        assert torch.equal(codes, pre_codes * (pre_codes > model.threshold))
        expected["l0"] = 0.2 * fires
    with_aux = options.get("aux_k", 0) > 0
    assert set(terms) == set(expected) | {"loss"} | ({"aux_k"} if with_aux else set())
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-5), name
    assert terms["loss"].item() == pytest.approx(sum(terms[k].item() for k in terms
                                                     if k != "loss"), rel=1e-6)
    if with_aux:  # the auxiliary loss is a training term only
        assert "aux_k" not in model.eval().losses(unit_images)



def test_batch_topk_keeps_k_times_the_batch_over_the_whole_batch():
    torch.manual_seed(0)
    pre_codes = torch.randn(10, 32).abs() + 0.1  # positive, so ReLU removes none
    pre_codes[0] += 5  # one image's units outrank the rest: it takes more than k
    codes = batch_topk_activation(pre_codes, k=3)
    per_image = (codes != 0).sum(1)
    assert per_image.sum() == 3 * 10  # exactly k x B active units in the batch
    assert per_image[0] == 30 and per_image[1:].sum() == 0
    kept = codes[codes != 0]
    assert torch.equal(kept.sort().values, pre_codes.flatten().topk(30).values.sort().values)


def test_batch_topk_codes_are_the_batch_selection_in_training_and_a_threshold_after():
    torch.manual_seed(0)
    model = tiny_model("sae", sparsity="batchtopk", k=1, threshold_lr=0.5).train()
    x = torch.rand(12, 1, 28, 28)
    expected = torch.zeros(())
    for _ in range(3):  # the moving average of the smallest kept code, by hand
        with torch.no_grad():
            smallest = min_positive(batch_topk_activation(model.encoder(x), 1))
        model.losses(x)
        expected = 0.5 * expected + 0.5 * smallest
    assert model.batchtopk_threshold.item() == pytest.approx(expected.item(), rel=1e-6)
    with torch.no_grad():  # k x B of the batch, fewer than fire
        assert (model.encode(x) != 0).sum() == 12 < (model.encoder(x) > 0).sum()
    model.eval()
    with torch.no_grad():
        codes, pre_codes = model.encode(x), model.encoder(x)
        assert torch.equal(codes, pre_codes * (pre_codes > model.batchtopk_threshold))
        assert ((pre_codes > 0) & (codes == 0)).any()  # the threshold cuts some ReLU's survivors
        # an image's code does not depend on the batch it is evaluated in
        alone = model.encode(x[:1])  # (a batch of one rounds the matmul otherwise)
        assert torch.equal(alone != 0, codes[:1] != 0) and torch.allclose(alone, codes[:1])


def test_min_positive_ignores_zeros_and_is_inf_when_nothing_fires():
    assert min_positive(torch.tensor([[0.0, 0.3], [0.2, 0.0]])).item() == pytest.approx(0.2)
    assert min_positive(torch.zeros(2, 2)).item() == float("inf")


def smoothed_l0(pre_codes, threshold, eps):
    """sum_j H_eps(z_j - theta_j), mean over images, with H_eps the step convolved with the
    rectangle kernel of width eps: a ramp from 0 to 1 over [theta - eps/2, theta + eps/2]."""
    return ((pre_codes - threshold) / eps + 0.5).clamp(0, 1).sum(-1).mean()


def test_the_l0_penaltys_threshold_gradient_is_the_smoothed_l0s_derivative():
    """Rajamanoharan et al. 2024, eq. 12: the straight-through gradient of the L0 penalty with
    respect to theta is the derivative of the kernel-smoothed L0, here taken by a central
    finite difference (exact on the ramp, which is linear)."""
    eps = 0.1
    threshold = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    # units 0 and 1 have pre-activations inside the window around theta (0.57 and 1.2 lie
    # outside it), unit 2 none
    pre_codes = torch.tensor([[0.52, 0.97, 0.0], [0.48, 1.2, 3.0], [0.57, 1.01, 1.0]],
                             dtype=torch.float64)
    jumprelu_l0(pre_codes, threshold, eps).backward()
    h = 1e-6
    for j in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[j] = h
        theta = threshold.detach()
        numeric = (smoothed_l0(pre_codes, theta + step, eps)
                   - smoothed_l0(pre_codes, theta - step, eps)) / (2 * h)
        assert threshold.grad[j].item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-9), j
    assert threshold.grad.tolist() == pytest.approx([-20 / 3, -20 / 3, 0.0])


def test_jumprelus_gradients_are_the_papers_pseudo_derivatives():
    """Eq. 11: dz = H(z - theta) and dtheta = -(theta / eps) K((z - theta) / eps), summed over
    the batch."""
    eps = 0.1
    threshold = torch.tensor([0.5, 1.0], requires_grad=True)
    pre_codes = torch.tensor([[0.52, 0.93], [0.3, 1.04]], requires_grad=True)
    out = JumpReLU.apply(pre_codes, threshold, eps)
    assert out.flatten().tolist() == pytest.approx([0.52, 0.0, 0.0, 1.04])
    out.sum().backward()
    assert pre_codes.grad.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    # in the window: z=0.52 for theta 0.5, z=1.04 for theta 1.0; 0.3 and 0.93 are outside it
    assert threshold.grad.tolist() == pytest.approx([-0.5 / eps, -1.0 / eps])


def test_jumprelu_training_moves_the_thresholds_and_lowers_l0():
    torch.manual_seed(0)
    model = tiny_model("sae", sparsity="jumprelu", l0_weight=1.0, jumprelu_bandwidth=0.05,
                       jumprelu_init_threshold=0.05, lr=1e-2).train()
    x = torch.rand(64, 1, 28, 28)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        optimizer.zero_grad()
        terms = model.losses(x)
        terms["loss"].backward()
        optimizer.step()
        first = terms["l0"].item() if first is None else first
    assert terms["l0"].item() < 0.5 * first
    assert (model.threshold > 0.05).any()


def test_matryoshkas_loss_is_the_sum_of_its_prefixes_reconstruction_losses(unit_images):
    from modules.autoencoder import reconstruction_loss

    model = tiny_model("sae", sparsity="topk,matryoshka", k=4, prefixes=[2, 5]).eval()
    terms = model.losses(unit_images)
    with torch.no_grad():
        codes = model.encode(unit_images)
        prefixes = [reconstruction_loss(model.decode_logits(prefix_mask(codes, size)),
                                        unit_images, "mse") for size in (2, 5, 8)]
    assert prefix_mask(codes, 2)[:, 2:].abs().sum() == 0
    assert torch.equal(prefix_mask(codes, 2)[:, :2], codes[:, :2])
    assert terms["loss"].item() == pytest.approx(sum(p.item() for p in prefixes), rel=1e-6)
    assert terms["recon"].item() == pytest.approx(prefixes[-1].item(), rel=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"sparsity": "topk,batchtopk"}, "topk, batchtopk each set the code activation"),
    ({"sparsity": "kl,jumprelu"}, "jumprelu, kl each set the code activation"),
    ({"sparsity": "matryoshka"}, "sparsity matryoshka needs a base: give 'topk,matryoshka'"),
    ({"sparsity": "topk,matryoshka", "prefixes": [4, 2]}, r"prefixes=\[4, 2\] must increase"),
    ({"sparsity": "topk,matryoshka", "prefixes": [8]}, r"each in \[1, latent_dim=8\)"),
    ({"sparsity": "batchtopk", "k": 9}, r"k=9 must be in \[1, latent_dim=8\]")])
def test_settings_that_cannot_go_together_are_refused(options, message):
    with pytest.raises(UserError, match=message):
        SparseAutoencoder(**{**TINY, **options})


def test_batch_topks_threshold_travels_with_the_checkpoint():
    torch.manual_seed(0)
    model = tiny_model("sae", sparsity="batchtopk", k=1, threshold_lr=0.5).train()
    x = torch.rand(12, 1, 28, 28)
    for _ in range(3):
        model.losses(x)
    loaded = tiny_model("sae", sparsity="batchtopk", k=1, threshold_lr=0.5)
    loaded.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded.eval().encode(x), model.eval().encode(x))


def test_jumprelus_thresholds_train_at_their_own_rate():
    model = tiny_model("sae", sparsity="jumprelu", lr=1e-3, jumprelu_threshold_lr=0.02)
    rest, thresholds = model.configure_optimizers().param_groups
    assert thresholds["params"] == [model.threshold] and thresholds["lr"] == 0.02
    assert rest["lr"] == 1e-3 and len(rest["params"]) == len(list(model.parameters())) - 1



def test_the_target_l0_penalty_is_the_squared_relative_miss(unit_images):
    assert target_l0_penalty(torch.tensor(12.0), 8.0).item() == pytest.approx(0.25)
    assert target_l0_penalty(torch.tensor(8.0), 8.0).item() == 0.0
    model = tiny_model("sae", sparsity="jumprelu", l0_weight=0.5, jumprelu_target_l0=2.0)
    terms = model.losses(unit_images)
    with torch.no_grad():
        pre_codes = model.encoder(unit_images)
        fires = (pre_codes > model.threshold).float().sum(1).mean()
    assert terms["l0"].item() == pytest.approx(0.5 * (fires.item() / 2.0 - 1) ** 2, rel=1e-5)
    with pytest.raises(UserError, match=r"jumprelu_target_l0=9 must be in \(0, latent_dim=8\]"):
        tiny_model("sae", sparsity="jumprelu", jumprelu_target_l0=9)
