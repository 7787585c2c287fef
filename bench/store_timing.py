"""How long the results store takes to record a row and to collect a table, by table size:
`python -m bench.store_timing [--sizes 100 1000 5000] [--store FILE.py]`.

Prints, for a folder already holding N rows of ~70 columns (a real row's width): the seconds
of one more `append_row` (the median of 5) and of `read_rows` when rows came since the view was
written (the rows collected and runs.csv / runs.parquet written again) and when none did.
`--store` times another implementation of `append_row` / `read_rows` (a file that defines
them, e.g. an older bench/results.py taken from git) on the same rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path


def example_row(i: int) -> dict:
    """A row as wide as a real one: keys, 50 figures, provenance and environment text."""
    row = {"suite": "timing", "model": "vae", "variant": f"v{i % 50}", "dataset": "mnist",
           "seed": i, "config_hash": f"{i:012x}", "status": "ok", "git_commit": "0" * 12,
           "timestamp": "2026-12-06T00:00:00+00:00", "checkpoint": f"/out/checkpoints/{i}",
           "config": '{"model": "vae", "params": {"backbone": "conv", "latent_dim": 32}}',
           "cpu": "AMD EPYC (family 25, model 17, stepping 1)", "torch": "2.14.1"}
    row |= {f"figure_{j}": i * 0.001 + j for j in range(50)}
    return row


def load_store(path: str | None):
    if path is None:
        import bench.results as store
        return store
    spec = importlib.util.spec_from_file_location("store_under_test", path)
    store = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(store)
    return store


def prefill(store, csv_path: Path, n: int) -> None:
    """n rows, written the store's own way, as fast as it allows (one table for an old store,
    with one append to lay out its folder)."""
    if hasattr(store, "_write_row_file"):
        store.append_row(csv_path, example_row(0))
        for i in range(1, n):
            store._write_row_file(store.rows_dir(csv_path), example_row(i))
    else:
        import pandas as pd
        store._write_atomic(pd.DataFrame([example_row(i) for i in range(n)]), csv_path)


def seconds(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--store", help="a file defining append_row and read_rows to time")
    args = parser.parse_args(argv)
    store = load_store(args.store)
    print(f"store: {args.store or 'bench/results.py'}")
    print(f"{'rows':>6} {'append (s)':>11} {'collect, new rows (s)':>22} {'collect, none (s)':>18}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            csv_path = Path(folder) / "runs.csv"
            prefill(store, csv_path, n)
            appends = [seconds(lambda i=i: store.append_row(csv_path, example_row(n + i)))
                       for i in range(5)]
            stale = seconds(lambda: store.read_rows(csv_path))
            fresh = seconds(lambda: store.read_rows(csv_path))
            assert len(store.read_rows(csv_path)) == n + 5
        print(f"{n:>6} {statistics.median(appends):>11.4f} {stale:>22.3f} {fresh:>18.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
