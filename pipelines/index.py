"""Build the tier-0 FAISS index of an MRL Lance dataset, calibrate its funnel, publish it.

    python pipelines/index.py --dataset data/docstrings.lance
    python pipelines/index.py --dataset s3://bucket/pypi.lance --storage-option aws_region=us-east-1 \\
        --factory IVF4096,SQ8 --target-recall 0.995

Artifacts go to <dataset>.indexes/ (or --index-uri): a new vNNNNNN/ directory holding
tier0.faiss and manifest.json, then CURRENT is pointed at it atomically, so running searches
never see a half-written index.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from mrl_core.defaults import (
    CALIBRATION_QUERIES,
    CALIBRATION_ROWS,
    SHORTLISTS,
    TARGET_RECALL,
    TIER0_CANDIDATES,
    K,
)
from mrl_core.device import DEVICES
from pipelines.cli import HelpFormatter, configure_logging, error_line, key_value, start_ray

log = logging.getLogger(__name__)


def parse_ints(text: str) -> list[int]:
    """``"100,200,500"`` as a list of ints."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    """The CLI."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
        epilog="Storage options use Lance's names (aws_endpoint, aws_region, aws_access_key_id, "
        "aws_secret_access_key, allow_http); they configure both Lance and fsspec.",
    )
    p.add_argument("--dataset", required=True, help="Lance dataset URI written by pipelines/embed.py")
    p.add_argument("--index-uri", help="where index versions live (default: <dataset>.indexes)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   type=key_value,
                   help="object-store option for the dataset and the index (repeatable)")
    p.add_argument("--factory", help="FAISS factory string for tier 0 (default: by corpus size and memory: "
                   "IDMap,Flat below 200k rows; below 10M IDMap,PQ<d/2>x4fs and IVF<n>,{Flat|SQ8|SQ4} "
                   "are both calibrated and timed; IVF<n>,PQ<m> above)")
    p.add_argument("--funnel", default="auto", help="'auto' (calibrate), 'paper' (16-32-64-128-256-full "
                   "on 200-100-50-25-10 over the stored dims) or a schedule like '64:1000,128:200,256'")
    p.add_argument("--tier0-dim", type=int, help="calibrate only schedules starting at this stored dim")
    p.add_argument("--target-recall", type=float, default=TARGET_RECALL,
                   help="recall@k (ties counted) against exact full-dim search the schedule must reach")
    p.add_argument("--k", type=int, default=K, help="the k of recall@k used for calibration")
    p.add_argument("--calibration-queries", type=int, default=CALIBRATION_QUERIES,
                   help="corpus rows searched as queries when calibrating (each left out of its own results)")
    p.add_argument("--calibration-rows", type=int, default=CALIBRATION_ROWS,
                   help="calibrate on a uniform sample of this many rows when the corpus is larger")
    p.add_argument("--shortlists", type=parse_ints, default=list(SHORTLISTS),
                   help="tier-0 shortlist sizes calibration tries (comma-separated)")
    p.add_argument("--tier0-candidates", type=int, default=TIER0_CANDIDATES,
                   help="how many of the smallest tier-0 dims reaching the target are built and timed")
    p.add_argument("--max-bytes-per-vector", type=float,
                   help="tier-0 memory budget per row (codes + 8-byte id); default 1/8 of full-dim float32")
    p.add_argument("--train-rows", type=int, help="rows sampled to train IVF/PQ (default: 40 per list, >= 65,536)")
    ray_group = p.add_mutually_exclusive_group()
    ray_group.add_argument("--ray", dest="use_ray", action="store_true", default=None,
                           help="add vectors in Ray tasks over fragments (default: from 262,144 rows)")
    ray_group.add_argument("--no-ray", dest="use_ray", action="store_false", help="add vectors in this process")
    gpu_group = p.add_mutually_exclusive_group()
    gpu_group.add_argument("--device", choices=DEVICES, default="auto",
                           help="where FAISS trains and calibrates: auto (on a cluster with GPU capacity "
                           "the build runs in a Ray task holding one node's GPUs, and stops before "
                           "publishing anything if FAISS cannot use them; locally, the GPUs of this "
                           "machine), cuda, or cpu (on purpose)")
    gpu_group.add_argument("--gpu", dest="device", action="store_const", const="cuda", help="same as --device cuda")
    gpu_group.add_argument("--no-gpu", dest="device", action="store_const", const="cpu", help="same as --device cpu")
    p.add_argument("--ray-address", help="Ray cluster to size the build by and run it on (default: "
                   "$RAY_ADDRESS; without one, this process and this machine's GPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration and training samples")
    p.add_argument("--no-make-current", action="store_true",
                   help="publish the version without pointing CURRENT at it")
    p.add_argument("--keep", type=int,
                   help="after publishing, delete all but the newest KEEP versions (>= 2 advised)")
    p.add_argument("--verbose", action="store_true",
                   help="also show debug lines and other libraries' logs (on stderr)")
    return p


def build(args: argparse.Namespace, holds_gpu: bool, node: str | None = None) -> Any:
    """Build, calibrate and publish the index ``args`` describe, in a process that does or does not
    hold GPUs (``--device`` decides whether FAISS uses them); returns the manifest."""
    from mrl_core.device import faiss_gpus
    from mrl_core.funnel import FunnelSchedule
    from mrl_core.index import BuildOptions, CalibrationOptions, build_index

    gpus = faiss_gpus(args.device, holds_gpu, node)
    if gpus:
        log.info(f"FAISS trains and calibrates on {gpus} GPU(s)")
    funnel = args.funnel if args.funnel in ("auto", "paper") else FunnelSchedule.parse(args.funnel)
    return build_index(
        args.dataset,
        index_uri=args.index_uri,
        storage_options=dict(args.storage_option),
        funnel=funnel,
        make_current=not args.no_make_current,
        options=BuildOptions(
            factory=args.factory,
            max_bytes_per_vector=args.max_bytes_per_vector,
            train_rows=args.train_rows,
            use_ray=args.use_ray,
            gpu=gpus > 0,
            seed=args.seed,
        ),
        calibration=CalibrationOptions(
            target_recall=args.target_recall,
            k=args.k,
            calibration_queries=args.calibration_queries,
            calibration_rows=args.calibration_rows,
            shortlist_sizes=args.shortlists,
            tier0_candidates=args.tier0_candidates,
            tier0_dim=args.tier0_dim,
        ),
    )


def _build_on_gpu_node(args: argparse.Namespace) -> Any:
    """A Ray task's work: ``build`` on the node whose GPUs the task holds."""
    from pipelines.gpu_check import holds_gpu, ray_node

    configure_logging(verbose=args.verbose)
    return build(args, holds_gpu(), ray_node())


def run(args: argparse.Namespace) -> Any:
    """``build`` where the GPUs are: on a Ray cluster with GPU capacity, in one task holding every
    GPU of one node (the autoscaler starts one if none is up); otherwise in this process."""
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        from mrl_core.device import local_gpu_count

        return build(args, local_gpu_count() > 0)
    import ray

    from mrl_core.device import DeviceError
    from mrl_core.storage import open_dataset
    from pipelines.layout import read_capacity, task_gpus

    open_dataset(args.dataset, dict(args.storage_option))  # a wrong --dataset fails before Ray starts
    start_ray(address=address, log_to_driver=True, configure_logging=False)
    cap = read_capacity()
    gpus = task_gpus(cap)
    log.info(f"cluster: {cap.describe()}")
    if not gpus:
        return build(args, False)
    log.info(f"building in a Ray task holding {gpus} GPU(s)")
    task = ray.remote(num_gpus=gpus, max_retries=0)(_build_on_gpu_node)
    try:
        return ray.get(task.remote(_absolute_paths(args)))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, (DeviceError, ValueError, FileNotFoundError)):
            raise type(exc.cause)(str(exc.cause)) from None
        raise


def _absolute_paths(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with local paths made absolute: a Ray worker does not run in this directory."""
    from mrl_core.objectstore import protocol_of

    out = argparse.Namespace(**vars(args))
    for name in ("dataset", "index_uri"):
        value = getattr(out, name)
        if value and protocol_of(value) == "file" and "://" not in value:
            setattr(out, name, os.path.abspath(value))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    # imported here so that --help is instant
    from mrl_core.funnel import FunnelSchedule
    from mrl_core.index import human_bytes
    from mrl_core.index_store import default_index_uri, prune_versions

    if args.funnel not in ("auto", "paper"):
        try:
            FunnelSchedule.parse(args.funnel)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
    try:
        manifest = run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 1
    index_uri = args.index_uri or default_index_uri(args.dataset)
    if args.keep:
        deleted = prune_versions(index_uri, args.keep, dict(args.storage_option))
        if deleted:
            print(f"deleted old versions: {', '.join(deleted)}")
    schedule = manifest.funnel_schedule()
    recall = "not measured" if manifest.schedule_recall is None else f"{manifest.schedule_recall:.4f}"
    print(
        f"index {manifest.version}: {manifest.factory} over {manifest.column}, {manifest.rows:,} rows, "
        f"{human_bytes(manifest.index_bytes)} ({manifest.bytes_per_vector} bytes/vector), built in "
        f"{manifest.build_seconds:.1f} s\nfunnel {schedule}: recall@{args.k} {recall}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
