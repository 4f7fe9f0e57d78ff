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
import sys
from collections.abc import Sequence

from mrl_core.defaults import (
    CALIBRATION_QUERIES,
    CALIBRATION_ROWS,
    SHORTLISTS,
    TARGET_RECALL,
    TIER0_CANDIDATES,
    K,
)
from pipelines.cli import configure_logging, key_value


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    gpu_group.add_argument("--gpu", dest="gpu", action="store_true", default=None,
                           help="train and calibrate on all GPUs (default: when faiss-gpu sees one)")
    gpu_group.add_argument("--no-gpu", dest="gpu", action="store_false", help="CPU only")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration and training samples")
    p.add_argument("--no-make-current", action="store_true",
                   help="publish the version without pointing CURRENT at it")
    p.add_argument("--keep", type=int,
                   help="after publishing, delete all but the newest KEEP versions (>= 2 advised)")
    p.add_argument("--verbose", action="store_true",
                   help="also show debug lines and other libraries' logs (on stderr)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    # imported here so that --help is instant
    from mrl_core.funnel import FunnelSchedule
    from mrl_core.index import BuildOptions, CalibrationOptions, build_index, human_bytes
    from mrl_core.index_store import default_index_uri, prune_versions

    options = dict(args.storage_option)
    funnel: str | FunnelSchedule = args.funnel
    if funnel not in ("auto", "paper"):
        try:
            funnel = FunnelSchedule.parse(funnel)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
    try:
        manifest = build_index(
            args.dataset,
            index_uri=args.index_uri,
            storage_options=options,
            funnel=funnel,
            make_current=not args.no_make_current,
            options=BuildOptions(
                factory=args.factory,
                max_bytes_per_vector=args.max_bytes_per_vector,
                train_rows=args.train_rows,
                use_ray=args.use_ray,
                gpu=args.gpu,
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
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    index_uri = args.index_uri or default_index_uri(args.dataset)
    if args.keep:
        deleted = prune_versions(index_uri, args.keep, options)
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
