"""Train Matryoshka models: nested classification heads (MRL, MRL-E) or a Matryoshka adaptor.

    python pipelines/train.py classify --data debian.parquet --text-column text \\
        --label-column section --out runs/debian-mrl            # Ray Train, one worker per GPU
    python pipelines/train.py classify ... --local               # one process, no Ray
    python pipelines/train.py adaptor --base wordllama-256 --data pypi.parquet \\
        --text-column summary --out runs/pypi-adaptor
    python pipelines/embed.py --encoder adaptor:runs/pypi-adaptor/adaptor ...

Each epoch ends with a checkpoint under ``<out>/checkpoints``; re-running the same command
resumes from the newest one. The loss per nesting dim is logged and appended to
``<out>/metrics.jsonl``; the final per-dim evaluation goes to ``<out>/eval.json``. Under Ray,
``<out>`` must be storage every worker sees (one node, or a shared filesystem).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from mrl_core.defaults import ENCODER
from mrl_core.device import DEVICES, DeviceError, local_gpu_count, resolve_device
from mrl_core.training import (
    AdaptorJob,
    ClassifierJob,
    FitConfig,
    Runner,
    prepare_adaptor_data,
    run_adaptor_job,
    run_classifier_job,
)
from pipelines.cli import configure_logging, error_line, start_ray

log = logging.getLogger(__name__)


def _fit_args(
    p: argparse.ArgumentParser, epochs: int, batch: int, lr: float, cosine: bool = True
) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs, help=f"epochs to train (default {epochs})")
    g.add_argument("--batch-size", type=int, default=batch,
                   help=f"rows per step per worker (default {batch})")
    g.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate (default {lr})")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    g.add_argument("--cosine", action=argparse.BooleanOptionalAction, default=cosine,
                   help="cosine decay of the learning rate to 0 "
                   f"(default {'on' if cosine else 'off: constant'})")
    g.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this")
    g.add_argument("--seed", type=int, default=0, help="seed for init, shuffling and splits")
    g.add_argument("--log-every", type=int, default=50, help="log the loss per dim every N steps")
    g.add_argument("--keep-checkpoints", type=int, default=2,
                   help="epoch checkpoints kept, newest first (0 keeps all; default 2)")
    g.add_argument("--loader-workers", type=int, default=0,
                   help="DataLoader worker processes per training worker (default 0)")
    g.add_argument("--loss-weights", default=None,
                   help="comma-separated loss weight c_m per nesting dim (default 1 each)")
    r = p.add_argument_group("execution")
    r.add_argument("--out", required=True,
                   help="output directory: checkpoints, metrics, eval, model")
    r.add_argument("--local", action="store_true",
                   help="train in this process without Ray (otherwise Ray Train's TorchTrainer)")
    r.add_argument("--num-workers", type=int, default=None,
                   help="Ray Train workers (default: one per GPU the cluster has or can get, "
                   "else 1 CPU worker)")
    r.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="give each Ray worker a GPU (default: when the cluster has GPUs or GPU "
                   "node types its autoscaler can start)")
    r.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the model trains: auto (the GPU each worker holds; --local: this "
                   "machine's GPU; a GPU torch cannot use stops the job before anything is written), "
                   "cuda, or cpu (on purpose, also in workers that hold a GPU)")
    r.add_argument("--max-failures", type=int, default=1,
                   help="Ray Train restarts after a worker failure, resuming from the checkpoint")
    r.add_argument("--ray-address", default=None, help="Ray cluster address (default: local Ray)")
    r.add_argument("--verbose", action="store_true",
                   help="debug lines too, and other libraries' INFO lines")


def build_parser() -> argparse.ArgumentParser:
    """The ``classify`` and ``adaptor`` sub-commands and every option they take."""
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("classify", help="an encoder plus nested classification heads (MRL/MRL-E)",
                       description="The paper's supervised MRL: encoder + nested heads trained "
                       "with the Matryoshka classification loss.")
    d = c.add_argument_group("data")
    d.add_argument("--data", required=True,
                   help="Parquet/JSONL/CSV file or directory (local or fsspec URL) with a text or "
                   "image column and a label column; for images also WebDataset .tar shards "
                   "(a .tar, a directory of them, or shard-{000..009}.tar)")
    d.add_argument("--modality", choices=("text", "image"), default="text", help="default text")
    d.add_argument("--text-column", default="text", help="text column (default 'text')")
    d.add_argument("--image-column", default="image",
                   help="encoded image bytes column of a Parquet dataset (default 'image')")
    d.add_argument("--label-column", default="label", help="label column (default 'label')")
    d.add_argument("--val-data", default=None,
                   help="separate validation data (default: --val-fraction of --data; for "
                   "WebDataset the last shard)")
    d.add_argument("--val-fraction", type=float, default=0.1, help="held-out share (default 0.1)")
    d.add_argument("--max-rows", type=int, default=None, help="read at most this many rows")
    d.add_argument("--num-classes", type=int, default=None,
                   help="WebDataset only: integer labels 0..N-1 (default: scan the shards)")
    d.add_argument("--samples-per-epoch", type=int, default=None,
                   help="WebDataset only: training samples in the shards, which sizes the LR "
                   "schedule (default: counted in one pass reading only the labels)")
    m = c.add_argument_group("model")
    m.add_argument("--encoder", default="bag",
                   help="text: 'bag' (token-embedding bag) or 'hf:/dir' (a local transformer); "
                   "image: 'resnet50', 'torchvision:NAME' or 'timm:NAME' (default 'bag', or "
                   "'resnet50' with --modality image)")
    m.add_argument("--init", default=ENCODER,
                   help="bag: the static encoder (get_encoder spec) whose tokenizer and table it "
                   "starts from (default wordllama-256)")
    m.add_argument("--random-init", action="store_true", help="bag: random table, same vocabulary")
    m.add_argument("--freeze-table", action="store_true", help="bag: train only what is on top")
    m.add_argument("--sparse-table", action="store_true",
                   help="bag: sparse table gradients (SparseAdam; much faster on CPUs; with "
                   "several workers needs Ray's gloo backend, i.e. CPU workers)")
    m.add_argument("--pretrained", default=None, help="image: backbone state-dict to start from")
    m.add_argument("--embed-dim", type=int, default=None,
                   help="linear projection to this dim after the encoder (default: none)")
    m.add_argument("--dims", default=None,
                   help="nesting dims, e.g. 8,16,32,64,128,256 (default: doubling from 8 to the "
                   "full dim); only the full dim trains a plain model (the paper's FF baseline)")
    m.add_argument("--efficient", action="store_true", help="MRL-E: one shared head")
    m.add_argument("--label-smoothing", type=float, default=0.0, help="default 0")
    m.add_argument("--max-length", type=int, default=256, help="tokens per text (default 256)")
    m.add_argument("--pooling", choices=("mean", "cls"), default="mean",
                   help="hf: pool the last hidden state by its mean over the tokens or by the "
                   "first token, as the exported hf: encoder then does (default mean)")
    m.add_argument("--image-size", type=int, default=224, help="crop size (default 224)")
    m.add_argument("--knn-rows", type=int, default=20000,
                   help="training rows the final 1-NN evaluation searches (default 20000)")
    _fit_args(c, epochs=10, batch=256, lr=1e-3)

    a = sub.add_parser("adaptor", help="a Matryoshka adaptor over an existing embedding model",
                       description="Learn a map on top of a base encoder so that each prefix of "
                       "its output keeps the full embedding's neighbourhoods.")
    d = a.add_argument_group("data")
    d.add_argument("--base", default=ENCODER,
                   help="base encoder spec, as for get_encoder (default wordllama-256)")
    d.add_argument("--data", default=None,
                   help="texts to embed with the base: Parquet/JSONL/CSV file or directory")
    d.add_argument("--text-column", default="text", help="text column (default 'text')")
    d.add_argument("--embeddings", default=None,
                   help="instead of --data: base embeddings, a .npy file or a Lance dataset "
                   "(URI#emb_256 picks the column; default its widest emb_ column)")
    d.add_argument("--max-rows", type=int, default=100_000,
                   help="training rows sampled from the corpus (default 100000)")
    d.add_argument("--holdout", type=int, default=2000,
                   help="rows held out as evaluation queries (default 2000)")
    d.add_argument("--pairs", default=None,
                   help="optional (query, document) texts for the contrastive term")
    d.add_argument("--pair-columns", default="query,document", help="default 'query,document'")
    m = a.add_argument_group("model")
    m.add_argument("--dims", default="16,32,64,128",
                   help="nesting dims the adaptor is trained at; the full dim is added "
                   "(default 16,32,64,128)")
    m.add_argument("--kind", choices=("orthogonal", "linear", "mlp"), default="orthogonal",
                   help="orthogonal: keeps every full-dim neighbour exactly (default); linear: "
                   "free matrix; mlp: orthogonal plus a residual MLP")
    m.add_argument("--init", choices=("pca", "identity"), default="pca", help="default pca")
    m.add_argument("--hidden", type=int, default=512, help="mlp: hidden width (default 512)")
    m.add_argument("--neighbours", type=int, default=32,
                   help="full-dim nearest neighbours mined per row as candidates (default 32)")
    m.add_argument("--temperature", type=float, default=0.1,
                   help="teacher softmax temperature on full-dim cosines (default 0.1)")
    m.add_argument("--contrastive-weight", type=float, default=0.0,
                   help="weight of the Matryoshka InfoNCE on --pairs (default 0)")
    _fit_args(a, epochs=2, batch=512, lr=3e-3, cosine=False)
    return parser


def job_from_args(args: argparse.Namespace) -> ClassifierJob | AdaptorJob:
    """The job dataclass an argument namespace describes."""
    weights = [float(w) for w in args.loss_weights.split(",")] if args.loss_weights else None
    fit = FitConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, cosine=args.cosine,
        grad_clip=args.grad_clip, seed=args.seed, log_every=args.log_every,
        num_workers=args.loader_workers, keep_checkpoints=args.keep_checkpoints,
    )
    if args.command == "classify":
        encoder = args.encoder
        if args.modality == "image" and encoder == "bag":
            encoder = "resnet50"
        return ClassifierJob(
            out=args.out, data=args.data, modality=args.modality, text_column=args.text_column,
            label_column=args.label_column, image_column=args.image_column,
            val_data=args.val_data, val_fraction=args.val_fraction, max_rows=args.max_rows,
            encoder=encoder, init=args.init, random_init=args.random_init,
            freeze_table=args.freeze_table, sparse_table=args.sparse_table,
            pretrained=args.pretrained, embed_dim=args.embed_dim,
            dims=args.dims, efficient=args.efficient, loss_weights=weights,
            label_smoothing=args.label_smoothing, max_length=args.max_length,
            pooling=args.pooling, image_size=args.image_size, num_classes=args.num_classes,
            samples_per_epoch=args.samples_per_epoch, knn_rows=args.knn_rows, fit=fit,
        )
    return AdaptorJob(
        out=args.out, base=args.base, data=args.data, text_column=args.text_column,
        embeddings=args.embeddings, max_rows=args.max_rows, holdout=args.holdout, dims=args.dims,
        kind=args.kind, init=args.init, hidden=args.hidden, neighbours=args.neighbours,
        temperature=args.temperature, pairs=args.pairs,
        pair_columns=tuple(args.pair_columns.split(",")),
        contrastive_weight=args.contrastive_weight, loss_weights=weights, fit=fit,
    )


def run(job: ClassifierJob | AdaptorJob, runner: Runner | None = None) -> dict[str, Any]:
    """Run a job in this process (the ``--local`` path, and each Ray Train worker's body)."""
    if isinstance(job, ClassifierJob):
        return run_classifier_job(job, runner)
    return run_adaptor_job(job, runner)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: the same job, with DDP and Ray's checkpoints, on the
    device ``config["device"]`` resolves to with the GPU Ray gave this worker."""
    import tempfile

    import ray.train
    import ray.train.torch

    from pipelines.gpu_check import worker_device

    configure_logging(verbose=config.get("verbose", False))
    device = worker_device(config.get("device", "auto"), what="training")
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    checkpoint = ray.train.get_checkpoint()

    def report(metrics: dict[str, Any], path: Path | None) -> None:
        if path is None:
            ray.train.report(metrics)
            return
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)))

    with tempfile.TemporaryDirectory() if checkpoint else _null() as tmp:
        resume_from = None
        if checkpoint is not None:
            resume_from = Path(checkpoint.to_directory(tmp))
        runner = Runner(
            rank=rank, world_size=ctx.get_world_size(), device=device,
            prepare_model=_data_parallel(device) if ctx.get_world_size() > 1 else None,
            report=report, resume_from=resume_from,
        )
        run(config["job"], runner)


def _data_parallel(device: torch.device) -> Any:
    """How a worker wraps its model for DDP: Ray's ``prepare_model`` on CUDA, plain DDP on the CPU
    (Ray's would pin a CPU model to the worker's GPU under ``--device cpu``)."""
    import ray.train.torch

    if device.type == "cuda":
        return ray.train.torch.prepare_model
    return lambda model: torch.nn.parallel.DistributedDataParallel(model)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def run_ray(job: ClassifierJob | AdaptorJob, args: argparse.Namespace) -> None:
    """Run ``job`` under Ray Train's ``TorchTrainer``: one worker per GPU the cluster has or can
    get (``pipelines.layout.train_layout``), one CPU worker without GPUs. Workers that hold GPUs
    are checked first (``--device`` auto/cuda): a GPU torch cannot use stops the job here."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.gpu_check import check_gpu_slot
    from pipelines.layout import read_capacity, train_layout

    start_ray(address=args.ray_address, configure_logging=False)
    cap = read_capacity()
    workers, use_gpu = train_layout(cap, args.num_workers, args.use_gpu)
    log.info(f"cluster: {cap.describe()}; {workers} Ray Train worker(s){' with a GPU each' if use_gpu else ''}")
    if use_gpu and args.device != "cpu":
        log.info(f"GPU check: {check_gpu_slot(1, args.device, what='training')}")
    elif not use_gpu and args.device == "cuda":
        raise DeviceError("--device cuda, but the workers hold no GPU (the cluster has no GPU capacity, "
                          "or --no-use-gpu); pass --device auto or cpu")
    Path(job.out).mkdir(parents=True, exist_ok=True)
    out = Path(job.out).resolve()
    if isinstance(job, AdaptorJob):  # embed and mine once, on the driver; workers read the cache
        prepare_adaptor_data(job)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "verbose": args.verbose, "device": args.device},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu and args.device != "cpu" else "gloo"),
        run_config=RunConfig(
            name="ray", storage_path=str(out),
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(job.fit.keep_checkpoints, 1)),
        ),
    )
    result = trainer.fit()
    print(json.dumps({"ray_result": str(result.path), "metrics": result.metrics}, default=str))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    job = job_from_args(args)
    try:
        if args.local:
            device = resolve_device(args.device, local_gpu_count() > 0, what="training")
            Path(job.out).mkdir(parents=True, exist_ok=True)
            result = run(job, Runner(device=device))
            print(json.dumps(result, indent=2))
        else:
            job.out = str(Path(job.out).resolve())
            run_ray(job, args)
    except DeviceError as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 1
    eval_file = Path(job.out) / "eval.json"
    if eval_file.is_file():
        log.info(f"evaluation: {eval_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

