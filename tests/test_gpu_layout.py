"""GPU layouts on CPU machines: the sizing rule (pure), ``--device`` (the library check), and a
real 2-node Ray cluster whose worker declares 2 GPUs but has no CUDA: embed, index and train stop
with the CUDA error by default, writing nothing, and run on the CPU inside the GPU actors with
``--device cpu``. (Autoscaling from zero: ``test_gpu_autoscaling.py``.)"""

from __future__ import annotations

import math
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from mrl_core.device import DeviceError, faiss_gpus, resolve_device
from mrl_core.ledger_store import read_ledger
from mrl_core.storage import ids_of_rows
from pipelines.layout import (
    HEAD_MARKER,
    Capacity,
    Layout,
    NodeType,
    capacity,
    embed_layout,
    node_types_from_cluster_config,
    node_types_from_config,
    plan_layout,
    task_gpus,
    train_layout,
)

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
HEAD = {HEAD_MARKER: 1.0, "CPU": 0.0}
GPU_TYPE = NodeType("gpu_worker", {"CPU": 4, "GPU": 1}, 8)
CPU_TYPE = NodeType("cpu_worker", {"CPU": 8}, 8)
HEAD_TYPE = NodeType("head", {"CPU": 0}, 0)


# ----------------------------------------------------------------------------- sizing (pure)


def test_capacity_counts_what_the_node_types_can_add():
    cap = capacity([HEAD_TYPE, CPU_TYPE, GPU_TYPE], [HEAD])
    assert (cap.gpus, cap.gpus_up, cap.gpus_per_node, cap.cpus, cap.cpus_up) == (8, 0, 1, 96, 0)
    up = capacity([HEAD_TYPE, CPU_TYPE, GPU_TYPE], [HEAD, {"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}])
    assert (up.gpus, up.gpus_up) == (8, 2)  # the two up are among the eight the type allows
    assert capacity([GPU_TYPE], [HEAD], max_workers=3).gpus == 3  # the launcher's global cap
    assert math.isinf(capacity([NodeType("g", {"GPU": 2}, None)], [HEAD]).gpus)
    static = capacity([], [{HEAD_MARKER: 1, "CPU": 8, "GPU": 4}, {"CPU": 8, "GPU": 4}])
    assert (static.gpus, static.gpus_per_node) == (8, 4)


def test_gpu_layout_asks_for_every_gpu_the_cluster_can_get():
    layout = plan_layout([HEAD_TYPE, CPU_TYPE, GPU_TYPE], [HEAD])
    assert layout == Layout(gpus_per_actor=1.0, min_actors=1, max_actors=8, initial_actors=8)
    assert layout.gpus == 8
    half = plan_layout([GPU_TYPE], [HEAD, {"CPU": 4, "GPU": 1}], gpus_per_actor=0.5)
    assert (half.min_actors, half.max_actors, half.initial_actors) == (2, 16, 16)
    unlimited = plan_layout([NodeType("g", {"GPU": 1}, None)], [HEAD, {"GPU": 1}, {"GPU": 1}])
    assert (unlimited.min_actors, unlimited.max_actors, unlimited.initial_actors) == (2, None, 2)


def test_without_gpu_capacity_the_cpu_layout_and_overrides_win():
    assert plan_layout([HEAD_TYPE, CPU_TYPE], [HEAD]) == Layout(gpus_per_actor=None, tasks=64)
    assert plan_layout([], [{"CPU": 2}], actors=3) == Layout(gpus_per_actor=None, tasks=3)
    assert plan_layout([], [{"CPU": 2}], gpus_per_actor=0.0) == Layout(0.0, 1, 1, 1)  # staged, on CPU
    assert plan_layout([GPU_TYPE], [HEAD], actors=3) == Layout(1.0, 3, 3, 3)
    assert plan_layout([], [{"CPU": 2}], gpus_per_actor=1.0).max_actors == 1  # asked for: asked for
    with pytest.raises(ValueError, match="gpus-per-actor"):
        embed_layout(capacity([GPU_TYPE], [HEAD]), gpus_per_actor=-1)


def test_train_and_index_sizing():
    cap = capacity([GPU_TYPE, NodeType("big", {"CPU": 32, "GPU": 4}, 2)], [HEAD])
    assert train_layout(cap) == (16, True)
    assert train_layout(cap, num_workers=2) == (2, True)
    assert train_layout(cap, use_gpu=False) == (1, False)
    assert train_layout(Capacity(0, 0, 0, 8, 8)) == (1, False)
    assert task_gpus(cap) == 4 and task_gpus(Capacity(0, 0, 0, 8, 8)) == 0


def test_node_types_from_an_autoscaling_config_and_from_the_gcs_cluster_config():
    from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

    config = {"available_node_types": {"head": {"resources": {"CPU": 0}, "max_workers": 0},
                                       "gpu": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 2}}}
    assert node_types_from_config(config) == [NodeType("head", {"CPU": 0}, 0), NodeType("gpu", {"CPU": 4, "GPU": 1}, 2)]
    proto = ClusterConfig(node_group_configs=[NodeGroupConfig(name="g", resources={"GPU": 2}, max_count=-1)])
    assert node_types_from_cluster_config(proto) == [NodeType("g", {"GPU": 2.0}, None)]


# ----------------------------------------------------------------------------- --device (library)


def test_device_cpu_and_auto_without_a_gpu():
    assert resolve_device("cpu", holds_gpu=True).type == "cpu"
    assert resolve_device("auto", holds_gpu=False).type == "cpu"
    assert faiss_gpus("cpu", holds_gpu=True) == 0 and faiss_gpus("auto", holds_gpu=False) == 0
    with pytest.raises(ValueError, match="auto, cuda, cpu"):
        resolve_device("gpu", holds_gpu=False)


@NO_CUDA
def test_a_held_gpu_that_cannot_be_used_is_an_error_naming_what_to_fix():
    with pytest.raises(DeviceError) as err:
        resolve_device("auto", holds_gpu=True, node="gpu-7 (10.0.0.7)")
    message = str(err.value)
    assert "node gpu-7 (10.0.0.7)" in message and f"torch {torch.__version__}" in message
    assert ("CUDA " in message or "CPU-only build" in message) and "driver" in message
    assert "--device cpu" in message and "\n" not in message
    with pytest.raises(DeviceError, match="FAISS cannot use the GPU.*sees no GPU.*--device cpu"):
        faiss_gpus("auto", holds_gpu=True)
    with pytest.raises(DeviceError, match="holds no GPU"):
        resolve_device("cuda", holds_gpu=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_usable_gpu_is_used_by_torch_and_faiss():
    assert resolve_device("auto", holds_gpu=True).type == "cuda"
    import faiss

    if hasattr(faiss, "StandardGpuResources"):  # faiss-gpu: it must see the GPU torch sees
        assert faiss_gpus("auto", holds_gpu=True) == torch.cuda.device_count()


# ----------------------------------------------------------------------------- a node with 2 GPUs, no CUDA


@pytest.fixture(scope="module")
def gpu_cluster():
    """A head (no CPUs: the driver only) and one worker declaring 2 CPUs and 2 GPUs, without CUDA."""
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        c.add_node(num_cpus=2, num_gpus=2)
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False, configure_logging=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _corpus(folder: Path, shards: int = 3, rows: int = 60) -> dict[str, int]:
    folder.mkdir()
    sizes = {}
    for i in range(shards):
        path = folder / f"s{i}.parquet"
        pq.write_table(pa.table({"text": [f"gpu layout test {i} row {j} vector search" for j in range(rows)]}), path)
        sizes[str(path)] = rows
    return sizes


def _assert_exactly_once(out: str, sizes: dict[str, int]) -> None:
    ds = lance.dataset(out)
    ids = ds.to_table(columns=["id"])["id"].to_numpy()
    expected = np.concatenate([ids_of_rows(ds, uri, np.arange(n)) for uri, n in sizes.items()])
    assert len(ids) == len(expected), f"{len(ids)} rows for {len(expected)} input records"
    np.testing.assert_array_equal(np.sort(ids), np.sort(expected))
    assert set(read_ledger(ds)) == set(sizes)


def _rows_written(uri: str) -> int:
    try:
        ds = lance.dataset(uri)
    except (ValueError, OSError):
        return 0  # no dataset at all
    assert not read_ledger(ds)
    return ds.count_rows()


@NO_CUDA
def test_embed_refuses_a_gpu_without_cuda_then_runs_on_cpu_in_the_gpu_actors(gpu_cluster, tmp_path):
    from pipelines.embed import EmbedConfig, EmbedError, run_embed

    sizes = _corpus(tmp_path / "in")
    out = str(tmp_path / "out.lance")
    with pytest.raises(EmbedError) as err:
        run_embed(EmbedConfig(input=str(tmp_path / "in"), output=out, progress=False))
    assert "cannot use the GPU on node" in str(err.value) and "--device cpu" in str(err.value)
    assert "torch.version" not in str(err.value) and f"torch {torch.__version__}" in str(err.value)
    assert _rows_written(out) == 0
    # past the up-front check (here: the staged layout on CPU, which holds no GPU), each
    # encoder actor checks its own device and stops the job the same way
    with pytest.raises(EmbedError, match="encoder wordllama-256 cannot use the GPU.*holds no GPU.*--device cpu"):
        run_embed(EmbedConfig(input=str(tmp_path / "in"), output=out, gpus_per_actor=0.0, device="cuda",
                              progress=False))
    assert _rows_written(out) == 0

    summary = run_embed(EmbedConfig(input=str(tmp_path / "in"), output=out, device="cpu", batch_rows=50,
                                    progress=False))
    assert summary.encode_actors == 2 and summary.gpus == 2  # one actor per declared GPU
    assert summary.shards_done == len(sizes) and not summary.shards_failed
    _assert_exactly_once(out, sizes)


@NO_CUDA
def test_index_refuses_a_gpu_without_cuda_then_builds_on_cpu(gpu_cluster, tmp_path, corpus_writer, capsys):
    from pipelines.index import main

    uri = str(tmp_path / "docs.lance")
    vectors = np.random.default_rng(0).standard_normal((1500, 256)).astype(np.float32)
    corpus_writer(uri, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    args = ["--dataset", uri, "--calibration-queries", "50", "--no-ray", "--ray-address", gpu_cluster.address]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "FAISS cannot use the GPU on node" in err and "--device cpu" in err
    assert not Path(f"{uri}.indexes").exists()

    assert main([*args, "--device", "cpu"]) == 0
    assert "index v" in capsys.readouterr().out
    assert (Path(f"{uri}.indexes") / "CURRENT").exists()


@NO_CUDA
def test_train_refuses_a_gpu_without_cuda_then_trains_on_cpu(gpu_cluster, tmp_path, make_static_dir, capsys):
    from pipelines.train import main

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120)
    texts = [" ".join(f"w{w}" for w in rng.integers(20 * c, 20 * c + 20, 6)) for c in labels]
    data = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"text": texts, "label": [f"c{c}" for c in labels]}), data)
    out = tmp_path / "run"
    args = ["classify", "--data", str(data), "--init", f"static:{make_static_dir(tmp_path / 'static')}",
            "--dims", "4,16", "--epochs", "1", "--batch-size", "32", "--out", str(out), "--log-every", "0",
            "--ray-address", gpu_cluster.address, "--max-failures", "0"]
    assert main(args) == 1
    assert "training cannot use the GPU on node" in capsys.readouterr().err
    assert not out.exists()

    assert main([*args, "--device", "cpu"]) == 0
    assert (out / "eval.json").is_file()
