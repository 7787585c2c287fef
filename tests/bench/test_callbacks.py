"""The harness's callbacks and process settings (bench/callbacks.py, bench/runner.py)."""

import ctypes
import os
from pathlib import Path

import pytest
import torch

from bench.callbacks import DivergenceGuard, NetOptions, TrainThroughput, drop_failing_nvml_check
from bench.runner import harness_callbacks
from modules import Autoencoder

NVML = "PYTORCH_NVML_BASED_CUDA_CHECK"


def _fail_to_load(name, *args, **kwargs):
    raise OSError(f"{name}: cannot open shared object file")


def test_nvml_check_is_dropped_where_nvml_cannot_be_loaded(monkeypatch):
    monkeypatch.setenv(NVML, "1")
    monkeypatch.setattr(ctypes, "CDLL", _fail_to_load)
    assert drop_failing_nvml_check() is True
    assert NVML not in os.environ


def test_nvml_check_stays_where_nvml_loads(monkeypatch):
    monkeypatch.setenv(NVML, "1")
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *args, **kwargs: object())
    assert drop_failing_nvml_check() is False
    assert os.environ[NVML] == "1"


def test_nvml_setting_chosen_by_the_user_is_left_alone(monkeypatch):
    monkeypatch.setenv(NVML, "0")
    monkeypatch.setattr(ctypes, "CDLL", _fail_to_load)
    assert drop_failing_nvml_check() is False
    assert os.environ[NVML] == "0"


@pytest.mark.parametrize("options, expected", [({}, False), ({"channels_last": True}, True),
                                               ({"compile": True}, True)])
def test_net_options_join_the_callbacks_only_when_one_is_on(options, expected, tmp_path):
    net_options = NetOptions(**options)
    callbacks = harness_callbacks(TrainThroughput(), DivergenceGuard(), Path(tmp_path), 100,
                                  progress=False, net_options=net_options)
    assert (net_options in callbacks) is expected


def test_channels_last_converts_the_conv_weights():
    model = Autoencoder(backbone="conv", image_shape=(1, 28, 28))
    NetOptions(channels_last=True).setup(None, model, "fit")
    # With one input channel both layouts are the same, so look at the others.
    conv_weights = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last)
                                and not p.is_contiguous() for p in conv_weights)


def test_compile_wraps_each_net_and_keeps_the_state_dict_keys():
    model = Autoencoder(backbone="mlp", image_shape=(1, 28, 28))
    keys = list(model.state_dict())
    NetOptions(compile=True).setup(None, model, "fit")  # torch.compile is lazy: nothing runs yet
    assert model.encoder._compiled_call_impl is not None
    assert model.decoder._compiled_call_impl is not None
    assert list(model.state_dict()) == keys


def _fit_with(tmp_path, callbacks, steps_per_call, model=None, **trainer_args):
    from datamodules import ImageDataModule
    from tests.data_files import write_mnist_dir
    from tests.modules.conftest import quiet_trainer, tiny_model

    if not (tmp_path / "mnist").exists():
        write_mnist_dir(tmp_path / "mnist", n_train=112, n_test=10)  # 7 batches of 16
    dm = ImageDataModule("mnist", data_dir=str(tmp_path / "mnist"), batch_size=16, val_size=0,
                         steps_per_call=steps_per_call)
    model = model or tiny_model("ae")
    trainer = quiet_trainer(limit_val_batches=0, callbacks=callbacks,
                            **({"max_steps": 12, "max_epochs": -1} | trainer_args))
    trainer.fit(model, datamodule=dm)
    return trainer


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


@pytest.mark.parametrize("steps_per_call", [None, 4])
def test_divergence_names_the_first_batch_whose_loss_was_not_finite(tmp_path, steps_per_call):
    from bench.callbacks import Diverged

    model = NaNFrom(bad=6, backbone="mlp", hidden=16, latent_dim=4)
    with pytest.raises(Diverged) as caught:
        _fit_with(tmp_path, [DivergenceGuard(every_n_batches=5)], steps_per_call, model)
    assert caught.value.step == 6


@pytest.mark.parametrize("own_losses, other_rank_first_bad, step", [
    ([1.0] * 5, 3, 4),  # finite here, not on the other rank: this rank stops too
    ([1.0, 1.0, float("inf"), 1.0, 1.0], 3, 3),  # the earlier of the two
])
def test_under_ddp_the_ranks_stop_together_at_the_first_non_finite_batch_of_any(
        own_losses, other_rank_first_bad, step):
    from types import SimpleNamespace

    from bench.callbacks import Diverged

    def reduce(tensor, reduce_op):
        assert reduce_op == "min"
        return torch.minimum(tensor, torch.tensor(other_rank_first_bad))

    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(reduce=reduce))
    module = SimpleNamespace(first_batch_index=lambda batch: 0)
    with pytest.raises(Diverged) as caught:
        DivergenceGuard(every_n_batches=5).on_train_batch_end(
            trainer, module, torch.tensor(own_losses), batch=None, batch_idx=0)
    assert caught.value.step == step


@pytest.mark.parametrize("steps_per_call", [None, 3])
def test_throughput_counts_the_images_trained_after_warm_up(tmp_path, steps_per_call):
    throughput = TrainThroughput(warmup_batches=4)
    _fit_with(tmp_path, [throughput], steps_per_call, max_steps=11)
    # K=3: the clock starts at the chunk that begins after 4 batches are done (batch 7)
    first_timed = 4 if steps_per_call is None else 6
    assert throughput.images == (11 - first_timed) * 16 and throughput.batches == 11


# K=3 over epochs of 7 batches: Trainer steps end after batches 3, 6, 7, 10, 12 (the budget)
@pytest.mark.parametrize("steps_per_call, saved_at", [(None, [4, 8, 12]), (3, [6, 10, 12])])
def test_the_periodic_checkpoint_follows_every_crossed_multiple(tmp_path, steps_per_call,
                                                                saved_at, monkeypatch):
    from lightning.pytorch import Trainer

    from bench.callbacks import PeriodicCheckpoint

    saves = []

    def save(self, path, *args, **kwargs):  # a checkpoint that says which step wrote it
        saves.append(self.global_step)
        path.write_text(str(self.global_step))

    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    (tmp_path / "ckpt").mkdir()
    _fit_with(tmp_path, [PeriodicCheckpoint(tmp_path / "ckpt", every_n_steps=4)],
              steps_per_call)
    assert saves == saved_at
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["last.ckpt"]
    assert (tmp_path / "ckpt" / "last.ckpt").read_text() == str(saved_at[-1])


def test_a_checkpoint_cut_short_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from lightning.pytorch import Trainer

    from bench.callbacks import PeriodicCheckpoint

    def save(self, path, *args, **kwargs):
        path.write_text(str(self.global_step))
        if self.global_step >= 8:
            raise MemoryError("killed")  # the run dies while it writes the second one

    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(MemoryError, match="killed"):
        _fit_with(tmp_path, [PeriodicCheckpoint(tmp_path / "ckpt", every_n_steps=4)], None)
    assert (tmp_path / "ckpt" / "last.ckpt").read_text() == "4"


def rank_of(world_size: int, rank: int, others: list[torch.Tensor] | None = None):
    """A Trainer as RandomState sees it: rank `rank` of `world_size`, whose all_gather puts this
    rank's tensor among `others` (the other ranks' tensors, in rank order)."""
    from types import SimpleNamespace

    def all_gather(tensor):
        tensors = list(others or [])
        tensors.insert(rank, tensor)
        return torch.stack(tensors)

    strategy = SimpleNamespace(root_device=torch.device("cpu"), all_gather=all_gather)
    return SimpleNamespace(world_size=world_size, global_rank=rank, strategy=strategy)


def draws_after_fit_start(seed: int, trainer) -> torch.Tensor:
    from bench.callbacks import RandomState

    torch.manual_seed(seed)  # as the run seeds every rank alike
    state = RandomState(seed)
    state.setup(trainer, None, "fit")
    state.on_fit_start(trainer, None)
    return torch.rand(4)


def test_under_ddp_each_rank_draws_its_own_noise_and_rank_zero_a_single_processs():
    single = draws_after_fit_start(3, rank_of(1, 0))
    ranks = [draws_after_fit_start(3, rank_of(3, r)) for r in range(3)]
    assert torch.equal(ranks[0], single)
    assert not torch.equal(ranks[1], ranks[0]) and not torch.equal(ranks[2], ranks[1])
    assert not torch.equal(draws_after_fit_start(4, rank_of(3, 1)), ranks[1])  # and per seed


def test_rank_seeds_differ_across_seeds_and_ranks():
    from bench.callbacks import rank_seed

    seeds = {rank_seed(seed, rank) for seed in range(50) for rank in range(1, 65)}
    assert len(seeds) == 50 * 64


def test_every_ranks_random_state_comes_back_to_it_on_resume():
    from bench.callbacks import RandomState

    torch.manual_seed(11)
    rank0_state = torch.get_rng_state()
    torch.manual_seed(12)
    rank1_state = torch.get_rng_state()
    saving = RandomState()
    saving.setup(rank_of(2, 1, others=[rank0_state]), None, "fit")
    saved = saving.state_dict()  # on rank 1, whose state is rank1_state
    for rank, state in ((0, rank0_state), (1, rank1_state)):
        torch.manual_seed(99)
        loading = RandomState()
        loading.setup(rank_of(2, rank), None, "fit")
        loading.load_state_dict(saved)
        loading.on_fit_start(rank_of(2, rank), None)  # a resumed rank is not reseeded
        assert torch.equal(torch.get_rng_state(), state)


def test_a_checkpoint_with_one_cpu_state_from_before_per_rank_states_still_resumes():
    from bench.callbacks import RandomState

    torch.manual_seed(21)
    saved = torch.get_rng_state()
    torch.manual_seed(99)
    state = RandomState()
    state.setup(rank_of(1, 0), None, "fit")
    state.load_state_dict({"torch": saved, "cuda": []})
    assert torch.equal(torch.get_rng_state(), saved)
