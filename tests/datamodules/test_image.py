from pathlib import Path

import numpy as np
import pytest
import torch

from bench.errors import UserError
from datamodules import ImageDataModule, TensorBatches
from tests.data_files import write_cifar_dir, write_mnist_dir

FASHION_MNIST_DEB = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture
def mnist_files(tmp_path):
    return tmp_path, write_mnist_dir(tmp_path, n_train=300, n_test=100)


@pytest.fixture
def cifar_files(tmp_path):
    return tmp_path, write_cifar_dir(tmp_path, n_per_batch=40, n_test=50)


def make_dm(directory, dataset="mnist", **kwargs):
    dm = ImageDataModule(dataset, data_dir=str(directory), **{"own_files": True, **kwargs})
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist", "cifar10"])
def test_splits_hold_every_image_once(tmp_path, dataset):
    written = (write_cifar_dir(tmp_path) if dataset == "cifar10" else write_mnist_dir(tmp_path))
    dm = make_dm(tmp_path, dataset, val_size=20)
    n_train = len(written["train_images"])
    assert (len(dm.train_images), len(dm.val_images)) == (n_train - 20, 20)
    assert len(dm.test_images) == len(written["test_images"])
    together = torch.cat([dm.train_images, dm.val_images]).flatten(1)
    expected = torch.from_numpy(written["train_images"].reshape(n_train, -1))
    assert torch.equal(together.unique(dim=0), expected.unique(dim=0))


@pytest.mark.parametrize("dataset, shape", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_batches_are_float_nchw_in_unit_range(tmp_path, dataset, shape):
    (write_cifar_dir if dataset == "cifar10" else write_mnist_dir)(tmp_path)
    dm = make_dm(tmp_path, dataset, val_size=10, batch_size=16)
    x, y = next(iter(dm.train_dataloader()))
    assert dm.image_shape == shape and dm.num_classes == 10
    assert x.shape == (16, *shape) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_cifar_pixels_keep_their_channel_layout(cifar_files):
    directory, written = cifar_files
    dm = make_dm(directory, "cifar10", val_size=0, eval_batch_size=50)
    x, y = next(iter(dm.test_dataloader()))
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(written["test_images"]))
    assert torch.equal(y, torch.from_numpy(written["test_labels"]).long())


def test_validation_split_depends_only_on_split_seed(mnist_files):
    directory, _ = mnist_files
    first = make_dm(directory, val_size=50, split_seed=3, seed=1)
    second = make_dm(directory, val_size=50, split_seed=3, seed=2)
    other = make_dm(directory, val_size=50, split_seed=4)
    assert torch.equal(first.val_images, second.val_images)
    assert not torch.equal(first.val_images, other.val_images)


def test_val_size_beyond_training_split_is_an_error(mnist_files):
    with pytest.raises(UserError, match="val_size=300 must be in"):
        make_dm(mnist_files[0], val_size=300)


def test_subsets_limit_train_and_test(mnist_files):
    dm = make_dm(mnist_files[0], val_size=50, train_subset=64, test_subset=30)
    assert (len(dm.train_images), len(dm.val_images), len(dm.test_images)) == (64, 50, 30)


def indices_seen(batches: TensorBatches) -> list[int]:
    return [int(v) for _, labels in batches for v in labels]


def counting_batches(n, batch_size, **kwargs):
    """Labels are the image indices, so a batch says which images it holds."""
    return TensorBatches(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n), batch_size,
                         **kwargs)


def test_training_epoch_is_a_permutation_that_changes_each_epoch():
    batches = counting_batches(100, 10, shuffle=True, drop_last=True, seed=0)
    first, second = indices_seen(batches), indices_seen(batches)
    assert sorted(first) == sorted(second) == list(range(100))
    assert first != second


def test_shuffle_order_is_reproducible_from_the_seed():
    orders = [indices_seen(counting_batches(50, 8, shuffle=True, drop_last=True, seed=s))
              for s in (5, 5, 6)]
    assert orders[0] == orders[1] != orders[2]


def test_drop_last_gives_only_full_batches():
    batches = counting_batches(103, 10, shuffle=True, drop_last=True)
    assert len(batches) == 10 and all(len(labels) == 10 for _, labels in batches)


@pytest.mark.parametrize("n", [100, 103])
def test_training_shards_are_disjoint_and_equal_length(n):
    shards = [counting_batches(n, 8, shuffle=True, drop_last=True, seed=1, rank=r, world_size=2)
              for r in (0, 1)]
    seen = [indices_seen(shard) for shard in shards]
    assert len(shards[0]) == len(shards[1]) and not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_shards_cover_every_image_once(world_size):
    seen = []
    for rank in range(world_size):
        seen += indices_seen(counting_batches(103, 10, shuffle=False, drop_last=False, rank=rank,
                                              world_size=world_size))
    assert sorted(seen) == list(range(103))


def test_dynamic_binarisation_samples_pixels_with_their_intensity():
    torch.manual_seed(0)
    images = torch.full((2000, 1, 4, 4), 64, dtype=torch.uint8)  # intensity 64/255
    batches = TensorBatches(images, torch.zeros(2000), 2000, shuffle=False, drop_last=False,
                            binarize=True)
    x, _ = next(iter(batches))
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert x.mean().item() == pytest.approx(64 / 255, abs=0.01)


@pytest.mark.skipif(not FASHION_MNIST_DEB.exists(), reason="Debian dataset-fashion-mnist missing")
def test_real_fashion_mnist_has_its_published_size_and_range():
    dm = ImageDataModule("fashion_mnist", val_size=0)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_images), len(dm.test_images)) == (60000, 10000)
    assert dm.train_images.shape[1:] == (1, 28, 28) and dm.train_images.dtype == torch.uint8
    assert (int(dm.train_images.min()), int(dm.train_images.max())) == (0, 255)
    assert np.bincount(dm.test_labels.numpy()).tolist() == [1000] * 10  # balanced classes


def test_evaluation_binarisation_is_one_fixed_draw_whatever_the_run(mnist_files):
    directory, _ = mnist_files
    batches = []
    for run_seed in (0, 7):
        torch.manual_seed(100 + run_seed)  # a different global random state too
        dm = make_dm(directory, binarize=True, seed=run_seed, val_size=20, eval_batch_size=30)
        batches.append(torch.cat([x for x, _ in dm.test_dataloader()]))
    assert torch.equal(batches[0], batches[1])
    assert set(batches[0].unique().tolist()) == {0.0, 1.0}


def test_sharded_evaluation_sees_the_same_binarised_images(mnist_files):
    directory, _ = mnist_files
    dm = make_dm(directory, binarize=True, val_size=20)
    whole = torch.cat([x for x, _ in dm.test_dataloader()])
    for rank in (0, 1):
        shard = TensorBatches(dm._batches("test", train=False).images, dm.test_labels, 7,
                              shuffle=False, drop_last=False, rank=rank, world_size=2)
        assert torch.equal(torch.cat([x for x, _ in shard]), whole[shard.positions()])


def test_training_binarisation_depends_on_epoch_and_batch_not_the_global_state(mnist_files):
    directory, written = mnist_files
    images = torch.from_numpy(written["train_images"][:, None])
    batches = TensorBatches(images, torch.zeros(300), 50, shuffle=True, drop_last=True,
                            binarize=True, seed=3, epoch_fn=lambda: 4)
    first = [x for x, _ in batches]
    torch.rand(1000)  # move the global generator on
    again = [x for x, _ in batches]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


def test_positions_are_the_split_indices_in_yield_order():
    labels = torch.arange(40)
    batches = TensorBatches(torch.zeros(40, 1, 2, 2, dtype=torch.uint8), labels, 6, shuffle=True,
                            drop_last=True, seed=2, rank=1, world_size=2)
    yielded = torch.cat([y for _, y in batches])
    assert torch.equal(yielded, batches.positions(epoch=0)[: len(yielded)])


@pytest.mark.parametrize("start", [0, 3, 11])
def test_an_epoch_resumed_at_a_batch_goes_on_with_the_uninterrupted_batches(start):
    """What the harness's loop resumes from: epoch 2's batches from `start` on are those an
    uninterrupted pass over epoch 2 gives from there (binarised draws included)."""
    images = torch.randint(0, 256, (60, 1, 2, 2), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))

    def make():
        return TensorBatches(images, torch.arange(60), 5, shuffle=True, drop_last=True, seed=1,
                             binarize=True)

    uninterrupted = list(make().epoch_batches(2))
    resumed = list(make().epoch_batches(2, start))
    assert len(resumed) == 12 - start
    for (x, y), (x0, y0) in zip(resumed, uninterrupted[start:]):
        assert torch.equal(y, y0) and torch.equal(x, x0)


def test_iterating_alone_gives_the_next_epoch_each_pass_and_a_trainers_epoch_under_one():
    batches = TensorBatches(torch.zeros(40, 1, 1, 1, dtype=torch.uint8), torch.arange(40), 5,
                            shuffle=True, drop_last=True, seed=4)
    passes = [torch.cat([y for _, y in batches]) for _ in range(2)]
    assert torch.equal(passes[1], torch.cat([y for _, y in batches.epoch_batches(1)]))
    assert not torch.equal(passes[0], passes[1])
    batches.epoch_fn = lambda: 7
    assert torch.equal(torch.cat([y for _, y in batches]),
                       torch.cat([y for _, y in batches.epoch_batches(7)]))


def test_fixed_binarisation_draws_each_pixel_with_its_intensity():
    from datamodules.image import binarized_once

    white, black = torch.full((50, 1, 8, 8), 255, dtype=torch.uint8), torch.zeros(
        50, 1, 8, 8, dtype=torch.uint8)
    assert torch.equal(binarized_once(white, seed=1), white)  # p = 1 exactly: always on
    assert torch.equal(binarized_once(black, seed=1), black)
    grey = torch.full((200, 1, 8, 8), 64, dtype=torch.uint8)
    assert (binarized_once(grey, seed=1) == 255).float().mean().item() == pytest.approx(
        64 / 255, abs=0.01)


def test_every_batch_of_every_epoch_gets_its_own_seed():
    from datamodules.image import stream_seed

    seeds = {stream_seed(seed, "binarise", epoch, batch) for seed in range(3)
             for epoch in range(20) for batch in range(200)}
    assert len(seeds) == 3 * 20 * 200


def test_no_two_seeds_and_epochs_share_a_data_order():
    """Seeds 0..9 x epochs 0..49: every (seed, epoch) has its own order (a sum of the two gave
    seed 1's epoch 0 the order of seed 0's epoch 1)."""
    orders = {tuple(counting_batches(200, 10, shuffle=True, drop_last=True, seed=seed)
                    ._order(epoch).tolist()) for seed in range(10) for epoch in range(50)}
    assert len(orders) == 10 * 50


def test_an_epochs_order_depends_on_the_seed_and_epoch_alone():
    """Not on the global random state, the object, or the rank: rank r of W takes positions
    r, r + W, ... of the one order."""
    whole = counting_batches(60, 5, shuffle=True, drop_last=True, seed=7)._order(3)
    torch.rand(100)  # move the global generator on
    again = counting_batches(60, 5, shuffle=True, drop_last=True, seed=7)._order(3)
    ranks = [counting_batches(60, 5, shuffle=True, drop_last=True, seed=7, rank=r,
                              world_size=2)._order(3) for r in (0, 1)]
    assert torch.equal(whole, again)
    assert torch.equal(torch.stack(ranks, 1).flatten(), whole)


def test_training_binarisation_draws_new_pixels_every_epoch():
    """The same images in the same order (no shuffle) in two epochs: other pixels are drawn,
    while a batch redrawn in its own epoch is the same."""
    images = torch.full((40, 1, 8, 8), 128, dtype=torch.uint8)
    batches = TensorBatches(images, torch.zeros(40), 10, shuffle=False, drop_last=True,
                            binarize=True, seed=3)
    epoch0, epoch1 = (torch.cat([x for x, _ in batches.epoch_batches(e)]) for e in (0, 1))
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch0, torch.cat([x for x, _ in batches.epoch_batches(0)]))


def test_ordered_training_and_validation_batches_cover_their_splits_in_order(mnist_files):
    directory, _ = mnist_files
    dm = make_dm(directory, val_size=40, eval_batch_size=33, batch_size=10)
    ordered = list(dm.ordered_train_dataloader())
    assert len(ordered[0][0]) == 33  # the evaluation batch size, not the training one
    assert torch.equal(torch.cat([x for x, _ in ordered]), dm.train_images.float() / 255)
    assert torch.equal(torch.cat([x for x, _ in dm.val_dataloader()]),
                       dm.val_images.float() / 255)


def test_training_batches_are_shuffled_full_and_binarised_when_asked(mnist_files):
    directory, _ = mnist_files
    dm = make_dm(directory, val_size=50, batch_size=32, binarize=True)  # 250 training images
    batches = list(dm.train_dataloader())
    assert len(batches) == 250 // 32 and all(len(x) == 32 for x, _ in batches)  # drop_last
    order = torch.cat([y for _, y in batches])
    assert not torch.equal(order, dm.train_labels[: len(order)].long())  # shuffled
    assert set(torch.cat([x for x, _ in batches]).unique().tolist()) == {0.0, 1.0}
