"""Training loops for Matryoshka models, importable without Ray.

Two objectives, each an ``nn.Module`` whose forward returns (total loss, loss per nesting dim),
so that one loop (``fit``) trains either, alone or as one worker of Ray Train's DDP:

- ``ClassifierObjective``: an encoder plus nested classification heads (MRL or MRL-E) under the
  paper's Matryoshka classification loss. Encoders: a token-embedding bag (``TokenBagEncoder``),
  a Hugging Face transformer (``HFTextEncoder``) or an image backbone (``ImageBackbone``:
  torchvision ResNet-50 or any timm model).
- ``AdaptorObjective``: a ``MatryoshkaAdaptor`` over fixed base embeddings under the
  ``NeighbourhoodLoss`` (optionally plus the Matryoshka contrastive loss on pairs).

``fit`` checkpoints every epoch (``<out>/checkpoints/epoch-NNNN``), resumes from the latest
checkpoint, logs the loss per dim and appends one JSON line per epoch to ``<out>/metrics.jsonl``.
How it runs (rank, device, DDP wrapping, reporting to Ray) comes in a ``Runner``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from mrl_core.adaptor import MatryoshkaAdaptor, NeighbourhoodLoss
from mrl_core.layers import NestedLinear
from mrl_core.losses import MatryoshkaClassificationLoss, MatryoshkaContrastiveLoss
from mrl_core.nesting import NestingSpec

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"

# ---------------------------------------------------------------------------------------------
# encoders that train


class TokenBagEncoder(nn.Module):
    """Mean of a text's token vectors (``nn.EmbeddingBag``), optionally through a linear
    projection to ``out_dim``: the static token-embedding encoder, trainable end to end.
    ``sparse=True`` gives the table sparse gradients (``fit`` then updates it with SparseAdam,
    touching only the rows of a batch: much faster on a CPU; DDP needs the gloo backend).

    Batches: ``{"ids": flat int64 token ids, "offsets": start of each text}``.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        out_dim: int | None = None,
        table: np.ndarray | None = None,
        freeze_table: bool = False,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, dim, mode="mean", sparse=sparse)
        if table is not None:
            with torch.no_grad():
                self.bag.weight.copy_(torch.as_tensor(np.asarray(table, dtype=np.float32)))
        else:
            nn.init.normal_(self.bag.weight, std=dim**-0.5)
        self.bag.weight.requires_grad_(not freeze_table)
        self.proj = nn.Linear(dim, out_dim) if out_dim is not None else None
        self.out_dim = out_dim or dim

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = self.bag(batch["ids"], batch["offsets"])
        return self.proj(pooled) if self.proj is not None else pooled

    @torch.no_grad()
    def folded_table(self) -> np.ndarray:
        """The table with the projection folded in (the mean commutes with a linear map), so the
        trained encoder is a plain static table: ``static:`` loads it."""
        w = self.bag.weight.float()
        if self.proj is not None:
            w = w @ self.proj.weight.T + self.proj.bias
        return w.cpu().numpy()


class HFTextEncoder(nn.Module):
    """A Hugging Face transformer, mean-pooled over the attention mask (as ``hf:`` encodes).

    Batches: ``{"input_ids", "attention_mask"}`` padded [N, T].
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out_dim = int(model.config.hidden_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        m = batch["attention_mask"].unsqueeze(-1).to(hidden.last_hidden_state.dtype)
        return (hidden.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1.0)


class ImageBackbone(nn.Module):
    """A torchvision or timm image model with its classifier removed: pooled features.

    ``name``: ``resnet50`` (or any torchvision model with an ``fc``: ``torchvision:resnet18``)
    or ``timm:<model>`` (needs the ``timm`` package). Batches: ``{"pixels": [N, 3, H, W]}``.
    """

    def __init__(self, name: str = "resnet50", pretrained_path: str | None = None) -> None:
        super().__init__()
        self.name = name
        if name.startswith("timm:"):
            try:
                import timm
            except ModuleNotFoundError as exc:
                raise ModuleNotFoundError(f"backbone {name!r} needs timm: pip install timm") from exc
            self.net = timm.create_model(name[5:], pretrained=False, num_classes=0)
            self.out_dim = int(self.net.num_features)
        else:
            import torchvision.models as tvm

            arch = name.split(":", 1)[1] if name.startswith("torchvision:") else name
            if not hasattr(tvm, arch):
                raise ValueError(f"unknown torchvision model {arch!r}")
            self.net = getattr(tvm, arch)(weights=None)
            if not hasattr(self.net, "fc"):
                raise ValueError(f"torchvision model {arch!r} has no fc layer to replace")
            self.out_dim = int(self.net.fc.in_features)
            self.net.fc = nn.Identity()
        if pretrained_path:
            state = torch.load(pretrained_path, map_location="cpu", weights_only=True)
            state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
            self.net.load_state_dict(state, strict=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch["pixels"])


class NestedClassifier(nn.Module):
    """An encoder module (batch -> [N, D] features) and a ``NestedLinear`` head on its output."""

    def __init__(
        self,
        encoder: nn.Module,
        nesting: NestingSpec | Sequence[int],
        num_classes: int,
        efficient: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = NestedLinear(nesting, num_classes, efficient=efficient)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(embeddings [N, D], one logits tensor per nesting dim)."""
        z = self.encoder(batch)
        return z, self.head(z)


# ---------------------------------------------------------------------------------------------
# objectives: forward(batch) -> (total loss, loss per dim)


class ClassifierObjective(nn.Module):
    """The Matryoshka classification loss of a ``NestedClassifier`` on labelled batches."""

    def __init__(
        self,
        model: NestedClassifier,
        weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss = MatryoshkaClassificationLoss(
            len(model.head.nesting), weights=weights, label_smoothing=label_smoothing
        )

    @property
    def dims(self) -> tuple[int, ...]:
        return self.model.head.nesting.dims

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        _, logits = self.model(batch)
        per_dim = self.loss.per_dim(logits, batch["labels"])
        return (self.loss.weights * per_dim).sum(), per_dim


class AdaptorObjective(nn.Module):
    """``NeighbourhoodLoss`` of a ``MatryoshkaAdaptor``, plus ``contrastive_weight`` times the
    Matryoshka InfoNCE on (query, document) base-embedding pairs when batches carry them."""

    def __init__(
        self,
        adaptor: MatryoshkaAdaptor,
        temperature: float = 0.1,
        weights: Sequence[float] | None = None,
        contrastive_weight: float = 0.0,
        contrastive_temperature: float = 0.05,
    ) -> None:
        super().__init__()
        self.adaptor = adaptor
        self.loss = NeighbourhoodLoss(adaptor.nesting, temperature, weights)
        self.contrastive_weight = contrastive_weight
        self.contrastive = MatryoshkaContrastiveLoss(
            adaptor.nesting, temperature=contrastive_temperature, weights=weights
        )

    @property
    def dims(self) -> tuple[int, ...]:
        return self.adaptor.nesting.dims

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        anchor, neighbours = batch["anchor"], batch["neighbours"]
        b, k, d = neighbours.shape
        y = self.adaptor(torch.cat([anchor, neighbours.reshape(b * k, d)]))
        per_dim = self.loss.per_dim(anchor, neighbours, y[:b], y[b:].reshape(b, k, d))
        total = (self.loss.weights * per_dim).sum()
        if self.contrastive_weight > 0 and "pair_query" in batch:
            q = self.adaptor(batch["pair_query"])
            p = self.adaptor(batch["pair_doc"])
            c = self.contrastive.per_dim(q, p)
            per_dim = per_dim + self.contrastive_weight * c
            total = total + self.contrastive_weight * (self.contrastive.weights * c).sum()
        return total, per_dim


# ---------------------------------------------------------------------------------------------
# datasets and collation


class TokenDataset(Dataset):
    """Tokenised texts (ragged id arrays) with integer labels."""

    def __init__(self, ids: Sequence[np.ndarray], labels: np.ndarray) -> None:
        if len(ids) != len(labels):
            raise ValueError(f"{len(ids)} texts but {len(labels)} labels")
        self.ids, self.labels = list(ids), np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.ids[i], int(self.labels[i])


def collate_bag(rows: Sequence[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
    """Token rows to ``{"ids", "offsets", "labels"}`` for ``TokenBagEncoder`` (empty rows get
    one padding token 0 so that the bag is defined)."""
    ids = [r[0] if len(r[0]) else np.zeros(1, dtype=np.int64) for r in rows]
    lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
    return {
        "ids": torch.from_numpy(np.concatenate(ids).astype(np.int64)),
        "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]])),
        "labels": torch.tensor([r[1] for r in rows], dtype=torch.int64),
    }


def collate_padded(pad_id: int = 0) -> Callable[[Sequence[tuple[np.ndarray, int]]], dict[str, torch.Tensor]]:
    """Token rows to padded ``{"input_ids", "attention_mask", "labels"}`` for transformers."""

    def collate(rows: Sequence[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
        width = max(1, max(len(r[0]) for r in rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for j, (t, _) in enumerate(rows):
            ids[j, : len(t)] = torch.as_tensor(t, dtype=torch.int64)
            mask[j, : len(t)] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([r[1] for r in rows], dtype=torch.int64)}

    return collate


class ImageDataset(Dataset):
    """Encoded images (bytes) with integer labels, decoded and transformed on access."""

    def __init__(self, images: Sequence[bytes], labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = list(images), np.asarray(labels), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(decode_image(self.images[i])), int(self.labels[i])


class WebDatasetStream(IterableDataset):
    """Images streamed from WebDataset tar shards: ``<key>.jpg|png|...`` beside ``<key>.cls``
    (an integer) or ``<key>.json`` (``{"label": ...}``).

    Shards are split over Ray workers (``rank``/``world_size``) and DataLoader workers, and
    shuffled per epoch (``set_epoch``); ``label_index`` maps raw labels to class numbers.
    """

    IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")

    def __init__(
        self,
        shards: Sequence[str],
        transform: Callable,
        label_index: dict[str, int],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        self.shards, self.transform, self.label_index = list(shards), transform, label_index
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.shards))
        mine = [self.shards[i] for i in order[self.rank :: self.world_size]]
        info = torch.utils.data.get_worker_info()
        if info is not None:
            mine = mine[info.id :: info.num_workers]
        for shard in mine:
            for image, label in iter_webdataset(shard):
                yield self.transform(decode_image(image)), self.label_index[str(label)]


def iter_webdataset(shard: str) -> Iterable[tuple[bytes, Any]]:
    """(image bytes, raw label) per sample of one WebDataset tar (local path or fsspec URL)."""
    import tarfile

    import fsspec

    with fsspec.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        current, parts = None, {}
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            key, _, ext = base.partition(".")
            key = os.path.join(os.path.dirname(member.name), key)
            if key != current:
                if current is not None:
                    yield from _sample(parts, shard, current)
                current, parts = key, {}
            parts[ext.lower()] = tar.extractfile(member).read()
        if current is not None:
            yield from _sample(parts, shard, current)


def _sample(parts: dict[str, bytes], shard: str, key: str) -> Iterable[tuple[bytes, Any]]:
    image = next((parts[e] for e in WebDatasetStream.IMAGE_EXTS if e in parts), None)
    if image is None:
        return
    if "cls" in parts:
        label: Any = parts["cls"].decode().strip()
    elif "json" in parts:
        label = json.loads(parts["json"]).get("label")
    else:
        raise ValueError(f"sample {key} in {shard} has no .cls or .json label")
    yield image, label


def decode_image(data: bytes) -> Any:
    """Encoded image bytes to an RGB PIL image."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def image_transform(size: int = 224, train: bool = True) -> Callable:
    """The standard ImageNet transforms: random-resized crop and flip to train, resize and
    center crop to evaluate."""
    from torchvision import transforms as T

    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if train:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])


def collate_images(rows: Sequence[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Image rows to ``{"pixels", "labels"}``."""
    return {"pixels": torch.stack([r[0] for r in rows]),
            "labels": torch.tensor([r[1] for r in rows], dtype=torch.int64)}


class NeighbourDataset(Dataset):
    """Anchors for adaptor training: row i yields its index; the collate gathers embeddings."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def collate_neighbours(
    embeddings: torch.Tensor,
    neighbours: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
) -> Callable[[Sequence[int]], dict[str, torch.Tensor]]:
    """Anchor indices to ``{"anchor" [B, d], "neighbours" [B, K, d]}`` (normalised base
    embeddings), plus a random batch of ``pairs`` when given."""
    gen = torch.Generator().manual_seed(seed)

    def collate(rows: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(rows), dtype=torch.int64)
        out = {"anchor": embeddings[idx], "neighbours": embeddings[neighbours[idx]]}
        if pairs is not None:
            pick = torch.randint(len(pairs[0]), (len(idx),), generator=gen)
            out["pair_query"], out["pair_doc"] = pairs[0][pick], pairs[1][pick]
        return out

    return collate


# ---------------------------------------------------------------------------------------------
# the loop


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


@dataclass
class Runner:
    """How ``fit`` runs: alone (the defaults) or as one worker of Ray Train.

    ``prepare_model`` wraps the objective (Ray: ``ray.train.torch.prepare_model``, i.e. DDP);
    ``report(metrics, checkpoint_dir)`` is called by every worker after each epoch (Ray:
    ``ray.train.report``); ``resume_from`` is a checkpoint directory to start from (Ray:
    ``ray.train.get_checkpoint()``), else the latest one under the output directory is used.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare_model: Callable[[nn.Module], nn.Module] | None = None
    report: Callable[[dict[str, Any], Path | None], None] | None = None
    resume_from: Path | None = None
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))

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
) -> list[dict[str, Any]]:
    """Train ``objective`` for ``config.epochs`` epochs; returns the per-epoch metrics.

    Every epoch ends with a checkpoint (model, optimizer, scheduler, RNG, history) written by
    rank 0 to ``<out_dir>/checkpoints/epoch-NNNN`` and a line in ``metrics.jsonl`` with the mean
    loss per nesting dim. With ``resume`` the run continues from the newest checkpoint (the
    runner's, else the output directory's), so an interrupted run picks up where it stopped and
    ends in the same state as an uninterrupted one.
    """
    runner = runner or Runner()
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    objective.to(runner.device)
    dims = tuple(objective.dims)
    sparse = {id(p) for m in objective.modules() if getattr(m, "sparse", False)
              for p in m.parameters(recurse=False) if p.requires_grad}
    params = [p for p in objective.parameters() if p.requires_grad and id(p) not in sparse]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ]
    if sparse:  # sparse embedding gradients: only the rows a batch touches are updated
        optimizers.append(torch.optim.SparseAdam(
            [p for p in objective.parameters() if id(p) in sparse], lr=config.lr))
    loader = _loader(dataset, collate, config, runner)
    steps_per_epoch = _steps_per_epoch(loader)
    schedulers = [
        torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(config, steps_per_epoch * config.epochs))
        for o in optimizers
    ]
    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    ckpt = runner.resume_from or (latest_checkpoint(out_dir) if resume else None)
    if resume and ckpt is not None:
        state = load_checkpoint(ckpt, objective, optimizers, schedulers)
        start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]
        runner.log(f"resumed from {ckpt} (epoch {state['epoch'] + 1} done)")
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
            batch = _to_device(batch, runner.device)
            loss, per_dim = model(batch)
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
                runner.log(
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
            path = save_checkpoint(out_dir, epoch, step, objective, optimizers, schedulers, history)
            prune_checkpoints(out_dir, config.keep_checkpoints)
            with open(out_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            runner.log(
                f"epoch {epoch + 1}/{config.epochs} done in {metrics['seconds']}s, loss per dim: "
                + _fmt_dims(dims, mean)
            )
        if runner.report is not None:
            runner.report(metrics, path)
    return history


def _loader(dataset: Dataset, collate: Callable, config: FitConfig, runner: Runner) -> DataLoader:
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate,
                          num_workers=config.num_workers, drop_last=True)
    sampler = DistributedSampler(dataset, num_replicas=runner.world_size, rank=runner.rank,
                                 shuffle=True, seed=config.seed, drop_last=True)
    drop = len(dataset) // runner.world_size >= config.batch_size
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=config.num_workers, drop_last=drop)


def _steps_per_epoch(loader: DataLoader) -> int:
    try:
        return max(len(loader), 1)
    except TypeError:  # an iterable dataset of unknown length
        return 1000


def _lr_lambda(config: FitConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if not config.cosine:
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _fmt_dims(dims: Sequence[int], values: Sequence[float]) -> str:
    return " ".join(f"{m}:{v:.4f}" for m, v in zip(dims, values))


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(
    out_dir: str | Path,
    epoch: int,
    step: int,
    objective: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
    history: list[dict[str, Any]],
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


def load_checkpoint(
    path: str | Path,
    objective: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    schedulers: Sequence[Any] = (),
) -> dict[str, Any]:
    """Restore a checkpoint into ``objective`` (and optimizers, schedulers, RNG); returns its
    state."""
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    objective.load_state_dict(state["model"])
    for opt, saved in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(saved)
    for sched, saved in zip(schedulers, state["schedulers"]):
        sched.load_state_dict(saved)
    torch.set_rng_state(state["rng"])
    return state


# ---------------------------------------------------------------------------------------------
# evaluation helpers


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


def train_adaptor(
    embeddings: np.ndarray,
    nesting: NestingSpec | Sequence[int],
    config: FitConfig,
    out_dir: str | Path,
    kind: str = "orthogonal",
    neighbours: int = 32,
    temperature: float = 0.1,
    init: str = "pca",
    hidden: int = 512,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    contrastive_weight: float = 0.0,
    weights: Sequence[float] | None = None,
    runner: Runner | None = None,
    knn: np.ndarray | None = None,
) -> tuple[MatryoshkaAdaptor, list[dict[str, Any]]]:
    """Train a ``MatryoshkaAdaptor`` on base embeddings [N, d] of an unlabelled corpus.

    Mines each row's ``neighbours`` nearest rows (exact, full dim; or takes ``knn``),
    initialises R from PCA (``init="pca"``) or the identity, and runs ``fit``. ``pairs``:
    optional (query, document) base embeddings for the contrastive term.
    """
    from mrl_core.adaptor import mine_neighbours
    from mrl_core.evaluate import pca_rotation
    from mrl_core.nesting import l2_normalize

    runner = runner or Runner()
    x = l2_normalize(np.asarray(embeddings, dtype=np.float32))
    nesting = nesting if isinstance(nesting, NestingSpec) else NestingSpec.for_model(x.shape[1], nesting)
    adaptor = MatryoshkaAdaptor(x.shape[1], nesting, kind=kind, hidden=hidden)
    if init == "pca":
        adaptor.set_rotation(pca_rotation(x))
    elif init != "identity":
        raise ValueError(f"init must be 'pca' or 'identity', got {init!r}")
    if knn is None:
        runner.log(f"mining {neighbours} exact neighbours of {len(x)} rows")
        knn = mine_neighbours(x, neighbours)
    objective = AdaptorObjective(adaptor, temperature, weights, contrastive_weight)
    pair_t = None
    if pairs is not None:
        pair_t = tuple(torch.from_numpy(l2_normalize(np.asarray(p, dtype=np.float32))) for p in pairs)
    collate = collate_neighbours(torch.from_numpy(x), torch.from_numpy(np.asarray(knn)[:, :neighbours]),
                                 pair_t, seed=config.seed + runner.rank)
    history = fit(objective, NeighbourDataset(len(x)), collate, config, out_dir, runner)
    return adaptor.eval(), history


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (dataclasses converted)."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------------------
# jobs: what ``pipelines/train.py`` runs, from reading the data to the exported model


@dataclass
class ClassifierJob:
    """Supervised MRL: an encoder plus nested heads trained on labelled text or images.

    ``data``: Parquet/JSONL/CSV (file, directory or fsspec URL) with a text (or image bytes)
    column and a label column, or WebDataset ``.tar`` shards for images. ``encoder``: ``bag``
    (token-embedding bag, tokenizer and initial table from the static encoder ``init``) or
    ``hf:/dir`` for text; a backbone (``resnet50``, ``torchvision:NAME``, ``timm:NAME``) for
    images. ``dims``: the nesting (``"8,16,...,256"``; a single full dim trains a plain,
    non-MRL model, the paper's FF baseline). ``embed_dim``: a linear projection after the
    encoder (default: none, the encoder's own dim).
    """

    out: str
    data: str
    modality: str = "text"
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = "image"
    val_data: str | None = None
    val_fraction: float = 0.1
    max_rows: int | None = None
    encoder: str = "bag"
    init: str | None = "wordllama-256"
    random_init: bool = False
    freeze_table: bool = False
    sparse_table: bool = False
    pretrained: str | None = None
    embed_dim: int | None = None
    dims: str | None = None
    efficient: bool = False
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    max_length: int = 256
    image_size: int = 224
    num_classes: int | None = None
    knn_rows: int = 20000
    fit: FitConfig = field(default_factory=FitConfig)


@dataclass
class AdaptorJob:
    """A Matryoshka adaptor over the ``base`` encoder, from an unlabelled corpus.

    The corpus comes as texts (``data`` with ``text_column``, embedded here with the base) or as
    precomputed base embeddings (``embeddings``: ``.npy``, or a Lance dataset and its
    ``emb_<dim>`` column). ``holdout`` rows are kept out of training as evaluation queries.
    ``pairs``: optional Parquet/JSONL of (query, document) texts for the contrastive term.
    """

    out: str
    base: str = "wordllama-256"
    data: str | None = None
    text_column: str = "text"
    embeddings: str | None = None
    max_rows: int | None = 100_000
    holdout: int = 2000
    dims: str | None = "16,32,64,128"
    kind: str = "orthogonal"
    init: str = "pca"
    hidden: int = 512
    neighbours: int = 32
    temperature: float = 0.1
    pairs: str | None = None
    pair_columns: tuple[str, str] = ("query", "document")
    contrastive_weight: float = 0.0
    loss_weights: list[float] | None = None
    fit: FitConfig = field(default_factory=lambda: FitConfig(epochs=2, batch_size=512, lr=3e-3, cosine=False))


def read_table(uri: str, columns: Sequence[str], max_rows: int | None = None) -> Any:
    """Columns of a Parquet/JSONL/CSV file or directory (local path or fsspec URL) as Arrow."""
    import fsspec
    import pyarrow.dataset as ds

    fs, path = fsspec.core.url_to_fs(uri)
    name = path.rstrip("/").lower()
    fmt = "json" if name.endswith((".jsonl", ".json")) else "csv" if name.endswith(".csv") else "parquet"
    try:
        dataset = ds.dataset(path, filesystem=fs, format=fmt)
    except (FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(f"cannot read {uri}: {exc}") from exc
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"{uri} has no column(s) {missing}; it has {dataset.schema.names}")
    table = dataset.head(max_rows, columns=list(columns)) if max_rows else dataset.to_table(columns=list(columns))
    return table


def label_index(labels: Sequence[Any]) -> dict[str, int]:
    """Raw labels to class numbers, in sorted order of their string form."""
    return {lbl: i for i, lbl in enumerate(sorted({str(x) for x in labels}))}


def split_rows(n: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random (train, val) split of ``range(n)``."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _is_webdataset(uri: str) -> bool:
    return uri.rstrip("/").endswith(".tar") or "{" in uri or (
        os.path.isdir(uri) and any(p.suffix == ".tar" for p in Path(uri).iterdir())
    )


def _shards(uri: str) -> list[str]:
    import fsspec

    if os.path.isdir(uri):
        return sorted(str(p) for p in Path(uri).glob("*.tar"))
    if "{" in uri:
        import re

        m = re.search(r"\{(\d+)\.\.(\d+)\}", uri)
        if not m:
            raise ValueError(f"cannot expand shard pattern {uri!r} (expected {{000..009}})")
        lo, hi = m.group(1), m.group(2)
        return [uri[: m.start()] + str(i).zfill(len(lo)) + uri[m.end() :] for i in range(int(lo), int(hi) + 1)]
    fs, path = fsspec.core.url_to_fs(uri)
    found = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [p if proto in ("file", "local") else f"{proto}://{p}" for p in found]


def _text_data(job: ClassifierJob, uri: str) -> tuple[list[str], list[Any]]:
    table = read_table(uri, [job.text_column, job.label_column], job.max_rows)
    texts = [t or "" for t in table.column(job.text_column).to_pylist()]
    return texts, table.column(job.label_column).to_pylist()


def _image_bytes(values: list[Any]) -> list[bytes]:
    return [v["bytes"] if isinstance(v, dict) else v for v in values]


def build_classifier(job: ClassifierJob, runner: Runner) -> dict[str, Any]:
    """Read the data and build the model, datasets and collate function of a ``ClassifierJob``."""
    rank, world = runner.rank, runner.world_size
    out: dict[str, Any] = {}
    if job.modality == "image":
        train_tf, eval_tf = image_transform(job.image_size, True), image_transform(job.image_size, False)
        if _is_webdataset(job.data):
            shards = _shards(job.data)
            val_shards = _shards(job.val_data) if job.val_data else shards[-1:] if len(shards) > 1 else []
            train_shards = [s for s in shards if s not in val_shards] or shards
            if job.num_classes is None:
                labels = sorted({str(lbl) for s in shards for _, lbl in iter_webdataset(s)})
            else:
                labels = [str(i) for i in range(job.num_classes)]
            index = {lbl: i for i, lbl in enumerate(labels)}
            out["train"] = WebDatasetStream(train_shards, train_tf, index, rank, world, job.fit.seed)
            if val_shards:
                rows = [(img, index[str(lbl)]) for s in val_shards for img, lbl in iter_webdataset(s)]
                out["val"] = ImageDataset([r[0] for r in rows], np.array([r[1] for r in rows]), eval_tf)
        else:
            table = read_table(job.data, [job.image_column, job.label_column], job.max_rows)
            images = _image_bytes(table.column(job.image_column).to_pylist())
            raw = table.column(job.label_column).to_pylist()
            index = label_index(raw)
            y = np.array([index[str(v)] for v in raw])
            tr, va = split_rows(len(y), 0.0 if job.val_data else job.val_fraction, job.fit.seed)
            out["train"] = ImageDataset([images[i] for i in tr], y[tr], train_tf)
            if job.val_data:
                vt = read_table(job.val_data, [job.image_column, job.label_column])
                vy = np.array([index[str(v)] for v in vt.column(job.label_column).to_pylist()])
                out["val"] = ImageDataset(_image_bytes(vt.column(job.image_column).to_pylist()), vy, eval_tf)
            elif len(va):
                out["val"] = ImageDataset([images[i] for i in va], y[va], eval_tf)
            out["train_eval"] = ImageDataset(out["train"].images, out["train"].labels, eval_tf)
        encoder: nn.Module = ImageBackbone(job.encoder, job.pretrained)
        out["collate"] = collate_images
    elif job.modality == "text":
        texts, raw = _text_data(job, job.data)
        index = label_index(raw)
        if job.encoder == "bag":
            from mrl_core.encoders import get_encoder

            base = get_encoder(job.init or "wordllama-256", device="cpu")
            if not hasattr(base, "table"):
                raise ValueError(f"--init {job.init} is not a static token-embedding encoder")
            tokenize = base.preprocess
            table = base.table.float().cpu().numpy()
            encoder = TokenBagEncoder(
                table.shape[0], table.shape[1], job.embed_dim,
                None if job.random_init else table, job.freeze_table, job.sparse_table,
            )
            pre = getattr(base, "preprocessor", None)
            out["tokenizer"] = pre.tokenizer if pre is not None else base.tokenizer
            out["collate"] = collate_bag
        elif job.encoder.startswith("hf:"):
            from transformers import AutoModel, AutoTokenizer

            path = job.encoder[3:]
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            encoder = HFTextEncoder(AutoModel.from_pretrained(path, local_files_only=True))

            def tokenize(batch: list[str]) -> dict[str, np.ndarray]:
                enc = tok(batch, truncation=True, max_length=job.max_length)["input_ids"]
                lengths = np.array([len(e) for e in enc], dtype=np.int64)
                return {"ids": np.concatenate([np.asarray(e, dtype=np.int64) for e in enc]), "lengths": lengths}

            out["tokenizer"] = tok
            out["collate"] = collate_padded(tok.pad_token_id or 0)
        else:
            raise ValueError(f"unknown text encoder {job.encoder!r}: use 'bag' or 'hf:/dir'")
        ids = _ragged(tokenize(texts), job.max_length if job.encoder == "bag" else None)
        y = np.array([index[str(v)] for v in raw])
        if job.val_data:
            vtexts, vraw = _text_data(job, job.val_data)
            tr, va_ids, vy = np.arange(len(y)), _ragged(tokenize(vtexts)), np.array([index[str(v)] for v in vraw])
        else:
            tr, va = split_rows(len(y), job.val_fraction, job.fit.seed)
            va_ids, vy = [ids[i] for i in va], y[va]
        out["train"] = TokenDataset([ids[i] for i in tr], y[tr])
        if len(vy):
            out["val"] = TokenDataset(va_ids, vy)
        out["train_eval"] = out["train"]
    else:
        raise ValueError(f"modality must be 'text' or 'image', got {job.modality!r}")
    if job.embed_dim is not None and not isinstance(encoder, TokenBagEncoder):
        encoder = nn.Sequential(encoder, _Project(encoder.out_dim, job.embed_dim))
        encoder.out_dim = job.embed_dim
    full = job.embed_dim or encoder.out_dim
    nesting = NestingSpec.for_model(full, job.dims)
    model = NestedClassifier(encoder, nesting, len(index), efficient=job.efficient)
    out.update(model=model, labels=list(index), nesting=nesting,
               objective=ClassifierObjective(model, job.loss_weights, job.label_smoothing))
    return out


class _Project(nn.Module):
    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)


def _ragged(features: dict[str, np.ndarray], max_len: int | None = None) -> list[np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum(features["lengths"])])
    ids = features["ids"]
    rows = [ids[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return [r[:max_len] for r in rows] if max_len else rows


def run_classifier_job(job: ClassifierJob, runner: Runner | None = None) -> dict[str, Any]:
    """Train, then (rank 0) evaluate per dim and export; returns the evaluation."""
    runner = runner or Runner()
    out_dir = Path(job.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if runner.is_main:
        write_json(out_dir / "job.json", job)
    parts = build_classifier(job, runner)
    fit(parts["objective"], parts["train"], parts["collate"], job.fit, out_dir, runner)
    if not runner.is_main:
        return {}
    model: NestedClassifier = parts["model"]
    result = evaluate_classifier(model, parts, job.knn_rows, runner.device, job.fit.seed)
    write_json(out_dir / "eval.json", result)
    runner.log("final per-dim evaluation: " + json.dumps(result))
    export_classifier(job, parts, out_dir / "export")
    return result


def evaluate_classifier(
    model: NestedClassifier, parts: dict[str, Any], knn_rows: int, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """Per-dim head accuracy and 1-NN accuracy (validation rows against up to ``knn_rows``
    training rows) of a trained classifier; empty without a validation set."""
    from mrl_core.evaluate import knn_accuracy, per_dim

    if "val" not in parts:
        return {}
    dims = parts["nesting"].dims
    z_val, logits, y_val = predict(model, parts["val"], parts["collate"], device=device)
    result: dict[str, Any] = {
        "dims": list(dims),
        "head_accuracy": {str(m): float(np.mean(lg.argmax(1) == y_val)) for m, lg in zip(dims, logits)},
    }
    train = parts.get("train_eval")
    if train is not None and knn_rows:
        pick = np.sort(np.random.default_rng(seed).permutation(len(train))[:knn_rows])
        sub = torch.utils.data.Subset(train, pick.tolist())
        z_tr, _, y_tr = predict(model, sub, parts["collate"], device=device)
        knn = per_dim(knn_accuracy, dims, z_tr, y_tr, z_val, y_val)
        result["knn1_accuracy"] = {str(m): v for m, v in knn.items()}
    return result


def export_classifier(job: ClassifierJob, parts: dict[str, Any], path: Path) -> None:
    """Write the trained model where an encoder loader reads it; the nested heads and the class
    labels go to ``<path>/heads`` (``heads.safetensors``, ``labels.json``).

    ``bag``: a static-encoder directory (``static:<path>``), projection folded into the table;
    ``hf:``: ``save_pretrained`` (``hf:<path>``); ``resnet50``: the official MRL state-dict
    layout (``mrl-resnet50:<path>/model.pt``); other backbones: ``model.pt``.
    """
    from safetensors.torch import save_file

    heads = path / "heads"
    heads.mkdir(parents=True, exist_ok=True)
    model: NestedClassifier = parts["model"].cpu()
    nesting = parts["nesting"]
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()},
              str(heads / "heads.safetensors"))
    meta = {"labels": parts["labels"], "dims": list(nesting.dims), "efficient": job.efficient,
            "encoder": job.encoder, "modality": job.modality}
    (heads / "labels.json").write_text(json.dumps(meta, indent=2))
    enc = model.encoder
    if isinstance(enc, TokenBagEncoder):
        save_file({"embeddings": torch.from_numpy(enc.folded_table())}, str(path / "model.safetensors"))
        (path / "tokenizer.json").write_text(parts["tokenizer"].to_str())
        (path / "config.json").write_text(json.dumps({"nesting_dims": list(nesting.dims)}))
    elif isinstance(enc, HFTextEncoder):
        enc.model.save_pretrained(path)
        parts["tokenizer"].save_pretrained(path)
    elif isinstance(enc, ImageBackbone):
        net = enc.net
        state = {f"{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
        state.update({f"fc.{k}": v for k, v in model.head.state_dict().items()})
        torch.save(state, path / "model.pt")
    else:
        torch.save(model.state_dict(), path / "model.pt")


def prepare_adaptor_data(job: AdaptorJob, log: Callable[[str], None] = print) -> Path:
    """Embed the corpus with the base encoder (or read its embeddings), split off the held-out
    queries and mine neighbours; cached as ``.npy`` files under ``<out>/data`` (reused on resume).
    """
    from mrl_core.adaptor import mine_neighbours
    from mrl_core.nesting import l2_normalize

    data_dir = Path(job.out) / "data"
    if (data_dir / "knn.npy").is_file():
        return data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = ""
    if job.embeddings:
        x = _read_embeddings(job.embeddings, job.max_rows)
    elif job.data:
        from mrl_core.encoders import get_encoder

        base = get_encoder(job.base)
        fingerprint = base.fingerprint
        texts = [t or "" for t in read_table(job.data, [job.text_column], None).column(job.text_column).to_pylist()]
        rng = np.random.default_rng(job.fit.seed)
        if job.max_rows and len(texts) > job.max_rows + job.holdout:
            texts = [texts[i] for i in np.sort(rng.permutation(len(texts))[: job.max_rows + job.holdout])]
        log(f"embedding {len(texts)} texts with {job.base}")
        x = np.concatenate([base.encode(texts[i : i + 65536]) for i in range(0, len(texts), 65536)])
    else:
        raise ValueError("an adaptor job needs texts (data) or base embeddings (embeddings)")
    x = l2_normalize(np.asarray(x, dtype=np.float32))
    order = np.random.default_rng(job.fit.seed + 1).permutation(len(x))
    holdout, train = x[order[: job.holdout]], x[order[job.holdout :]]
    log(f"mining {job.neighbours} exact neighbours of {len(train)} rows")
    knn = mine_neighbours(train, job.neighbours)
    np.save(data_dir / "train.npy", train)
    np.save(data_dir / "holdout.npy", holdout)
    if job.pairs:
        from mrl_core.encoders import get_encoder

        base = get_encoder(job.base)
        table = read_table(job.pairs, list(job.pair_columns))
        for name, col in zip(("pair_query", "pair_doc"), job.pair_columns):
            texts = [t or "" for t in table.column(col).to_pylist()]
            np.save(data_dir / f"{name}.npy", base.encode(texts))
    (data_dir / "info.json").write_text(json.dumps({"base": job.base, "base_fingerprint": fingerprint}))
    np.save(data_dir / "knn.npy", knn)  # last: its presence marks the cache complete
    return data_dir


def _read_embeddings(uri: str, max_rows: int | None) -> np.ndarray:
    if uri.endswith(".npy"):
        x = np.load(uri, mmap_mode="r")
        return np.asarray(x[:max_rows] if max_rows else x)
    import lance

    path, _, column = uri.partition("#")
    ds = lance.dataset(path)
    column = column or max((f.name for f in ds.schema if f.name.startswith("emb_")),
                           key=lambda n: int(n[4:]))
    table = ds.head(max_rows, columns=[column]) if max_rows else ds.to_table(columns=[column])
    return np.stack(table.column(column).to_numpy(zero_copy_only=False)).astype(np.float32)


def run_adaptor_job(job: AdaptorJob, runner: Runner | None = None) -> dict[str, Any]:
    """Train an adaptor on prepared data (``prepare_adaptor_data``), then (rank 0) evaluate each
    prefix's recall@10 on the held-out queries against raw prefixes and PCA, and save it to
    ``<out>/adaptor`` (``get_encoder("adaptor:<out>/adaptor")``)."""
    from mrl_core.adaptor import save_adaptor
    from mrl_core.encoders import get_encoder
    from mrl_core.evaluate import pca_rotation, prefix_recall

    runner = runner or Runner()
    out_dir = Path(job.out)
    data_dir = prepare_adaptor_data(job, runner.log) if runner.is_main else Path(job.out) / "data"
    _wait_for(data_dir / "knn.npy")
    if runner.is_main:
        write_json(out_dir / "job.json", job)
    train = np.load(data_dir / "train.npy")
    pairs = None
    if (data_dir / "pair_query.npy").is_file():
        pairs = (np.load(data_dir / "pair_query.npy"), np.load(data_dir / "pair_doc.npy"))
    nesting = NestingSpec.for_model(train.shape[1], job.dims)
    adaptor, _ = train_adaptor(
        train, nesting, job.fit, out_dir, kind=job.kind, neighbours=job.neighbours,
        temperature=job.temperature, init=job.init, hidden=job.hidden, pairs=pairs,
        contrastive_weight=job.contrastive_weight, weights=job.loss_weights, runner=runner,
        knn=np.load(data_dir / "knn.npy"),
    )
    if not runner.is_main:
        return {}
    info = json.loads((data_dir / "info.json").read_text())
    fingerprint = info["base_fingerprint"] or get_encoder(job.base).fingerprint
    save_adaptor(adaptor, out_dir / "adaptor", job.base, fingerprint,
                 extra={"trained_rows": len(train), "neighbours": job.neighbours})
    holdout = np.load(data_dir / "holdout.npy")
    dims = nesting.dims[:-1]
    rot = pca_rotation(train)
    result = {"queries": len(holdout), "corpus": len(train), "recall@10": {
        "raw": prefix_recall(holdout, train, dims),
        "pca": prefix_recall(holdout @ rot, train @ rot, dims),
        "adaptor": prefix_recall(embed_with(adaptor, holdout), embed_with(adaptor, train), dims,
                                 reference=(holdout, train)),
    }}
    write_json(out_dir / "eval.json", result)
    runner.log("final per-dim recall@10 (ties counted) vs the base's full dim: " + json.dumps(result["recall@10"]))
    return result


def _wait_for(path: Path, timeout_s: float = 3600) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s}s")
        time.sleep(1)
