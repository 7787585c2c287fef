"""Results rows and suite files made by hand, for the tests of tables, compare, history and
suites."""

from __future__ import annotations

# The provenance of a sample figure measured on 1,000 generated and test images.
GEN = {"features": "genbench-cnn-mnist-aaaa", "n_real": 1000, "n_fake": 1000,
       "kid_subset_size": 500, "prc_neighborhood": 3, "eval_split": "test",
       "test_images": 1000}


def row(model="ae", variant="mlp", dataset="mnist", seed=0, **metrics):
    """A finished run's row with the given figures."""
    return {"suite": "t", "model": model, "variant": variant, "dataset": dataset, "seed": seed,
            "config_hash": f"{model}{variant}{dataset}{seed}", "status": "ok", **metrics}


def vae_row(model="vae", **columns):
    """A row of the VAE by default, which judges every figure the compare tests use."""
    return row(model, **columns)


def commit_rows(commit, hour, values, **extra):
    """A VAE's rows at one commit, an FID per seed."""
    return [{**vae_row(seed=i, fid=v, **GEN, **extra), "git_commit": commit,
             "timestamp": f"2026-11-2{hour}T00:00:00+00:00",
             "config_hash": f"{commit}-{i}"} for i, v in enumerate(values)]


def write_suite(tmp_path, text, name="suite.yaml"):
    """A suite file with `text` in it; its path as a string."""
    path = tmp_path / name
    path.write_text(text)
    return str(path)
