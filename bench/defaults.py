"""The harness's own defaults, each written once: the light CLI (its help text) and the heavy
modules that use them (the loop, the runner, `--try`, the SLURM launcher) read them here. A
setting that belongs to a class (a family's hyper-parameters, the datamodule's batch size, the
evaluation's sample counts) keeps its default on that class."""

# Training batches between resumable checkpoints: a save is cheap next to a thousand steps of
# any family, and a crash loses at most that many.
CHECKPOINT_EVERY_STEPS = 1000

# `bench run --try`: training batches per entry.
TRY_BATCHES = 24
# Generated and real images the evaluation is tried on: enough for every metric to run (KID
# subsets, k-NN neighbourhoods) and for its per-image cost to be the full run's, small enough to
# take seconds. `--try-sample` sets it (a smaller one checks the path sooner, estimates worse).
TRY_SAMPLE = 200
# Below this many images the k-NN figures (precision/recall, density/coverage with their
# neighbourhood of 5) have no neighbourhood to draw.
LEAST_TRY_SAMPLE = 8

# `bench run --launcher slurm`: per job.
SLURM_TIME_MIN = 240
SLURM_GPUS = 1
SLURM_CPUS = 8
SLURM_MAX_PARALLEL = 64  # jobs of the array at once
