"""One line on the machine a benchmark ran on: CPUs, CPU model, memory, GPU, load."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


def memory() -> str:
    """Total memory, e.g. "24 GiB"."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        kb = int(next(x for x in lines if x.startswith("MemTotal")).split()[1])
        return f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        return "?"


def gpu_name() -> str | None:
    """The first CUDA device's name and the device count, or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"


def load() -> str:
    """The 1/5/15-minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def describe() -> str:
    """CPUs (usable), CPU model, memory, GPU, load average: where a benchmark's figures come from."""
    return (f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {cpu_model()}, {memory()} RAM, "
            f"GPU: {gpu_name() or 'none'}, load {load()}")
