"""What a run keeps on disk to resume: one checkpoint per epoch (``<out>/checkpoints/epoch-NNNN``)
holding model, optimizer, scheduler, RNG, history and the settings it was trained under, so that a
resume under other settings is refused instead of silently mixing two runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"

def differences(
    saved: Mapping[str, Any], given: Mapping[str, Any], saved_in: str = "checkpoint"
) -> list[str]:
    """``"name: checkpoint X, given Y"`` for each setting that differs (or is set in one only);
    ``saved_in`` names where the saved settings come from."""
    missing = "(not set)"
    return [
        f"{k}: {saved_in} {saved.get(k, missing)!r}, given {given.get(k, missing)!r}"
        for k in sorted(set(saved) | set(given))
        if saved.get(k, missing) != given.get(k, missing)
    ]


def check_settings(state: Mapping[str, Any], settings: Mapping[str, Any], path: Path,
                   out_dir: Path) -> None:
    """Refuse to resume the checkpoint at ``path`` when it was written under other settings.

    Checkpoints from before settings were recorded (none in ``state``) are not checked.
    """
    saved = state.get("settings")
    if saved is None:
        log.warning("checkpoint %s records no settings: resuming it unchecked", path)
        return
    diff = differences(saved, settings)
    if diff:
        raise ValueError(
            f"checkpoint {path} was trained with other settings: {'; '.join(diff)}. Resuming "
            f"would mix two runs: to start fresh, write to another --out, or delete "
            f"{Path(out_dir) / CHECKPOINTS}; to continue it, run with its settings."
        )


def save_checkpoint(
    out_dir: str | Path,
    epoch: int,
    step: int,
    objective: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
    history: list[dict[str, Any]],
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<out_dir>/checkpoints/epoch-NNNN/state.pt`` atomically (temp dir, then rename)."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch + 1:04d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(
        {
            "epoch": epoch,
            "step": step,
            "model": objective.state_dict(),
            "optimizers": [o.state_dict() for o in optimizers],
            "schedulers": [s.state_dict() for s in schedulers],
            "rng": torch.get_rng_state(),
            "history": history,
            "settings": dict(settings) if settings is not None else None,
        },
        tmp / STATE_FILE,
    )
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` epoch checkpoints (``keep`` < 1 keeps everything)."""
    if keep < 1:
        return
    root = Path(out_dir) / CHECKPOINTS
    for old in sorted(root.glob("epoch-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete ``epoch-NNNN`` checkpoint under ``<out_dir>/checkpoints``, if any."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("epoch-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The saved state of the checkpoint directory ``path``."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def restore(
    state: Mapping[str, Any],
    objective: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    schedulers: Sequence[Any] = (),
) -> None:
    """Put a saved state into ``objective``, the optimizers, schedulers and torch's RNG."""
    objective.load_state_dict(state["model"])
    for opt, saved in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(saved)
    for sched, saved in zip(schedulers, state["schedulers"]):
        sched.load_state_dict(saved)
    torch.set_rng_state(state["rng"])


def load_checkpoint(
    path: str | Path,
    objective: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    schedulers: Sequence[Any] = (),
) -> dict[str, Any]:
    """Restore a checkpoint into ``objective`` (and optimizers, schedulers, RNG); returns its
    state."""
    state = read_checkpoint(path)
    restore(state, objective, optimizers, schedulers)
    return state


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (dataclasses converted)."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
