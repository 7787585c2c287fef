"""What a row's figures were made on: the hardware, the instruction sets torch dispatches to,
the threads, and the library versions.

Training is not bitwise across hardware: another CPU's instruction set makes oneDNN and ATen
pick other kernels, which sum floats in another order, and a chaotic run then drifts as
another seed would (measured: conv rows moved, MLP rows did not; docs/reproducing.md). So
these columns are provenance: `bench compare` and `bench history` judge figures made on
different hardware or library versions by seed noise only. torch is imported inside the
functions: the regression gate reads the column names without the stack.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

# What makes two machines compute different floats from the same code, seed and data.
HARDWARE_COLUMNS = ["cpu", "cpu_capability", "onednn_isa", "torch_threads", "gpu", "cuda",
                    "cudnn"]
# Library versions: another one may change a kernel or a default.
VERSION_COLUMNS = ["python", "torch", "lightning", "torchmetrics", "torch_fidelity"]
ENVIRONMENT_COLUMNS = HARDWARE_COLUMNS + VERSION_COLUMNS


def cpu_model() -> str:
    """The CPU's model name with its family, model and stepping numbers, as the kernel reports
    them (/proc/cpuinfo), else the platform's name. The numbers tell CPU generations apart where
    a virtual machine shows a generic name ("AMD EPYC")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""

    def field(key: str) -> str | None:
        found = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
        return found.group(1).strip() if found else None

    name = field("model name")
    if not name:
        return platform.processor() or platform.machine() or "unknown"
    numbers = [f"{key} {field(pattern)}" for key, pattern in
               (("family", "cpu family"), ("model", "model"), ("stepping", "stepping"))
               if field(pattern)]
    return " ".join(name.split()) + (f" ({', '.join(numbers)})" if numbers else "")


@functools.lru_cache(maxsize=1)
def onednn_isa() -> str:
    """The instruction set oneDNN runs its CPU kernels with (conv layers on a CPU), as its verbose
    header names it ("Intel AVX2", "Intel AVX-512 with ..."): the CPU's best unless
    ONEDNN_MAX_CPU_ISA limits it.

    Hand-written because neither torch nor oneDNN's exported symbols tell it: oneDNN prints it
    once, in the header of its verbose output, on a C-level stdout that Python cannot capture;
    so stdout's file descriptor is pointed at a temporary file for one small convolution."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return "none"
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    unread = f"unread (limit {limit})" if limit else "unread"
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        return unread
    with tempfile.TemporaryFile() as capture:
        try:
            os.dup2(capture.fileno(), 1)
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch.nn.functional.conv2d(torch.ones(4, 16, 32, 32), torch.ones(16, 16, 3, 3))
        except Exception:  # noqa: BLE001 - a record of the machine must not stop a run
            return unread
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        capture.seek(0)
        found = re.search(rb"cpu,isa:([^\r\n]+)", capture.read())
    return found.group(1).decode().strip() if found else unread


def hardware(device=None) -> dict[str, object]:
    """The hardware columns of a row made on `device` (a torch.device; None: the CPU)."""
    import torch

    facts: dict[str, object] = {
        "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_isa": onednn_isa(), "torch_threads": torch.get_num_threads(),
        "gpu": None, "cuda": None, "cudnn": None}
    if device is not None and torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts |= {"gpu": f"{props.name} ({props.total_memory / 2**30:.0f} GiB)",
                  "cuda": torch.version.cuda,
                  "cudnn": str(torch.backends.cudnn.version())}
    return facts


def versions() -> dict[str, str]:
    """The version columns of a row."""
    import lightning
    import torch
    import torch_fidelity
    import torchmetrics

    return {"python": platform.python_version(), "torch": torch.__version__,
            "lightning": lightning.__version__, "torchmetrics": torchmetrics.__version__,
            "torch_fidelity": torch_fidelity.__version__}


def describe(rows) -> str:
    """One line per distinct environment in a table's rows ('AMD EPYC, ATen AVX512, oneDNN
    Intel AVX2, 1 thread; torch 2.14.1'), for table captions and summaries."""
    lines = []
    present = [c for c in ENVIRONMENT_COLUMNS if c in rows.columns]
    if not present or rows.empty:
        return "hardware not recorded (rows written before genbench recorded it)"
    for _, r in rows[present].drop_duplicates().iterrows():
        def given(column):
            value = r.get(column)
            return None if value is None or value != value else value  # NaN: not recorded

        parts = [given("cpu") or "CPU ?", f"ATen {given('cpu_capability') or '?'}",
                 f"oneDNN {given('onednn_isa') or '?'}"]
        threads = given("torch_threads")
        if threads is not None:
            parts.append(f"{int(float(threads))} thread{'s' if float(threads) != 1 else ''}")
        if given("gpu"):
            parts.append(f"{given('gpu')}, CUDA {given('cuda')}, cuDNN {given('cudnn')}")
        software = ", ".join(f"{c} {given(c)}" for c in VERSION_COLUMNS if given(c))
        lines.append(", ".join(parts) + (f"; {software}" if software else ""))
    return "\n".join(lines)
