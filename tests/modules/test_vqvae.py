"""The VQ-VAE's quantisation, losses, codebook updates, code prior and figures, against their
definitions on constructed inputs."""

import math

import pytest
import torch

from bench.errors import UserError
from modules.vqvae import (CodeCounts, codebook_perplexity, dead_codes, ema_codebook,
                           farthest_point_rows, nearest_codes, straight_through, vq_loss_terms)
from tests.modules.conftest import prototype_batches, quiet_trainer, tiny_model


def test_nearest_codes_are_the_brute_force_argmin():
    g = torch.Generator().manual_seed(0)
    vectors, codebook = torch.randn(200, 4, generator=g), torch.randn(16, 4, generator=g)
    expected = torch.cdist(vectors.double(), codebook.double()).argmin(1)
    assert torch.equal(nearest_codes(vectors, codebook), expected)


def test_the_straight_through_estimator_passes_z_q_forward_and_the_gradient_to_z_e():
    z_e = torch.randn(3, 4, requires_grad=True)
    z_q = torch.randn(3, 4)
    out = straight_through(z_e, z_q)
    upstream = torch.randn(3, 4)
    out.backward(upstream)
    assert torch.allclose(out, z_q) and torch.equal(z_e.grad, upstream)


def test_the_codebook_term_moves_the_codes_and_the_commitment_the_encoder():
    z_e = torch.randn(5, 3, requires_grad=True)
    codes = torch.randn(5, 3, requires_grad=True)
    codebook_term, commitment = vq_loss_terms(z_e, codes)
    assert codebook_term.item() == pytest.approx(((z_e - codes) ** 2).mean().item())
    assert commitment.item() == pytest.approx(codebook_term.item())
    codebook_grad, = torch.autograd.grad(codebook_term, [codes], retain_graph=True)
    assert torch.allclose(codebook_grad, 2 * (codes - z_e).detach() / 15)
    assert torch.autograd.grad(codebook_term, [z_e], allow_unused=True)[0] is None
    encoder_grad, = torch.autograd.grad(commitment, [z_e], retain_graph=True)
    assert torch.allclose(encoder_grad, 2 * (z_e - codes).detach() / 15)
    assert torch.autograd.grad(commitment, [codes], allow_unused=True)[0] is None


def test_one_ema_update_follows_the_papers_formula():
    """N = 0.9 * [1, 1, 1] + 0.1 * [2, 0, 1]; m likewise; e_j = m_j / N~_j with the Laplace
    smoothing N~ = (N + eps) / (sum N + K eps) * sum N, written out by hand."""
    size, sums = torch.ones(3), torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    counts, batch_sums = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([[4.0, 2.0], [0, 0], [1, 1]])
    new_size, new_sums, codebook = ema_codebook(size, sums, counts, batch_sums, 0.9, eps=0.01)
    expected_size = torch.tensor([1.1, 0.9, 1.0])
    expected_sums = torch.tensor([[1.3, 0.2], [0.0, 0.9], [1.9, 1.9]])
    total = 3.0
    smoothed = (expected_size + 0.01) / (total + 3 * 0.01) * total
    assert torch.allclose(new_size, expected_size) and torch.allclose(new_sums, expected_sums)
    assert torch.allclose(codebook, expected_sums / smoothed[:, None])


def test_ema_codes_converge_to_the_mean_of_the_vectors_assigned_to_them():
    """Fed the same assignment again and again, each used code's moving average tends to the
    mean of its vectors (k-means' centre update), and an unused code stays where it was."""
    size, sums = torch.ones(3), torch.eye(3)[:, :2].clone()
    counts, batch_sums = torch.tensor([2.0, 4.0, 0.0]), torch.tensor([[6.0, 2.0], [4, 8], [0, 0]])
    for _ in range(3000):
        size, sums, codebook = ema_codebook(size, sums, counts, batch_sums, 0.99)
    assert torch.allclose(codebook[:2], torch.tensor([[3.0, 1.0], [1.0, 2.0]]), atol=1e-3)
    assert torch.allclose(codebook[2], torch.zeros(2), atol=1e-3)  # its sums decayed with N


@pytest.mark.parametrize("counts, perplexity, dead", [
    ([5, 5, 5, 5], 4.0, 0), ([20, 0, 0, 0], 1.0, 3), ([3, 1, 0, 0], math.exp(-(0.75 * math.log(0.75)
                                                                             + 0.25 * math.log(0.25))), 2)])
def test_codebook_perplexity_and_dead_codes(counts, perplexity, dead):
    counts = torch.tensor(counts)
    assert codebook_perplexity(counts).item() == pytest.approx(perplexity)
    assert dead_codes(counts) == dead


def test_code_counts_count_every_position():
    counts = CodeCounts(4)
    counts.update(torch.tensor([[0, 1], [1, 1]]))
    counts.update(torch.tensor([[3, 1]]))
    assert counts.compute().tolist() == [1, 4, 0, 1]


@pytest.mark.parametrize("codebook", ["ema", "loss"])
def test_only_the_loss_codebook_is_trained_by_gradients(codebook):
    # codes started elsewhere than at this batch's vectors, where the codebook term is zero
    model = tiny_model("vqvae", codebook=codebook, codebook_init="normal")
    model.losses(torch.rand(4, 1, 28, 28))["loss"].backward()
    parameters = dict(model.named_parameters())
    if codebook == "loss":
        assert parameters["codebook"].grad.abs().sum() > 0
    else:
        assert "codebook" not in parameters and "codebook" in dict(model.named_buffers())
    assert parameters["encoder.1.weight"].grad.abs().sum() > 0  # through the straight-through


def test_the_ema_codebook_moves_in_training_only():
    model = tiny_model("vqvae")
    before = model.codebook.clone()
    model.eval()
    model.losses(torch.rand(4, 1, 28, 28))
    assert torch.equal(model.codebook, before)
    model.train()
    model.losses(torch.rand(4, 1, 28, 28))
    assert not torch.equal(model.codebook, before)


def test_a_dead_code_restarts_at_the_vector_farthest_from_its_nearest_code():
    model = tiny_model("vqvae", latent_dim=4, code_dim=2, codebook_size=3, restart_below=0.5,
                       decay=0.5)
    with torch.no_grad():
        model.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [50.0, 50.0]]))
        model.code_sums.copy_(model.codebook)
    vectors = torch.tensor([[0.1, 0.0], [0.9, 0.0], [3.0, 0.0], [0.0, 0.2]])
    model._update_codebook(vectors, nearest_codes(vectors, model.codebook))
    # code 2 is never assigned: N = 0.5 < 0.5 is false at the first step ...
    assert model.codebook[2].min() > 10
    model._update_codebook(vectors, nearest_codes(vectors, model.codebook))
    # ... and 0.25 < 0.5 at the second: it moves to (3, 0), the vector worst served
    assert torch.equal(model.codebook[2], torch.tensor([3.0, 0.0]))
    assert model.cluster_size[2] == 1.0 and torch.equal(model.code_sums[2], torch.tensor([3.0, 0.0]))


def test_without_restarts_a_dead_code_stays_dead():
    model = tiny_model("vqvae", latent_dim=4, code_dim=2, codebook_size=3, decay=0.5)
    with torch.no_grad():
        model.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [50.0, 50.0]]))
        model.code_sums.copy_(model.codebook)
    vectors = torch.tensor([[0.1, 0.0], [0.9, 0.0], [3.0, 0.0], [0.0, 0.2]])
    for _ in range(3):
        model._update_codebook(vectors, nearest_codes(vectors, model.codebook))
    assert torch.allclose(model.codebook[2], torch.tensor([50.0, 50.0]), rtol=1e-3)  # smoothing


def test_the_empirical_prior_draws_each_positions_codes_at_their_training_frequencies():
    model = tiny_model("vqvae", latent_dim=4, code_dim=2, codebook_size=3).eval()
    with torch.no_grad():
        model.prior_counts.copy_(torch.tensor([[0.0, 0.0, 7.0], [1.0, 0.0, 3.0]]))
        model.prior_fitted.fill_(True)
    torch.manual_seed(0)
    draws = torch.multinomial(model.code_prior_probabilities(), 4000, replacement=True).T
    assert (draws[:, 0] == 2).all()
    assert (draws[:, 1] == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert (draws[:, 1] != 1).all()


def test_fitting_the_prior_counts_the_training_codes_and_sampling_needs_it():
    model = tiny_model("vqvae").eval()
    with pytest.raises(RuntimeError, match="no code prior yet"):
        model.sample(2)
    images = torch.rand(10, 1, 28, 28)
    model.fit_latent_density([images[:6], images[6:]])
    expected = torch.nn.functional.one_hot(model.code_indices(images), 64).sum(0)
    assert torch.equal(model.prior_counts, expected.float())
    assert model.sample(3).shape == (3, 1, 28, 28)


def test_the_uniform_prior_needs_no_fitting():
    model = tiny_model("vqvae", code_prior="uniform").eval()
    assert model.sample(3).shape == (3, 1, 28, 28)


def test_own_metrics_count_the_test_splits_codes():
    model = tiny_model("vqvae", latent_dim=4, code_dim=2, codebook_size=4).eval()
    images = torch.rand(6, 1, 28, 28)
    indices = model.code_indices(images)
    counts = torch.bincount(indices.flatten(), minlength=4)
    figures = model.own_metrics([(images[:4], None), (images[4:], None)])
    assert figures == {"codebook_perplexity": pytest.approx(codebook_perplexity(counts).item()),
                       "dead_codes": dead_codes(counts)}


def trained_perplexity(**params) -> float:
    torch.manual_seed(0)
    model = tiny_model("vqvae", **params)
    quiet_trainer(max_steps=100).fit(model, train_dataloaders=prototype_batches(n=512))
    images = next(iter(prototype_batches(n=256, seed=1)))[0]
    return model.eval().own_metrics([(images, None)])["codebook_perplexity"]


@pytest.mark.parametrize("codebook", ["ema", "loss"])
def test_codes_started_from_the_data_stay_in_use(codebook):
    """The classic failure of a VQ-VAE is a collapse onto one code: started at the first
    batch's vectors, the codes of four noisy prototypes (two positions) stay several."""
    assert trained_perplexity(codebook=codebook) > 2


def test_codes_started_at_random_collapse_onto_one():
    """Why `data` is the default: N(0, 1) codes are far from the encoder's first outputs."""
    assert trained_perplexity(codebook_init="normal") < 1.5


def test_farthest_point_rows_spread_out_and_ignore_the_order():
    rows = torch.tensor([[0.0, 0.0], [1.0, 0.0], [8.0, 0.0], [0.0, 6.0], [9.0, 0.0]])
    chosen = farthest_point_rows(rows, 3)
    # (0, 6) is the farthest from the mean (3.6, 1.2), (9, 0) from it, and (1, 0) from both
    assert chosen.tolist() == [[0.0, 6.0], [9.0, 0.0], [1.0, 0.0]]
    assert torch.equal(farthest_point_rows(rows.flip(0), 3), chosen)
    assert len(farthest_point_rows(rows, 9)) == 5


def test_the_data_initialisation_happens_once_and_is_checkpointed():
    model = tiny_model("vqvae", latent_dim=4, code_dim=2, codebook_size=3)
    model.losses(torch.rand(8, 1, 28, 28))
    first = model.codebook.clone()
    assert bool(model.codebook_initialised) and "codebook_initialised" in model.state_dict()
    model.losses(torch.rand(8, 1, 28, 28))
    assert torch.allclose(model.codebook, first, atol=0.1)  # moved by the EMA, not replaced


@pytest.mark.parametrize("params, message", [
    ({"code_dim": 3}, "code_dim=3 must divide latent_dim=8"),
    ({"codebook": "kmeans"}, "unknown codebook update 'kmeans'; choose one of: ema, loss"),
    ({"code_prior": "pixelcnn"}, "unknown code_prior 'pixelcnn'"),
    ({"codebook_init": "kmeans"}, "unknown codebook_init 'kmeans'; choose one of: data, normal"),
    ({"decay": 1.0}, "decay=1.0"), ({"codebook_size": 1}, "codebook_size=1")])
def test_bad_settings_are_refused_by_name(params, message):
    with pytest.raises(UserError, match=message):
        tiny_model("vqvae", **params)
