"""Data-path benchmark: full-split load time and one epoch of batches without a model.

    python -m bench.perf_data [--dataset fashion_mnist] [--batch-size N] [--repeats 3]

Compares the tensor fast path with a torch DataLoader over the same uint8 tensors (the usual
TensorDataset route), so the cost of per-item indexing and collation is visible.
"""

from __future__ import annotations

import argparse
import time


def _epoch_seconds(batches) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for x, _ in batches:
        n += len(x)
    return time.perf_counter() - start, n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--batch-size", type=int, help="(default: the suites')")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import datamodules.image
    from datamodules import ImageDataModule, to_unit_float

    args.batch_size = args.batch_size or datamodules.image.BATCH_SIZE

    load_times = []
    for _ in range(args.repeats):
        datamodules.image._decoded.cache_clear()  # measure the decode, not the in-process cache
        dm = ImageDataModule(args.dataset, batch_size=args.batch_size)
        start = time.perf_counter()
        dm.setup()
        load_times.append(time.perf_counter() - start)
    print(f"{dm.spec.title}: {len(dm.train_images)} train + {len(dm.val_images)} val + "
          f"{len(dm.test_images)} test images from {dm.source.directory}")
    print(f"load (decode + split), best of {args.repeats}: {min(load_times):.3f} s")

    fast = [_epoch_seconds(dm.train_dataloader()) for _ in range(args.repeats)]
    seconds, n = min(fast)
    print(f"epoch, tensor fast path (batch {args.batch_size}): {seconds:.3f} s, "
          f"{n / seconds:,.0f} images/s")
    loader = DataLoader(TensorDataset(dm.train_images, dm.train_labels),
                        batch_size=args.batch_size, shuffle=True, drop_last=True)
    slow = [_epoch_seconds((to_unit_float(x), y) for x, y in loader) for _ in range(args.repeats)]
    slow_seconds, _ = min(slow)
    print(f"epoch, DataLoader(TensorDataset), 0 workers: {slow_seconds:.3f} s, "
          f"{n / slow_seconds:,.0f} images/s")
    print(f"fast path speed-up: {slow_seconds / seconds:.1f}x; torch threads "
          f"{torch.get_num_threads()}")


if __name__ == "__main__":
    main()
