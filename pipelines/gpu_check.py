"""``--device`` inside Ray: the device of a Ray worker from the GPUs Ray gave it, and a check,
before a job writes anything, that a GPU slot of the cluster can really run the model.

The rule itself (``auto``/``cuda``/``cpu``, the error that names node, torch build and driver)
is ``mrl_core.device``; this module only tells it which node it is on and whether Ray gave the
process a GPU.
"""

from __future__ import annotations

import socket

import ray
import torch

from mrl_core.device import DeviceError, describe, faiss_gpus, resolve_device


def ray_node() -> str:
    """This Ray node as ``hostname (IP)``."""
    return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"


def holds_gpu() -> bool:
    """Whether Ray gave this worker (or driver) at least one GPU."""
    return bool(ray.get_gpu_ids())


def worker_device(requested: str, what: str = "the model") -> torch.device:
    """The torch device for ``what`` in this Ray worker: ``resolve_device`` with the GPUs Ray gave it."""
    return resolve_device(requested, holds_gpu(), ray_node(), what)


def _probe(requested: str, with_faiss: bool, what: str) -> str:
    device = worker_device(requested, what)
    line = f"{ray_node()}: torch on {describe(device)}, GPU ids {ray.get_gpu_ids()}"
    if with_faiss:
        line += f", FAISS on {faiss_gpus(requested, holds_gpu(), ray_node())} GPU(s)"
    return line


def check_gpu_slot(num_gpus: float, requested: str, with_faiss: bool = False, what: str = "the model") -> str:
    """Run the device check in a task holding ``num_gpus`` GPUs, as the job's actors will (on an
    autoscaling cluster this waits for a GPU node); a description of what it found, or the
    ``DeviceError`` it raised there."""
    task = ray.remote(num_cpus=0, num_gpus=num_gpus, max_retries=0)(_probe)
    try:
        return ray.get(task.remote(requested, with_faiss, what))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, DeviceError):
            raise DeviceError(str(exc.cause)) from None
        raise
