"""What a process that trains runs changes for the whole process, in one place apart from the
code of one run: malloc's thresholds, an environment variable Lightning sets, log levels and
warning filters, where the harness's lines go. `prepare_run_process` applies them all (bench
run's process, its workers and SLURM jobs, bench perf); `bench fit` takes the ones a Trainer
needs."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import warnings

from bench.errors import UserError

# What the harness is doing, for people: records of each module's logger (`getLogger(__name__)`,
# under "bench"), shown on standard output by `show_lines`. For programs that follow a suite
# (bench calibrate), "genbench.progress" carries events: records with `event` and its fields as
# attributes, so that no one parses the lines people read.
LINES = logging.getLogger("bench")
LINES.setLevel(logging.INFO)
EVENTS = logging.getLogger("genbench.progress")
EVENTS.setLevel(logging.INFO)


def progress_event(event: str, **fields) -> None:
    """`suite_planned` (suite, pending, total) once a suite knows its runs; `run_started`
    (index, total, run_id) as each run of this process starts."""
    EVENTS.info("%s %s", event, fields, extra={"event": event, **fields})


class RankZeroLines(logging.StreamHandler):
    """A line's text on the standard output of the moment (looked up per line, as print does,
    so that a redirect or a test's capture sees it), from DDP rank zero only (every rank runs
    the same suite; one speaks)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self.addFilter(self.rank_zero)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _) -> None:  # logging.StreamHandler sets it; the property reads it anew
        pass

    @staticmethod
    def rank_zero(record: logging.LogRecord) -> bool:
        from lightning_utilities.core.rank_zero import rank_zero_only  # Lightning's own rank

        return getattr(rank_zero_only, "rank", 0) == 0


def show_lines() -> None:
    """The harness's lines on standard output (once per process, however often it is asked)."""
    if not any(isinstance(handler, RankZeroLines) for handler in LINES.handlers):
        LINES.addHandler(RankZeroLines())


@contextlib.contextmanager
def only_lines_of(name: str):
    """Inside the block standard output shows the lines of the logger `name` (and its children)
    only: for a command that says in its own words what the harness does meanwhile, as bench
    calibrate and bench run --try do. Events still go out."""
    speaker = logging.Filter(name)
    handlers = [h for h in LINES.handlers if isinstance(h, RankZeroLines)]
    for handler in handlers:
        handler.addFilter(speaker)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(speaker)


def drop_failing_nvml_check() -> bool:
    """Unset PYTORCH_NVML_BASED_CUDA_CHECK where NVML cannot be loaded; True if it was unset.

    Lightning sets the variable on import so that torch.cuda.is_available() asks NVML instead of
    initialising CUDA (which would break forked workers). torch.optim.Adam asks
    torch.accelerator.current_accelerator(check_available=True) on every step, and on a host
    without the NVIDIA driver each ask dlopens libnvidia-ml.so.1, fails, and falls back to the
    CUDA runtime's count, uncached: a visible share of a small MLP's step, which a plain PyTorch
    script (not importing Lightning) never pays. Without NVML the variable changes no answer,
    so it goes; with NVML (GPU hosts) it stays."""
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        return False
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
        return True
    return False


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the
    kernel; True where it applied. A training step on a CPU frees and allocates the same large
    buffers (activations, gradients) every step, and past malloc's mmap threshold each one is a
    fresh mapping whose pages fault in again: thousands of page faults per conv step, a large
    share of it. The same as setting MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ before
    the process starts; it changes where memory comes from, not any figure."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to set
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 256 * 2**20)
                and libc.mallopt(M_TRIM_THRESHOLD, 1024 * 2**20))


SRUN_HINT = "The `srun` command is available on your system but is not used"


def quiet_srun_hint() -> None:
    """Lightning hints at `srun` in every process that finds the command on the PATH and is not a
    SLURM job step: on a cluster's login node that is every run, and it says nothing there.
    Inside a SLURM job that did not start its tasks with srun (an sbatch script that forgot it),
    the hint is right, and it stays."""
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings("ignore", message=SRUN_HINT)


def check_slurm_tasks(environ=os.environ) -> None:
    """Lightning counts a SLURM job's processes per node (--ntasks-per-node) and refuses a job
    step started with --ntasks alone, each process with an error deep in its launch; say it
    first, once per process, as the command to write instead."""
    ntasks = environ.get("SLURM_NTASKS", "1")
    if ntasks.isdigit() and int(ntasks) > 1 and "SLURM_NTASKS_PER_NODE" not in environ:
        raise UserError(
            f"this SLURM step has {ntasks} tasks from --ntasks (-n) {ntasks}, which Lightning "
            f"does not take (it counts processes per node): write `srun --ntasks-per-node "
            f"{ntasks}` instead (with --nodes N and bench run's --num-nodes N for N machines, "
            f"--devices {ntasks} per machine)")


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, `file:line: Category: message`, without Python's echo of the
    source line that raised it: a user reads what was warned and where, not the library's code."""
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


def one_line_warnings() -> None:
    """Every bench command prints warnings as one line (warnings.formatwarning is the hook the
    standard library gives for this)."""
    warnings.formatwarning = one_line_warning


def prepare_run_process() -> None:
    """Set up a process that trains runs: no per-run device banner, no warnings that say nothing
    about the run, no NVML probe on every optimiser step where NVML is missing, and malloc
    keeping freed memory for the next step."""
    keep_freed_memory()
    one_line_warnings()
    show_lines()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    drop_failing_nvml_check()
    quiet_srun_hint()
    # torch's deprecation notes inside Lightning's own calls (Fabric's all_gather, pytree)
    for noise in (".*LeafSpec.*is deprecated.*", ".*all_gather is deprecated.*"):
        warnings.filterwarnings("ignore", message=noise)
