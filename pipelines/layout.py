"""How many encoder actors, GPUs and training workers a job asks for: sized by the cluster's capacity.

Capacity is what the cluster has *or can get*: the nodes up now and, on an autoscaling cluster,
every node its node types can still add (``max_workers`` of each type). Sizing by capacity rather
than by what is up at start is what makes pending GPU actors start GPU nodes on clusters whose
workers scale from zero (every cluster in ``infra/``). ``capacity`` and the ``*_layout`` functions
are pure; ``read_capacity`` reads the running cluster.

Ray 2.60 gives a driver the autoscaler's node types in one of these places, tried in order:

1. the GCS (``ray._private.state.state.get_cluster_config()``, the ``ClusterConfig`` an autoscaler
   reports; Ray Data reads the same);
2. on KubeRay, the RayCluster resource, turned into node types as Ray's KubeRay autoscaler does
   (``RAY_CLUSTER_NAME``/``RAY_CLUSTER_NAMESPACE`` are set in every KubeRay pod);
3. the autoscaling config file the head's autoscaler (``monitor.py --autoscaling-config``) runs
   with: the cluster launcher's ``~/ray_bootstrap_config.yaml``, ``ray start --head
   --autoscaling-config``, ``ray.cluster_utils.AutoscalingCluster``.

2 and 3 are read on the head node (in a zero-CPU task pinned there when the driver runs elsewhere).
Without any, the capacity is the nodes up now.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

HEAD_MARKER = "node:__internal_head__"
"""The resource Ray gives the head node only."""


@dataclass(frozen=True)
class NodeType:
    """A kind of node an autoscaler can start: its Ray resources and how many (None: no limit)."""

    name: str
    resources: Mapping[str, float]
    max_workers: int | None


@dataclass(frozen=True)
class Capacity:
    """What a cluster has or can get; ``inf`` where a node type has no limit."""

    gpus: float
    gpus_up: float
    gpus_per_node: float
    cpus: float
    cpus_up: float
    source: str = "nodes up now"

    def describe(self) -> str:
        """One line for the log."""
        return (f"{_count(self.gpus)} GPU(s) ({_count(self.gpus_up)} up now), {_count(self.cpus)} CPU(s) "
                f"({_count(self.cpus_up)} up now); node types from {self.source}")


@dataclass(frozen=True)
class Layout:
    """The embed job's shape. ``gpus_per_actor`` None: no encoder actors, up to ``tasks`` CPU tasks
    (None: one per shard) each read, encode and write a shard. Otherwise an actor pool of
    ``min_actors``..``max_actors`` (None: no limit) encoder actors, ``initial_actors`` asked for
    at start, each with ``gpus_per_actor`` GPUs (0: the staged layout on the CPU)."""

    gpus_per_actor: float | None = None
    min_actors: int = 1
    max_actors: int | None = 1
    initial_actors: int = 1
    tasks: int | None = None

    @property
    def actors(self) -> int:
        """Encoder actors at full size (``initial_actors`` when the pool has no limit; 0 in the CPU layout)."""
        if self.gpus_per_actor is None:
            return 0
        return self.max_actors if self.max_actors is not None else self.initial_actors

    @property
    def gpus(self) -> float:
        """GPUs the encoder actors hold at full size."""
        return self.actors * (self.gpus_per_actor or 0.0)

    def describe(self) -> str:
        """One line for the log."""
        if self.gpus_per_actor is None:
            return f"CPU layout: {self.tasks or 'one per shard'} concurrent task(s), each a whole shard"
        top = "no limit" if self.max_actors is None else self.max_actors
        return (f"{self.initial_actors} encoder actor(s) asked for at start ({self.min_actors}..{top}), "
                f"{self.gpus_per_actor:g} GPU(s) each")


def _count(x: float) -> str:
    return "unlimited" if math.isinf(x) else f"{x:g}"


# ----------------------------------------------------------------------------- pure sizing


def capacity(node_types: Sequence[NodeType], nodes: Sequence[Mapping[str, float]],
             max_workers: int | None = None, source: str = "nodes up now") -> Capacity:
    """The GPUs and CPUs of ``nodes`` (those up now, each its resource dict) and of what
    ``node_types`` can add, at most ``max_workers`` worker nodes in all (the launcher's cap)."""
    def up(key: str) -> float:
        return float(sum(n.get(key, 0.0) for n in nodes))

    def head(key: str) -> float:
        return float(sum(n.get(key, 0.0) for n in nodes if HEAD_MARKER in n))

    def typed(key: str) -> float:
        total, largest = 0.0, 0.0
        for t in node_types:
            amount = float(t.resources.get(key, 0.0))
            if amount and t.max_workers != 0:
                total += math.inf if t.max_workers is None or t.max_workers < 0 else amount * t.max_workers
                largest = max(largest, amount)
        return total if max_workers is None else min(total, max_workers * largest)

    per_node = [float(n.get("GPU", 0.0)) for n in nodes]
    per_node += [float(t.resources.get("GPU", 0.0)) for t in node_types if t.max_workers != 0]
    return Capacity(
        gpus=max(up("GPU"), head("GPU") + typed("GPU")), gpus_up=up("GPU"),
        gpus_per_node=max(per_node, default=0.0),
        cpus=max(up("CPU"), head("CPU") + typed("CPU")), cpus_up=up("CPU"), source=source,
    )


def embed_layout(cap: Capacity, actors: int | None = None, gpus_per_actor: float | None = None) -> Layout:
    """The embed job's layout on ``cap``: one encoder actor per GPU the cluster can get, all
    asked for at start (so the autoscaler starts every GPU node it may), the pool allowed to run
    with as few as are up; without GPU capacity the CPU layout, one task per CPU. ``actors``
    fixes the pool size (CPU tasks in the CPU layout), ``gpus_per_actor`` the GPUs per actor
    (fractional allowed; 0 runs the staged actor layout on the CPU)."""
    if gpus_per_actor is None and cap.gpus <= 0:
        cpus = None if math.isinf(cap.cpus) else max(1, int(cap.cpus))
        return Layout(gpus_per_actor=None, tasks=actors or cpus)
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if cap.gpus_per_node >= 1 else cap.gpus_per_node
    if gpus_per_actor < 0:
        raise ValueError(f"--gpus-per-actor must be >= 0, got {gpus_per_actor}")
    if actors:
        return Layout(gpus_per_actor, actors, actors, actors)
    if gpus_per_actor == 0:
        return Layout(0.0, 1, 1, 1)
    most = None if math.isinf(cap.gpus) else max(1, int(cap.gpus / gpus_per_actor + 1e-9))
    now = max(1, int(cap.gpus_up / gpus_per_actor + 1e-9))
    least = now if most is None else min(now, most)
    return Layout(gpus_per_actor, least, most, most if most is not None else least)


def plan_layout(node_types: Sequence[NodeType], nodes: Sequence[Mapping[str, float]],
                actors: int | None = None, gpus_per_actor: float | None = None,
                max_workers: int | None = None) -> Layout:
    """``embed_layout`` of the ``capacity`` of ``node_types`` and ``nodes``."""
    return embed_layout(capacity(node_types, nodes, max_workers), actors, gpus_per_actor)


def task_gpus(cap: Capacity) -> int:
    """GPUs for one task that uses every GPU of one node (the index build): the most any node
    has or any node type brings; 0 without GPU capacity."""
    return int(cap.gpus_per_node) if cap.gpus > 0 else 0


def train_layout(cap: Capacity, num_workers: int | None = None, use_gpu: bool | None = None) -> tuple[int, bool]:
    """(Ray Train workers, whether each holds a GPU): one worker per GPU the cluster can get,
    else one CPU worker; ``num_workers`` and ``use_gpu`` override."""
    if use_gpu is None:
        use_gpu = cap.gpus >= 1
    if num_workers:
        return num_workers, use_gpu
    if not use_gpu:
        return 1, False
    gpus = cap.gpus_up if math.isinf(cap.gpus) else cap.gpus
    return max(1, int(gpus)), True


# ----------------------------------------------------------------------------- node types


def node_types_from_config(config: Mapping[str, Any]) -> list[NodeType]:
    """The node types of an autoscaling config (a launcher YAML after ``prepare_config``, or
    what Ray's KubeRay autoscaler derives from a RayCluster): ``available_node_types``."""
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        limit = spec.get("max_workers", 0)
        out.append(NodeType(name, dict(spec.get("resources") or {}), None if limit is None else int(limit)))
    return out


def node_types_from_cluster_config(config: Any) -> list[NodeType]:
    """The node types of Ray's ``autoscaler_pb2.ClusterConfig`` (``max_count`` -1: no limit)."""
    return [NodeType(g.name, {k: float(v) for k, v in g.resources.items()},
                     None if g.max_count < 0 else int(g.max_count))
            for g in config.node_group_configs]


def _from_gcs() -> tuple[list[NodeType], int | None] | None:
    import ray._private.state

    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception as exc:  # noqa: BLE001 — an older GCS, or none: try the next source
        logger.debug(f"no cluster config in the GCS: {exc}")
        return None
    if config is None or not config.node_group_configs:
        return None
    return node_types_from_cluster_config(config), None


def _from_kuberay() -> tuple[list[NodeType], int | None] | None:
    name, namespace = os.environ.get("RAY_CLUSTER_NAME"), os.environ.get("RAY_CLUSTER_NAMESPACE")
    if not (name and namespace and os.environ.get("KUBERNETES_SERVICE_HOST")):
        return None
    try:
        from ray.autoscaler._private.kuberay import node_provider
        from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

        cr = node_provider.KubernetesHttpApiClient(namespace=namespace).get(f"rayclusters/{name}")
        config = _derive_autoscaling_config_from_ray_cr(cr)
    except Exception as exc:  # noqa: BLE001 — no RBAC, no API: fall back to the nodes up now
        logger.warning(f"cannot read RayCluster {namespace}/{name} for its node types ({exc}); "
                       f"sizing by the nodes up now (pass --actors/--gpus-per-actor to override)")
        return None
    return node_types_from_config(config), config.get("max_workers")


def _cmdline(pid: str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def monitor_config_path(gcs_address: str) -> str | None:
    """The ``--autoscaling-config`` of the autoscaler process of the cluster at ``gcs_address``
    on this machine (matched by its ``--gcs-address``, by port when the host differs), or None."""
    port = gcs_address.rsplit(":", 1)[-1]
    found: list[tuple[bool, str]] = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        args = _cmdline(pid)
        if not any(a.endswith("monitor.py") for a in args):
            continue
        flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        address, path = flags.get("gcs-address", ""), flags.get("autoscaling-config")
        if path and address.rsplit(":", 1)[-1] == port:
            found.append((address == gcs_address, os.path.expanduser(path)))
    found.sort(reverse=True)
    return found[0][1] if found else None


def _from_monitor(gcs_address: str) -> tuple[list[NodeType], int | None] | None:
    path = monitor_config_path(gcs_address)
    if path is None:
        return None
    try:
        text = Path(path).read_text()
        config = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        logger.warning(f"cannot read the autoscaling config {path} ({exc}); sizing by the nodes up now")
        return None
    return node_types_from_config(config), config.get("max_workers")


def _read_on_head(gcs_address: str) -> tuple[list[NodeType], int | None, str] | None:
    """Node types from the sources only the head node can read (KubeRay, the monitor's file)."""
    for source, read in (("the RayCluster resource (KubeRay)", _from_kuberay),
                         ("the head's autoscaling config", lambda: _from_monitor(gcs_address))):
        got = read()
        if got is not None:
            return got[0], got[1], source
    return None


def read_node_types() -> tuple[list[NodeType], int | None, str]:
    """(node types, cluster-wide worker cap, where they came from) of the connected Ray cluster;
    no node types when it does not autoscale."""
    import ray

    got = _from_gcs()
    if got is not None:
        return got[0], got[1], "the GCS cluster config"
    gcs_address = ray.get_runtime_context().gcs_address
    head = next((n for n in ray.nodes() if n.get("Alive") and HEAD_MARKER in n.get("Resources", {})), None)
    here = ray.get_runtime_context().get_node_id()
    if head is None or head["NodeID"] == here:
        found = _read_on_head(gcs_address)
    else:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(head["NodeID"], soft=False))
        found = ray.get(task(_read_on_head).remote(gcs_address), timeout=120)
    return found if found is not None else ([], None, "nodes up now (no autoscaler config found)")


def read_nodes() -> list[dict[str, float]]:
    """The resources of each node of the connected Ray cluster that is alive."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def read_capacity() -> Capacity:
    """The ``capacity`` of the connected Ray cluster (``ray.init`` first)."""
    types, max_workers, source = read_node_types()
    cap = capacity(types, read_nodes(), max_workers, source)
    logger.debug(f"cluster capacity: {cap.describe()}")
    return cap


def cluster_layout(actors: int | None = None, gpus_per_actor: float | None = None) -> Layout:
    """The embed job's layout on the connected Ray cluster (``embed_layout`` of ``read_capacity``)."""
    cap = read_capacity()
    layout = embed_layout(cap, actors, gpus_per_actor)
    logger.info(f"{layout.describe()}; cluster: {cap.describe()}")
    return layout

