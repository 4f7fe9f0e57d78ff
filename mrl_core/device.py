"""Which device a model (or FAISS) runs on, and a clear error when a GPU is there but unusable.

``--device auto`` (the default of every CLI) means: a process that holds a GPU runs on it, and
one that cannot use the GPU it holds stops with a ``DeviceError`` naming the node, torch's CUDA
build, the NVIDIA driver and the way out (``--device cpu``), instead of quietly running on the
CPU. ``cpu`` runs on the CPU on purpose, ``cuda`` insists on the GPU. Nothing here imports Ray:
callers say whether their process holds a GPU.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
import warnings
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
"""The values of ``--device``."""

MIN_DRIVER = {11: 450, 12: 525, 13: 580}
"""Oldest NVIDIA driver branch that runs each CUDA major version (with minor-version
compatibility; a build for CUDA 12.8 runs best on >= 570)."""

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
GPUS_DIR = Path("/proc/driver/nvidia/gpus")


class DeviceError(RuntimeError):
    """A GPU is held (or asked for) but cannot be used; the message says why and what to do."""


def check_device(requested: str) -> str:
    """``requested`` if it is one of ``DEVICES``, else ValueError naming them."""
    if requested not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {requested!r}")
    return requested


def node_name() -> str:
    """This machine as ``hostname (IP)``, for error messages."""
    host = socket.gethostname()
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return host
    return f"{host} ({ip})"


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (``/proc/driver/nvidia/version`` or nvidia-smi), or None."""
    try:
        match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", DRIVER_VERSION_FILE.read_text())
        if match:
            return match.group(1)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            lines = out.stdout.strip().splitlines()
            if out.returncode == 0 and lines:
                return lines[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def local_gpu_count() -> int:
    """GPUs the NVIDIA driver exposes on this machine (``/proc/driver/nvidia/gpus``), whether or
    not CUDA works: what Ray would count, independent of torch and FAISS."""
    try:
        return sum(1 for _ in GPUS_DIR.iterdir())
    except OSError:
        return 0


def torch_build() -> str:
    """torch's version and the CUDA version it was built for, e.g. ``torch 2.10.0 (CUDA 12.8)``."""
    cuda = torch.version.cuda
    return f"torch {torch.__version__} ({f'CUDA {cuda}' if cuda else 'no CUDA: a CPU-only build'})"


def driver_note(cuda: str | None = None) -> str:
    """The driver found, and whether it is new enough for a CUDA ``cuda`` build (torch's by default)."""
    cuda = cuda if cuda is not None else torch.version.cuda
    found = driver_version()
    if found is None:
        return "no NVIDIA driver found (no /proc/driver/nvidia/version, no nvidia-smi)"
    note = f"NVIDIA driver {found}"
    if cuda:
        major = int(cuda.split(".")[0])
        need = MIN_DRIVER.get(major)
        if need and int(found.split(".")[0]) < need:
            note += f", too old for CUDA {cuda} (needs >= {need})"
    return note


def _cuda_failure() -> str | None:
    """Why torch cannot use CUDA here (its own warning when it gives one), or None if it can."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            available = torch.cuda.is_available() and torch.cuda.device_count() > 0
        except RuntimeError as exc:  # a broken driver can raise instead of returning False
            return str(exc).splitlines()[0]
    if available:
        try:
            torch.zeros(1, device="cuda")
            return None
        except RuntimeError as exc:
            return str(exc).splitlines()[0]
    said = [str(w.message).splitlines()[0] for w in caught if "CUDA" in str(w.message)]
    return said[0] if said else "torch.cuda.is_available() is False"


def gpu_error(what: str, reason: str, node: str | None = None) -> DeviceError:
    """A ``DeviceError`` (one line) for ``what`` failing on the GPU: node, torch build, driver,
    ``reason``, and ``--device cpu`` as the way to run on the CPU on purpose."""
    return DeviceError(
        f"{what} cannot use the GPU on node {node or node_name()}: {reason}; {torch_build()}, "
        f"{driver_note()}. Install a torch/faiss build that matches the driver (infra/README.md, "
        f"'Versions'), or pass --device cpu to run on the CPU on purpose."
    )


def resolve_device(requested: str, holds_gpu: bool, node: str | None = None,
                   what: str = "the model") -> torch.device:
    """The torch device for a process that does (``holds_gpu``) or does not hold a GPU.

    ``auto``: CUDA when it holds one, else the CPU; ``cuda``: CUDA or an error; ``cpu``: the CPU.
    A held GPU that torch cannot use is a ``DeviceError``, never a silent CPU run.
    """
    check_device(requested)
    if requested == "cpu" or (requested == "auto" and not holds_gpu):
        return torch.device("cpu")
    failure = _cuda_failure()
    if failure is not None:
        if not holds_gpu:
            failure = f"this process holds no GPU ({failure})"
        raise gpu_error(what, failure, node)
    return torch.device("cuda")


def faiss_build(faiss: Any) -> str:
    """Which FAISS is installed, e.g. ``faiss 1.15.1 (a GPU build)``."""
    kind = "a GPU build" if hasattr(faiss, "StandardGpuResources") else "a CPU-only build: faiss-cpu"
    return f"faiss {getattr(faiss, '__version__', '?')} ({kind})"


def faiss_gpus(requested: str, holds_gpu: bool, node: str | None = None) -> int:
    """GPUs FAISS should use in a process that does (``holds_gpu``) or does not hold GPUs:
    0 for ``cpu`` (or ``auto`` without a GPU), else every GPU FAISS sees, or a ``DeviceError``
    when it sees none."""
    import faiss

    check_device(requested)
    if requested == "cpu" or (requested == "auto" and not holds_gpu):
        return 0
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n == 0:
        reason = f"{faiss_build(faiss)} sees no GPU"
        if not holds_gpu:
            reason = f"this process holds no GPU; {reason}"
        raise gpu_error("FAISS", reason, node)
    return int(n)


def describe(device: torch.device) -> str:
    """``device`` for a log line: ``cpu`` or ``cuda (NVIDIA H100 80GB HBM3)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)
