"""The training loop: ``fit`` trains any objective (batch -> (loss, loss per dim)), alone or as
one worker of Ray Train's DDP, checkpointing every epoch and resuming from the newest
checkpoint; plus the inference helpers ``predict`` and ``embed_with``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from mrl_core.training.checkpoints import (
    check_settings,
    latest_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    restore,
    save_checkpoint,
)
from mrl_core.training.modules import NestedClassifier

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
UNKNOWN_STREAM_STEPS = 1000
"""Steps per epoch the LR schedule assumes for a stream that does not say its length."""


@dataclass
class FitConfig:
    """Optimisation settings shared by every objective."""

    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    cosine: bool = True
    grad_clip: float | None = None
    seed: int = 0
    log_every: int = 50
    num_workers: int = 0
    keep_checkpoints: int = 2


RESUMABLE_FIT_FIELDS = ("epochs", "log_every", "keep_checkpoints", "num_workers")
"""FitConfig fields a resumed run may change: more epochs, other logging, loader workers."""


def run_settings(
    config: FitConfig, objective: nn.Module, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: ``config`` (a ``FitConfig``) minus
    ``RESUMABLE_FIT_FIELDS``, the objective's class, nesting dims and loss weights, and
    ``extra`` (the job's model settings), in JSON form."""
    settings = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_FIT_FIELDS}
    settings["objective"] = type(objective).__name__
    settings["nesting_dims"] = list(objective.dims)
    loss = getattr(objective, "loss", None)
    if loss is not None and hasattr(loss, "weights"):
        settings["dim_loss_weights"] = [float(w) for w in loss.weights]
    settings.update(extra or {})
    return json.loads(json.dumps(settings, default=str))


@dataclass
class Runner:
    """How ``fit`` runs: alone (the defaults) or as one worker of Ray Train.

    ``prepare_model`` wraps the objective (Ray: ``ray.train.torch.prepare_model``, i.e. DDP);
    ``report(metrics, checkpoint_dir)`` is called by every worker after each epoch (Ray:
    ``ray.train.report``); ``resume_from`` is a checkpoint directory to start from (Ray:
    ``ray.train.get_checkpoint()``), else the latest one under the output directory is used.
    Progress goes to the ``mrl_core.training`` loggers (INFO), whoever runs.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare_model: Callable[[nn.Module], nn.Module] | None = None
    report: Callable[[dict[str, Any], Path | None], None] | None = None
    resume_from: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def fit(
    objective: nn.Module,
    dataset: Dataset | IterableDataset,
    collate: Callable,
    config: FitConfig,
    out_dir: str | Path,
    runner: Runner | None = None,
    resume: bool = True,
    settings: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``objective`` for ``config.epochs`` epochs; returns the per-epoch metrics.

    Every epoch ends with a checkpoint (model, optimizer, scheduler, RNG, history, settings)
    written by rank 0 to ``<out_dir>/checkpoints/epoch-NNNN`` and a line in ``metrics.jsonl``
    with the mean loss per nesting dim. With ``resume`` the run continues from the newest
    checkpoint (the runner's, else the output directory's), so an interrupted run picks up where
    it stopped and ends in the same state as an uninterrupted one; a checkpoint written under
    other settings (``run_settings`` of ``config``, the objective and the job's ``settings``)
    is refused with a ValueError naming what differs.
    """
    runner = runner or Runner()
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    objective.to(runner.device)
    dims = tuple(objective.dims)
    recorded = run_settings(config, objective, settings)
    params, optimizers = _optimizers(objective, config)
    loader = _loader(dataset, collate, config, runner)
    total_steps = steps_per_epoch(dataset, loader, config.batch_size) * config.epochs
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor(config, total_steps))
                  for o in optimizers]
    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    ckpt = runner.resume_from or (latest_checkpoint(out_dir) if resume else None)
    if resume and ckpt is not None:
        state = read_checkpoint(ckpt)
        check_settings(state, recorded, ckpt, out_dir)
        restore(state, objective, optimizers, schedulers)
        start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]
        log.info(f"resumed from {ckpt} (epoch {state['epoch'] + 1} done)")
    model = runner.prepare_model(objective) if runner.prepare_model else objective

    for epoch in range(start_epoch, config.epochs):
        for obj in (loader.sampler, dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        model.train()
        started = time.perf_counter()
        total = torch.zeros(len(dims), dtype=torch.float64)
        count = 0
        for batch in loader:
            loss, per_dim = model(_to_device(batch, runner.device))
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            for opt, sched in zip(optimizers, schedulers):
                opt.step()
                sched.step()
            step += 1
            count += 1
            total += per_dim.detach().double().cpu()
            if runner.is_main and config.log_every and step % config.log_every == 0:
                log.info(
                    f"epoch {epoch + 1}/{config.epochs} step {step} loss {loss.item():.4f} "
                    + _fmt_dims(dims, per_dim.detach().cpu().tolist())
                )
        mean = (total / max(count, 1)).tolist()
        metrics = {
            "epoch": epoch + 1,
            "step": step,
            "loss": float(sum(mean)),
            "loss_per_dim": {str(m): round(v, 6) for m, v in zip(dims, mean)},
            "lr": schedulers[0].get_last_lr()[0],
            "seconds": round(time.perf_counter() - started, 2),
            "rank": runner.rank,
        }
        history.append(metrics)
        path = None
        if runner.is_main:
            path = save_checkpoint(out_dir, epoch, step, objective, optimizers, schedulers,
                                   history, recorded)
            prune_checkpoints(out_dir, config.keep_checkpoints)
            with open(out_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            log.info(
                f"epoch {epoch + 1}/{config.epochs} done in {metrics['seconds']}s, loss per dim: "
                + _fmt_dims(dims, mean)
            )
        if runner.report is not None:
            runner.report(metrics, path)
    return history


def _optimizers(
    objective: nn.Module, config: FitConfig
) -> tuple[list[nn.Parameter], list[torch.optim.Optimizer]]:
    """(dense trainable parameters, [AdamW over them, SparseAdam over sparse tables if any])."""
    sparse = {id(p) for m in objective.modules() if getattr(m, "sparse", False)
              for p in m.parameters(recurse=False) if p.requires_grad}
    params = [p for p in objective.parameters() if p.requires_grad and id(p) not in sparse]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ]
    if sparse:  # sparse embedding gradients: only the rows a batch touches are updated
        optimizers.append(torch.optim.SparseAdam(
            [p for p in objective.parameters() if id(p) in sparse], lr=config.lr))
    return params, optimizers


def _loader(dataset: Dataset, collate: Callable, config: FitConfig, runner: Runner) -> DataLoader:
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate,
                          num_workers=config.num_workers, drop_last=True)
    sampler = DistributedSampler(dataset, num_replicas=runner.world_size, rank=runner.rank,
                                 shuffle=True, seed=config.seed, drop_last=True)
    drop = len(dataset) // runner.world_size >= config.batch_size
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=config.num_workers, drop_last=drop)


def steps_per_epoch(dataset: Dataset, loader: DataLoader, batch_size: int) -> int:
    """Optimizer steps in one epoch of this worker: the loader's length, or for a stream its
    ``samples_per_epoch`` (per worker) over the batch size (the last partial batch dropped)."""
    if not isinstance(dataset, IterableDataset):
        return max(len(loader), 1)
    samples = getattr(dataset, "samples_per_epoch", None)
    if samples is None:
        log.warning(f"{type(dataset).__name__} does not say how many samples it holds: the LR "
                    f"schedule assumes {UNKNOWN_STREAM_STEPS} steps per epoch")
        return UNKNOWN_STREAM_STEPS
    return max(samples // batch_size, 1)


def lr_factor(config: FitConfig, total_steps: int) -> Callable[[int], float]:
    """The LR multiplier per step: linear warm-up, then cosine decay reaching 0 at
    ``total_steps`` (or constant without ``config.cosine``)."""

    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if not config.cosine:
            return 1.0
        span = max(1, total_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _fmt_dims(dims: Sequence[int], values: Sequence[float]) -> str:
    return " ".join(f"{m}:{v:.4f}" for m, v in zip(dims, values))


@torch.inference_mode()
def predict(
    model: NestedClassifier,
    dataset: Dataset,
    collate: Callable,
    batch_size: int = 512,
    device: torch.device | None = None,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(embeddings [N, D], logits per dim [N, C], labels [N]) of a labelled dataset, in order."""
    device = device or torch.device("cpu")
    model.eval().to(device)
    zs, logits, labels = [], None, []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        z, lg = model(_to_device(batch, device))
        zs.append(z.float().cpu().numpy())
        logits = [[] for _ in lg] if logits is None else logits
        for acc, x in zip(logits, lg):
            acc.append(x.float().cpu().numpy())
        labels.append(batch["labels"].numpy())
    return np.concatenate(zs), [np.concatenate(x) for x in logits], np.concatenate(labels)


@torch.inference_mode()
def embed_with(module: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray,
               batch: int = 65536) -> np.ndarray:
    """Apply ``module`` to the rows of ``x`` in chunks (float32 numpy in and out)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torch.cat([module(c) for c in t.split(batch)]).float().numpy()
