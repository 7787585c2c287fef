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

# bench compare / history / calibrate: the significance level of the seed-noise test, and the
# relative change a figure may make before it counts as a regression (timings are noisy on
# shared CPUs).
ALPHA = 0.05
TOLERANCE = 0.02
TIMING_TOLERANCE = 0.5

# bench calibrate: seeds a side, disjoint seed sets (10 give 45 fixed pairs and a pool of 30
# seeds at 3 a side), null pairs drawn from the pool and seed sets drawn per plant.
CALIBRATION_SUITE = "smoke"
CALIBRATION_SEEDS = 3
CALIBRATION_NULL_SETS = 10
CALIBRATION_DRAWS = 400
CALIBRATION_OUT = "results/calibration"

# bench perf: timed steps (also the fewest whose harness/plain ratio is judged against the
# target: fewer time the warm-up's tail more than the loop), warm-up steps, repeats (the best
# counts), and the harness/plain ratio it should reach.
PERF_STEPS = 200
PERF_WARMUP = 20
PERF_REPEATS = 3
PERF_TARGET = 0.95

# The feature classifier behind classifier FID: its training epochs and seed.
EXTRACTOR_EPOCHS = 5
EXTRACTOR_SEED = 0
