"""The harness's training loop on Lightning Fabric (bench/loop.py)."""

import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from bench.errors import UserError
from bench.loop import (Diverged, DivergenceWatch, LoopSettings, Progress, Run, apply_net_options,
                        configured_optimizers, fit, random_states, rank_seed,
                        restore_random_state)
from datamodules import TensorBatches
from modules import Autoencoder
from tests.modules.conftest import prototype_images, quiet_trainer, tiny_model

# Each family's variants whose step has its own schedule or randomness: the SAE's AuxK state
# and input masks, the VAE's noise, the GAN's generator every n_critic batches.
VARIANTS = {
    "ae": ("ae", {}),
    "ae-conv": ("ae", {"backbone": "conv"}),  # BatchNorm's running statistics too
    "sae-topk-auxk": ("sae", {"sparsity": "topk", "k": 4, "aux_k": 8}),
    "sae-mask": ("sae", {"sparsity": "input_mask"}),
    # the evaluation threshold, a moving average kept in a buffer; the prefixes' losses
    "sae-batchtopk-matryoshka": ("sae", {"sparsity": "batchtopk,matryoshka", "k": 2, "aux_k": 4}),
    "sae-jumprelu": ("sae", {"sparsity": "jumprelu"}),  # thresholds trained through an STE
    "vae": ("vae", {}),
    "vae-iwae": ("vae", {"objective": "iwae", "samples": 3}),  # k draws a step
    "gan-ns": ("gan", {}),
    "gan-wgan-gp": ("gan", {"loss": "wgan-gp", "n_critic": 2}),
    # power iterations, the generator EMA, DiffAugment's draws; R1 (at every batch: a lazy
    # one counts batches as n_critic does, in the run under the loop and in the epoch under a
    # Trainer)
    "gan-sngan-ema": ("gan", {"loss": "hinge", "spectral_norm": "discriminator", "ema_decay": 0.9,
                              "n_critic": 1, "diffaugment": "translation,cutout"}),
    "gan-r1": ("gan", {"r1_weight": 10.0}),
    # the codebook: started from the first batch, EMA statistics, restarts of dead codes
    "vqvae-ema-restart": ("vqvae", {"decay": 0.5, "restart_below": 0.5}),
    "vqvae-loss": ("vqvae", {"codebook": "loss"}),
}


def batches(n=112, batch_size=16, seed=3):
    """7 batches of 16 an epoch."""
    return TensorBatches(prototype_images(n), torch.zeros(n, dtype=torch.long), batch_size,
                         shuffle=True, drop_last=True, seed=seed)


def make_run(tmp_path, model, total=12, val_batches=None, **settings):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    optimizers, schedules = configured_optimizers(model)
    wrapped, *optimizers = fabric.setup(model, *optimizers)
    settings = LoopSettings(**{"checkpoint_every": 10**6, "warmup_batches": 0} | settings)
    return Run(fabric, wrapped, optimizers, schedules, batches(), val_batches, total, settings,
               tmp_path / "last.ckpt")


def trained(tmp_path, variant, total=12, **settings):
    family, params = VARIANTS[variant]
    torch.manual_seed(0)
    model = tiny_model(family, **params)
    run = make_run(tmp_path, model, total, **settings)
    fit(run)
    return model, run


@pytest.mark.parametrize("variant", ["ae", "ae-conv", "sae-topk-auxk", "sae-batchtopk-matryoshka",
                                     "sae-jumprelu", "vae", "vae-iwae", "gan-ns",
                                     "gan-sngan-ema", "gan-r1", "vqvae-ema-restart",
                                     "vqvae-loss"])
def test_the_loop_and_lightnings_trainer_train_a_family_to_the_same_weights(tmp_path, variant):
    """One batch per optimiser step both ways: the same batches in the same order, and the same
    updates (Lightning's automatic optimisation; the GAN's own manual step)."""
    model, _ = trained(tmp_path, variant, total=10)
    family, params = VARIANTS[variant]
    torch.manual_seed(0)
    reference = tiny_model(family, **params)
    steps = 10 if family != "gan" else 20  # the Trainer counts the GAN's two optimiser steps
    quiet_trainer(max_steps=steps, max_epochs=-1, deterministic=False).fit(
        reference, train_dataloaders=batches())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


class StepScheduled(Autoencoder):
    """The autoencoder with a step-interval scheduler: the rate times 0.7 at every
    `FREQUENCY`-th batch that steps the optimiser."""

    FREQUENCY = 2

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.7),
            "interval": "step", "frequency": self.FREQUENCY}}


class StepScheduledEvery3(StepScheduled):
    FREQUENCY = 3


# Each trainer setting the loop takes, over epochs of 7 batches: (family or module class,
# settings, epochs). Accumulation over 3 steps after batches 3, 6 and 7 of each epoch.
TRAINER_CASES = {
    "accumulate": ("ae", {"accumulate_grad_batches": 3}, 2),
    "clip-norm": ("ae", {"gradient_clip_val": 1e-3, "gradient_clip_algorithm": "norm"}, 2),
    "clip-value": ("ae", {"gradient_clip_val": 1e-5, "gradient_clip_algorithm": "value"}, 2),
    "step-schedule": (StepScheduledEvery3, {}, 2),
    "step-schedule-accumulate": (StepScheduled, {"accumulate_grad_batches": 3}, 2),
    "validation-cadence": ("vae", {"check_val_every_n_epoch": 2}, 3),  # its validation samples
}


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_each_trainer_setting_trains_to_the_weights_lightnings_trainer_gives(tmp_path, case):
    """The same setting in a suite's `trainer:` and in lightning.Trainer, whole epochs both
    ways (no sanity validation: see bench.loop.Loop), gives the same weights bitwise."""
    family, settings, epochs = TRAINER_CASES[case]

    def build():
        torch.manual_seed(0)
        return (tiny_model(family) if isinstance(family, str)
                else family(backbone="mlp", hidden=32, latent_dim=8))

    val = TensorBatches(prototype_images(32, seed=5), torch.zeros(32, dtype=torch.long), 16,
                        shuffle=False, drop_last=False)
    model = build()
    fit(make_run(tmp_path, model, total=7 * epochs, val_batches=val, **settings))
    reference = build()
    quiet_trainer(max_epochs=epochs, deterministic=False, num_sanity_val_steps=0,
                  **settings).fit(reference, train_dataloaders=batches(), val_dataloaders=val)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_a_resumed_run_ends_bitwise_where_the_uninterrupted_one_ends(tmp_path):
    """A checkpoint mid-epoch (batch 9 of epochs of 7), loaded into a fresh run: the rest of
    the budget gives the weights, optimiser state and random state of a run never stopped."""
    whole, _ = trained(tmp_path / "whole", "sae-mask", total=20)
    torch.manual_seed(0)
    first = make_run(tmp_path, tiny_model("sae", sparsity="input_mask"), total=9,
                     checkpoint_every=9)
    fit(first)
    torch.manual_seed(123)  # a fresh process draws from elsewhere until the state is back
    resumed = make_run(tmp_path, tiny_model("sae", sparsity="input_mask"), total=20)
    resumed.load(torch.load(tmp_path / "last.ckpt", weights_only=True))
    assert (resumed.progress.epoch, resumed.progress.batch_in_epoch) == (1, 2)
    fit(resumed)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], tensor), name


def test_the_generator_steps_after_every_n_critic_th_batch_of_the_run(tmp_path):
    """n_critic 4 over two epochs of 7 batches: generator steps after batches 4, 8 and 12 of
    the run (an epoch-relative count would give 4 and 11)."""
    family, params = VARIANTS["gan-wgan-gp"]
    torch.manual_seed(0)
    model = tiny_model(family, **(params | {"n_critic": 4}))
    run = make_run(tmp_path, model, total=14)
    fit(run)
    opt_g, opt_d = run.optimizers
    assert opt_d.state_dict()["state"][0]["step"] == 14
    assert opt_g.state_dict()["state"][0]["step"] == 3


class NaNFrom(Autoencoder):
    """An autoencoder whose loss turns NaN from its `bad`-th training batch on."""

    def __init__(self, bad: int, **kwargs):
        super().__init__(**kwargs)
        self.bad, self.calls = bad, 0

    def losses(self, x):
        terms = super().losses(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.bad:
                terms["loss"] = terms["loss"] * float("nan")
        return terms


@pytest.mark.parametrize("every, trained", [(3, 3), (50, 7)])
def test_divergence_stops_at_the_next_look_naming_the_first_non_finite_batch(tmp_path, every,
                                                                             trained):
    """Looks every `every` batches and at the epoch's end (7 batches)."""
    model = NaNFrom(bad=2, backbone="mlp", hidden=16, latent_dim=4)
    with pytest.raises(Diverged) as caught:
        fit(make_run(tmp_path, model, total=12, divergence_every=every))
    assert caught.value.step == 2 and model.calls == trained


@pytest.mark.parametrize("own_losses, other_rank_first_bad, step", [
    ([1.0] * 5, 3, 4),  # finite here, not on the other rank: this rank stops too
    ([1.0, 1.0, float("inf"), 1.0, 1.0], 3, 3),  # the earlier of the two
])
def test_under_ddp_the_ranks_stop_together_at_the_first_non_finite_batch_of_any(
        own_losses, other_rank_first_bad, step):
    def all_reduce(tensor, reduce_op):
        assert reduce_op == "min"
        return torch.minimum(tensor, torch.tensor(other_rank_first_bad))

    fabric = SimpleNamespace(world_size=2, all_reduce=all_reduce, device=torch.device("cpu"))
    watch = DivergenceWatch(fabric)
    for i, loss in enumerate(own_losses):
        watch.add(i, torch.tensor(loss))
    with pytest.raises(Diverged) as caught:
        watch.look()
    assert caught.value.step == step


def test_throughput_counts_the_images_trained_after_warm_up(tmp_path):
    _, run = trained(tmp_path, "ae", total=11, warmup_batches=4)
    assert run.progress.timed_images == (11 - 4) * 16 and run.progress.timed_seconds > 0


def test_the_progress_bar_reads_the_loss_without_a_warning(tmp_path):
    model = tiny_model("ae")
    run = make_run(tmp_path, model, total=20)  # the bar reads the loss at batch 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Converting a tensor with requires_grad=True ..."
        fit(run, progress_bar=True)
    assert run.progress.batches == 20


def test_a_checkpoint_is_written_every_checkpoint_every_batches(tmp_path, monkeypatch):
    import bench.loop

    saved = []
    monkeypatch.setattr(bench.loop, "save_atomically",
                        lambda fabric, path, state: saved.append(state["progress"]["batches"]))
    trained(tmp_path, "ae", total=12, checkpoint_every=4)
    assert saved == [4, 8, 12]


def test_a_checkpoint_cut_short_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from bench.loop import save_atomically

    fabric = L.Fabric(accelerator="cpu", devices=1)
    path = tmp_path / "last.ckpt"
    save_atomically(fabric, path, {"step": 4})
    monkeypatch.setattr(L.Fabric, "save", lambda self, p, state: (p.write_text("torn"),
                                                                    1 / 0))
    with pytest.raises(ZeroDivisionError):
        save_atomically(fabric, path, {"step": 8})
    assert torch.load(path, weights_only=True) == {"step": 4}


def test_a_stop_request_writes_a_checkpoint_at_that_batch_and_returns(tmp_path):
    family, params = VARIANTS["ae"]
    run = make_run(tmp_path, tiny_model(family, **params), total=20)
    progress = fit(run, stop_requested=lambda: run.progress.batches == 9)
    assert progress.batches == 9
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["progress"]["batches"] == 9


def test_gradients_are_clipped_as_torchs_clip_grad_value_clips_them(tmp_path):
    model, _ = trained(tmp_path, "ae", total=3, gradient_clip_val=1e-4,
                       gradient_clip_algorithm="value")
    torch.manual_seed(0)
    reference = tiny_model("ae")
    optimizer = torch.optim.Adam(reference.parameters(), lr=reference.hparams.lr)
    for i, (x, _) in enumerate(batches().epoch_batches(0)):
        if i == 3:
            break
        reference.losses(x)["loss"].backward()
        torch.nn.utils.clip_grad_value_(reference.parameters(), 1e-4)
        optimizer.step()
        optimizer.zero_grad()
    unclipped, _ = trained(tmp_path, "ae", total=3)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert not torch.equal(unclipped.state_dict()["encoder.1.weight"],
                           reference.state_dict()["encoder.1.weight"])


def test_accumulated_gradients_step_every_n_batches_of_an_epoch_at_its_end_and_the_runs(
        tmp_path):
    """Epochs of 7, accumulation over 4, 12 batches: steps after batches 4 and 7 of the first
    epoch (the Trainer's rule), 4 of the second, and the run's last (its 5th)."""
    _, run = trained(tmp_path, "ae", total=12, accumulate_grad_batches=4)
    assert run.optimizers[0].state_dict()["state"][0]["step"] == 4


def test_epoch_schedulers_step_at_each_epochs_end(tmp_path):
    """Burda et al.'s schedule: epoch 0 at the base rate, epochs 1-3 at 10^(-1/7) of it."""
    torch.manual_seed(0)
    model = tiny_model("vae", lr_schedule="burda")
    run = make_run(tmp_path, model, total=7 * 2)
    fit(run)
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 10 ** (-1 / 7))


@pytest.mark.parametrize("every, expected", [(1, 3), (2, 1), (None, 0)])
def test_validation_runs_every_check_val_every_n_epoch_epochs(tmp_path, every, expected,
                                                              monkeypatch):
    calls = []
    honest = Autoencoder.validation_step
    monkeypatch.setattr(Autoencoder, "validation_step",
                        lambda self, batch, i: calls.append(i) or honest(self, batch, i))
    val = TensorBatches(prototype_images(20), torch.zeros(20), 10, shuffle=False,
                        drop_last=False)
    fit(make_run(tmp_path, tiny_model("ae"), total=7 * 3, val_batches=val,
                 check_val_every_n_epoch=every))
    assert len(calls) == 2 * expected  # two validation batches each time


def test_training_terms_reach_the_loggers_every_log_every_n_steps_batches(tmp_path):
    from lightning.fabric.loggers import Logger

    calls = []

    class Capture(Logger):
        name, version = "capture", 0

        def log_metrics(self, metrics, step=None):
            calls.append((step, sorted(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    torch.manual_seed(0)
    model = tiny_model("vae")
    fabric = L.Fabric(accelerator="cpu", devices=1, loggers=[Capture()])
    optimizers, schedules = configured_optimizers(model)
    wrapped, *optimizers = fabric.setup(model, *optimizers)
    fit(Run(fabric, wrapped, optimizers, schedules, batches(), None, 12,
            LoopSettings(log_every_n_steps=4), tmp_path / "last.ckpt"))
    assert [step for step, _ in calls] == [3, 7, 11]  # batches 4, 8 and 12 (0-based index)
    assert calls[0][1] == ["train/elbo", "train/kl", "train/loss", "train/recon"]


@pytest.mark.parametrize("configured, optimizers, intervals", [
    ("one", 1, []), ("pair", 2, []), ("dict", 1, ["epoch"]), ("dict-step", 1, ["step"])])
def test_every_form_of_configure_optimizers_is_read(configured, optimizers, intervals):
    net = torch.nn.Linear(2, 2)
    adam = torch.optim.Adam(net.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(adam, lambda e: 1.0)
    forms = {"one": adam, "pair": (adam, torch.optim.SGD(net.parameters(), lr=1.0)),
             "dict": {"optimizer": adam, "lr_scheduler": scheduler},
             "dict-step": {"optimizer": adam, "lr_scheduler": {"scheduler": scheduler,
                                                                "interval": "step"}}}
    found, schedules = configured_optimizers(SimpleNamespace(
        configure_optimizers=lambda: forms[configured]))
    assert len(found) == optimizers and found[0] is adam
    assert [s.interval for s in schedules] == intervals
    assert all(s.scheduler is scheduler for s in schedules)


def test_settings_that_are_gone_or_unknown_are_refused_with_what_to_do():
    with pytest.raises(UserError, match="steps_per_call: it is gone.*remove the key"):
        LoopSettings.from_suite({"steps_per_call": 8})
    with pytest.raises(UserError, match=r"unknown key 'max_time'; allowed: "
                                         "accumulate_grad_batches.*the harness's loop"):
        LoopSettings.from_suite({"max_time": 5})
    assert LoopSettings.from_suite({"precision": "bf16-mixed"}).precision == "bf16-mixed"


def fake_fabric(world_size: int, rank: int, others: list[torch.Tensor] | None = None):
    """A Fabric as random_states sees it: rank `rank` of `world_size`, whose all_gather puts
    this rank's tensor among `others` (the other ranks' tensors, in rank order)."""
    def all_gather(tensor):
        tensors = list(others or [])
        tensors.insert(rank, tensor)
        return torch.stack(tensors)

    return SimpleNamespace(world_size=world_size, global_rank=rank, device=torch.device("cpu"),
                           all_gather=all_gather)


def test_every_ranks_random_state_comes_back_to_it_on_resume():
    torch.manual_seed(11)
    rank0_state = torch.get_rng_state()
    torch.manual_seed(12)
    saved = random_states(fake_fabric(2, 1, others=[rank0_state]))  # on rank 1
    rank1_state = torch.manual_seed(12).get_state()
    for rank, state in ((0, rank0_state), (1, rank1_state)):
        torch.manual_seed(99)
        restore_random_state(fake_fabric(2, rank), saved)
        assert torch.equal(torch.get_rng_state(), state)


def test_rank_seeds_differ_across_seeds_and_ranks():
    seeds = {rank_seed(seed, rank) for seed in range(50) for rank in range(1, 65)}
    assert len(seeds) == 50 * 64


def test_progress_round_trips_through_the_checkpoint_as_plain_numbers(tmp_path):
    from dataclasses import asdict

    progress = Progress(epoch=3, batch_in_epoch=2, batches=23, timed_images=100,
                        timed_seconds=1.5)
    torch.save({"progress": asdict(progress)}, tmp_path / "p.ckpt")
    assert Progress(**torch.load(tmp_path / "p.ckpt", weights_only=True)["progress"]) == progress


def test_channels_last_converts_the_conv_weights():
    model = Autoencoder(backbone="conv", image_shape=(1, 28, 28))
    apply_net_options(model, channels_last=True)
    # With one input channel both layouts are the same, so look at the others.
    conv_weights = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last)
                                and not p.is_contiguous() for p in conv_weights)


def test_compile_wraps_each_net_and_keeps_the_state_dict_keys():
    model = Autoencoder(backbone="mlp", image_shape=(1, 28, 28))
    keys = list(model.state_dict())
    apply_net_options(model, compile=True)  # torch.compile is lazy: nothing runs yet
    assert model.encoder._compiled_call_impl is not None
    assert model.decoder._compiled_call_impl is not None
    assert list(model.state_dict()) == keys


def test_a_full_disk_while_a_checkpoint_is_written_leaves_the_previous_one_whole(tmp_path,
                                                                                 monkeypatch):
    import errno

    from bench.loop import save_atomically

    fabric = L.Fabric(accelerator="cpu", devices=1)
    path = tmp_path / "last.ckpt"
    save_atomically(fabric, path, {"step": 4})

    def no_space(self, target, state):
        target.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(L.Fabric, "save", no_space)
    with pytest.raises(OSError, match=r"last.ckpt: the checkpoint could not be written \(No space "
                                      r"left on device\); the previous one is whole"):
        save_atomically(fabric, path, {"step": 8})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 4}
    assert not (tmp_path / "last.ckpt.partial").exists()
