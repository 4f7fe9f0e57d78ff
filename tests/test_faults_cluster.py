"""Faults on a 3-node Ray cluster on one machine (``ray.cluster_utils.Cluster``): a worker node
killed, an encoder actor killed, the driver killed. After each, every input id is in the
dataset exactly once.

The input comes from moto's S3 through ``FaultProxy`` with every object GET slowed down, so the
job runs long enough (without burning CPU) for a fault to land while shards are in flight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from faultproxy import FaultProxy
from ray.cluster_utils import Cluster

from mrl_core.ledger_store import read_ledger
from mrl_core.storage import ids_of_rows
from pipelines.embed import EmbedConfig, run_embed

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
WORDS = ["vector", "search", "index", "matryoshka", "nested", "embedding", "lance", "ray", "shard", "encoder"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster():
    """A head node (no CPUs: the driver only) and two 1-CPU worker nodes; this process connected."""
    if ray.is_initialized():
        ray.shutdown()
    for attempt in range(2):  # a raylet may miss Ray's fixed 30 s start-up window on a loaded machine
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            for _ in range(2):
                c.add_node(num_cpus=1)
            c.wait_for_nodes()
            break
        except Exception:
            c.shutdown()
            if attempt:
                raise
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture
def slow_s3(s3_endpoint):
    """A FaultProxy in front of moto whose object GETs under ``corpus/`` take ``delay`` seconds."""
    proxy = FaultProxy(s3_endpoint["endpoint_url"]).start()
    yield proxy
    proxy.stop()


def upload_corpus(bucket: str, s3_endpoint: dict, tmp_path: Path, shards: int, rows: int) -> dict[str, int]:
    """Parquet shards ``{bucket}/corpus/pNN.parquet``; returns {shard URI: rows}."""
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={
        "endpoint_url": s3_endpoint["endpoint_url"], "region_name": "us-east-1"})
    sizes = {}
    rng = np.random.default_rng(0)
    for i in range(shards):
        local = tmp_path / f"p{i:02d}.parquet"
        texts = [" ".join(rng.choice(WORDS, size=6)) + f" {i}:{j}" for j in range(rows)]
        pq.write_table(pa.table({"text": texts}), local)
        fs.put(str(local), f"{bucket}/corpus/p{i:02d}.parquet")
        sizes[f"{bucket}/corpus/p{i:02d}.parquet"] = rows
    return sizes


def assert_exactly_once(out: str, sizes: dict[str, int]) -> None:
    ids = lance.dataset(out).to_table(columns=["id"])["id"].to_numpy()
    ds = lance.dataset(out)
    expected = np.concatenate([ids_of_rows(ds, uri, np.arange(n)) for uri, n in sizes.items()])
    assert len(ids) == len(expected), f"{len(ids)} rows for {len(expected)} input records"
    np.testing.assert_array_equal(np.sort(ids), np.sort(expected))
    assert set(read_ledger(lance.dataset(out))) == set(sizes)


def ledger_size(out: str) -> int:
    try:
        return len(read_ledger(lance.dataset(out)))
    except (ValueError, OSError):
        return 0


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- processes


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> dict[int, str]:
    """{pid: command line} of every process below ``root`` (which this test started)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in out:
                out[pid] = _cmdline(pid)
                frontier.append(pid)
    return out


def raylet_pid(node) -> int:
    return next(p.pid for kind, p in node.live_processes() if kind == "raylet")


# ----------------------------------------------------------------------------- tests


def test_worker_node_killed_during_embed(cluster, slow_s3, s3_endpoint, make_bucket, tmp_path):
    """A worker node dies (SIGKILL, no graceful exit) while shards are being embedded on it: Ray
    retries its tasks on the surviving node; the job finishes and holds every id exactly once."""
    sizes = upload_corpus(make_bucket("nodekill"), s3_endpoint, tmp_path, shards=12, rows=200)
    slow_s3.slow(0.6, method="GET", path="/corpus/")
    out = str(tmp_path / "out.lance")
    killed: dict[str, object] = {}

    def kill_a_busy_worker_node() -> None:
        try:
            wait_for(lambda: ledger_size(out) >= 1, 120, "the first commit")
            workers = [n for n in cluster.worker_nodes]
            busy = [n for n in workers
                    if any("embed_shards" in c for c in descendants(raylet_pid(n)).values())]
            victim = (busy or workers)[0]
            killed["ledger_before"] = ledger_size(out)
            killed["busy"] = bool(busy)
            cluster.remove_node(victim, allow_graceful=False)
            killed["at"] = time.time()
        except Exception as exc:  # noqa: BLE001 — reported by the assertion below
            killed["error"] = repr(exc)

    killer = threading.Thread(target=kill_a_busy_worker_node, daemon=True)
    killer.start()
    summary = run_embed(EmbedConfig(
        input=f"{next(iter(sizes)).rsplit('/', 1)[0]}/*.parquet", output=out, commit_every=1,
        input_storage_options=slow_s3.storage_options(s3_endpoint["storage_options"]), progress=False))
    killer.join(timeout=60)
    cluster.add_node(num_cpus=1)  # back to three nodes for the next test
    cluster.wait_for_nodes()

    assert "error" not in killed, killed
    assert "at" in killed, "the node was never killed"
    assert killed["ledger_before"] < len(sizes), "the kill landed after the job had finished"
    assert killed["busy"], "no shard was being embedded on the killed node"
    assert summary.shards_done == len(sizes) and not summary.shards_failed
    assert_exactly_once(out, sizes)


def test_encoder_actor_killed_is_restarted_and_batches_retried(cluster, slow_s3, s3_endpoint, make_bucket,
                                                               tmp_path):
    """The staged layout (encoder actors, as on GPUs; ``gpus_per_actor=0`` forces it on CPUs):
    the encoder actor's process is SIGKILLed mid-job; Ray restarts it and retries its batches."""
    sizes = upload_corpus(make_bucket("actorkill"), s3_endpoint, tmp_path, shards=12, rows=200)
    slow_s3.slow(0.8, method="GET", path="/corpus/")
    out = str(tmp_path / "out.lance")
    killed: list[int] = []
    errors: list[str] = []
    head = raylet_pid(cluster.head_node)
    roots = [head, *(raylet_pid(n) for n in cluster.worker_nodes)]

    def encoder_pids() -> list[int]:
        return [pid for root in roots for pid, cmd in descendants(root).items()
                if "Encode" in cmd and "ray::" in cmd]

    def kill_the_encoder() -> None:
        try:
            wait_for(lambda: ledger_size(out) >= 1 and encoder_pids(), 120, "a commit and a live encoder")
            for pid in encoder_pids():
                os.kill(pid, signal.SIGKILL)  # a process of the cluster this test started
                killed.append(pid)
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    killer = threading.Thread(target=kill_the_encoder, daemon=True)
    killer.start()
    summary = run_embed(EmbedConfig(
        input=f"{next(iter(sizes)).rsplit('/', 1)[0]}/*.parquet", output=out, commit_every=1,
        batch_rows=100, gpus_per_actor=0.0, actors=1,
        input_storage_options=slow_s3.storage_options(s3_endpoint["storage_options"]), progress=False))
    killer.join(timeout=60)

    assert not errors, errors
    assert killed, "no encoder actor was found to kill"
    assert summary.shards_done == len(sizes) and not summary.shards_failed
    assert_exactly_once(out, sizes)
    assert all(pid not in encoder_pids() for pid in killed)  # a new process serves the actor


DRIVER = r"""
import sys, time
from mrl_core import ledger
commit = ledger.CommitLog.commit
def slow_commit(self):
    rows = commit(self)
    time.sleep(1.0)  # commits spread out, so the kill lands between two of them
    return rows
ledger.CommitLog.commit = slow_commit
from pipelines.embed import main
sys.exit(main(sys.argv[1:]))
"""


def test_driver_killed_mid_job_resumes_from_last_commit(cluster, s3_endpoint, make_bucket, tmp_path):
    """The driver process is SIGKILLed between two commits; a re-run skips the committed shards,
    replaces any rows left without a ledger entry, and ends with every id exactly once."""
    bucket = make_bucket("driverkill")
    sizes = upload_corpus(bucket, s3_endpoint, tmp_path, shards=12, rows=200)
    out = str(tmp_path / "out.lance")
    opts = s3_endpoint["storage_options"]
    args = ["--input", f"{bucket}/corpus/*.parquet", "--output", out, "--commit-every", "1", "--no-progress",
            "--ray-address", cluster.address,
            *[a for k, v in opts.items() for a in ("--input-storage-option", f"{k}={v}")]]
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_for(lambda: ledger_size(out) >= 2 or proc.poll() is not None, 180, "two commits")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver this test started, and its children
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    committed = ledger_size(out)
    assert 0 < committed < len(sizes), "the kill landed after the job finished; make it longer"

    summary = run_embed(EmbedConfig(input=f"{bucket}/corpus/*.parquet", output=out,
                                    input_storage_options=opts, progress=False))
    assert summary.shards_skipped_committed == committed
    assert summary.shards_done == len(sizes) - committed
    assert_exactly_once(out, sizes)
