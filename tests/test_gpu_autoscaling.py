"""Autoscaling from zero: a ``ray.cluster_utils.AutoscalingCluster`` whose only worker type
declares ``{"CPU": 2, "GPU": 1}`` with ``min_workers: 0``. The embed job with default sizing
(and ``--device cpu``: no CUDA here) reads the node types from the head's autoscaler, asks for
one encoder actor per GPU the type can provide, and so makes the autoscaler start GPU workers;
the actors run there, each on its own GPU, and every row is written exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
from ray.cluster_utils import AutoscalingCluster

from mrl_core.ledger_store import read_ledger
from mrl_core.storage import ids_of_rows
from pipelines.layout import HEAD_MARKER, read_capacity


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScopedAutoscalingCluster(AutoscalingCluster):
    """Ray's ``AutoscalingCluster`` (a head whose autoscaler starts fake nodes of the given types
    on this machine), kept to what this test starts: its own GCS and dashboard ports and temp
    dir, and shut down by its own process group, never with ``ray stop --force`` (which stops
    every Ray on the machine). The config is written in full because the wheel does not ship the
    ``fake_multi_node/example.yaml`` that the base class reads."""

    def __init__(self, head_resources: dict, worker_node_types: dict, tmp: Path) -> None:
        self.tmp, self.port = tmp, _free_port()
        self.address = f"{ray._private.services.get_node_ip_address()}:{self.port}"
        self.proc: subprocess.Popen | None = None
        super().__init__(head_resources, worker_node_types)

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        return {
            "cluster_name": "fake_multinode", "max_workers": 8, "head_node_type": "ray.head.default",
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "available_node_types": {
                "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
                **worker_node_types,
            },
            "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], **config_kwargs,
        }

    def start(self, _system_config=None, override_env=None) -> None:
        config = self.tmp / "autoscaling.json"
        config.write_text(json.dumps(self._config))
        head = dict(self._head_resources)
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
               "RAY_AUTH_MODE": "disabled", "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={self.port}",
               f"--autoscaling-config={config}", f"--num-cpus={head.pop('CPU', 0)}",
               f"--num-gpus={head.pop('GPU', 0)}", f"--temp-dir={self.tmp / 'ray'}", "--include-dashboard=false",
               f"--dashboard-port={_free_port()}", "--disable-usage-stats"]
        log = open(self.tmp / "head.log", "w")  # noqa: SIM115 — closed with the process
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def shutdown(self) -> None:
        if self.proc is None:
            return
        with_group = [signal.SIGTERM, signal.SIGKILL]
        for sig in with_group:  # the group this test started: head, autoscaler, the nodes it added
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                continue
        time.sleep(1)
        with contextlib.suppress(ProcessLookupError):  # the nodes' processes outlive `ray start`
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait_for_gcs(self, timeout: float = 90) -> None:
        """Until the head's GCS port accepts connections (or the head has died)."""
        host, port = self.address.rsplit(":", 1)
        deadline = time.time() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
                return
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the head did not start: {(self.tmp / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)


@pytest.fixture
def autoscaling_cluster():
    if ray.is_initialized():
        ray.shutdown()
    tmp = Path(tempfile.mkdtemp(prefix="mrl-as-", dir="/tmp"))  # short: Ray's socket paths are <= 107 bytes
    cluster = ScopedAutoscalingCluster(
        head_resources={"CPU": 2},
        worker_node_types={"gpu_worker": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {},
                                          "min_workers": 0, "max_workers": 2}},
        tmp=tmp,
    )
    cluster.start()
    try:
        cluster.wait_for_gcs()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _encoder_log_lines(temp_dir: Path) -> dict[str, list[str]]:
    """{worker log file: the "encoder actor on node" lines in it} (one file per actor process)."""
    found = {}
    for path in temp_dir.glob("session_*/logs/worker-*.err"):
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if "encoder actor on node" in ln]
        if lines:
            found[path.name] = lines
    return found


def test_gpu_actors_make_the_autoscaler_start_gpu_workers(autoscaling_cluster, tmp_path):
    cap = read_capacity()
    assert (cap.gpus, cap.gpus_up) == (2, 0), cap  # read from the head's autoscaler config
    assert "autoscaling config" in cap.source

    folder = tmp_path / "in"
    folder.mkdir()
    sizes = {}
    for i in range(4):
        path = folder / f"s{i}.parquet"
        pq.write_table(pa.table({"text": [f"autoscaling shard {i} row {j} nested" for j in range(50)]}), path)
        sizes[str(path)] = 50
    out = str(tmp_path / "out.lance")
    # the job as a user runs it against the cluster: its own driver process (a driver that ran other
    # Ray Data jobs against another cluster before keeps some of their state)
    job = subprocess.run(
        [sys.executable, "pipelines/embed.py", "--input", str(folder), "--output", out, "--device", "cpu",
         "--batch-rows", "25", "--no-progress", "--ray-address", autoscaling_cluster.address],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},  # as the head runs (an earlier ray.init sets "token")
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert "2 encoder actor(s) on 2 GPU(s)" in job.stdout, job.stdout
    assert f"from {len(sizes)} shard(s)" in job.stdout and "0 failed" in job.stdout, job.stdout
    ds = lance.dataset(out)
    ids = ds.to_table(columns=["id"])["id"].to_numpy()
    expected = np.concatenate([ids_of_rows(ds, uri, np.arange(n)) for uri, n in sizes.items()])
    assert len(ids) == len(expected)
    np.testing.assert_array_equal(np.sort(ids), np.sort(expected))
    assert set(read_ledger(ds)) == set(sizes)

    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU") and HEAD_MARKER not in n["Resources"]}
    assert gpu_nodes, "the autoscaler started no GPU worker"
    actors = set()
    logged = _encoder_log_lines(autoscaling_cluster.tmp / "ray")
    for (line, *_) in logged.values():
        match = re.search(r"node id (\w+)\): GPU ids \[([\d,]*)\], model on (\w+)", line)
        assert match, line
        node, gpu_ids, device = match.groups()
        assert node in gpu_nodes and gpu_ids and device == "cpu", line
        actors.add((node, gpu_ids))
    assert actors, "no encoder actor logged where it ran"
    assert len(actors) == len(logged), "two actors shared a GPU"
