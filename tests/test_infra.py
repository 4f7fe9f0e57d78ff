"""The cluster configs in infra/ parse and validate, offline and without credentials.

- Ray cluster launcher YAMLs: Ray's own prepare_config + validate_config (ray-schema.json),
  and for AWS Ray's full bootstrap against moto's mocked AWS (no real account touched).
- Kubernetes core kinds: the Kubernetes OpenAPI schemas shipped by kubernetes-validate
  (strict: unknown fields fail); pod templates inside KubeRay specs: the strict
  PodTemplateSpec schema; KubeRay's own fields: the json names of its Go types.
- The re-index trigger script runs against a fake kubectl.
- Every pipelines/*.py a config or the README calls must exist and define its flags.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER_CONFIGS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
CORE_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
RAY_KINDS = {"RayCluster", "RayJob"}
PROJECT_HOME = "/home/ray/mrl-embed"  # where infra/Dockerfile puts the project

# json field names of KubeRay's ray.io/v1 Go types (ray-operator/apis/ray/v1), the union
# over the 1.x releases; a key outside these sets is a typo the operator would drop.
RAY_CLUSTER_SPEC_FIELDS = {
    "headGroupSpec",
    "workerGroupSpecs",
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headServiceAnnotations",
    "suspend",
    "managedBy",
    "gcsFaultToleranceOptions",
}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "numOfHosts",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "suspend",
    "idleTimeoutSeconds",
}
AUTOSCALER_FIELDS = {
    "resources",
    "image",
    "imagePullPolicy",
    "env",
    "envFrom",
    "volumeMounts",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "version",
}
RAY_JOB_SPEC_FIELDS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
}


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[tuple[str, dict]]:
    """Every Kubernetes object in infra/kuberay, plus RayJob templates kept in ConfigMaps."""
    out = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            out.append((path.name, doc))
            if doc["kind"] == "ConfigMap":
                for key, value in doc.get("data", {}).items():
                    if key.endswith(".yaml"):
                        out.append(
                            (f"{path.name}:{doc['metadata']['name']}/{key}", yaml.safe_load(value))
                        )
    return out


def _of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(where, doc) for where, doc in _manifests() if doc["kind"] == kind]


def _dockerfile_ray_image() -> str:
    match = re.search(r"^ARG RAY_IMAGE=(\S+)$", (INFRA / "Dockerfile").read_text(), re.M)
    assert match, "infra/Dockerfile has no ARG RAY_IMAGE=..."
    return match.group(1)


def _ray_version_of(image: str) -> str:
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)(-.*)?", image)
    assert match, f"not a rayproject/ray image: {image}"
    return match.group(1)


# --------------------------------------------------------------------------------------
# Ray cluster launcher


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(INFRA / name)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # jsonschema against ray/autoscaler/ray-schema.json + checks

    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "head should run no Ray tasks"
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu_types) == 1
    assert gpu_types[0]["min_workers"] == 0 and gpu_types[0]["max_workers"] >= 1
    assert all(t["min_workers"] == 0 for n, t in types.items() if t is not head)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_installs_the_project_on_every_node(name):
    config = _load(INFRA / name)
    assert config["file_mounts"] == {"~/mrl-embed": "."}
    assert ".gitignore" in config["rsync_filter"]
    assert "**/.git" in config["rsync_exclude"]
    # setup_commands run on head and workers alike (the per-type lists only add to them).
    (setup,) = config["setup_commands"]
    assert setup.startswith("bash ~/mrl-embed/infra/install-project.sh ~/mrl-embed gpu,")
    assert (INFRA / "install-project.sh").exists()
    assert config["docker"]["image"] == _dockerfile_ray_image()


def test_launcher_configs_use_node_identities_not_keys():
    aws = _load(INFRA / "aws-gpu.yaml")
    assert "aws_credentials" not in aws["provider"]
    profiles = {
        name: t["node_config"]["IamInstanceProfile"]["Name"]
        for name, t in aws["available_node_types"].items()
    }
    assert profiles["head"] == "mrl-embed-head"
    assert {p for n, p in profiles.items() if n != "head"} == {"mrl-embed-worker"}

    gcp = _load(INFRA / "gcp-gpu.yaml")
    for name, node_type in gcp["available_node_types"].items():
        if name != gcp["head_node_type"]:  # the launcher gives the head its own account
            (account,) = node_type["node_config"]["serviceAccounts"]
            assert account["email"].startswith("mrl-embed-worker@")


def test_aws_config_bootstraps_against_mocked_aws(tmp_path, monkeypatch):
    """Ray's full AWS bootstrap (instance profiles, key pair, subnets, security group,
    resource autodetection) run against moto: catches what the schema cannot."""
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    monkeypatch.setenv("HOME", str(tmp_path))  # the launcher writes ~/.ssh/ray-autoscaler_*.pem
    for var, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-west-2",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    from ray.autoscaler._private.aws import node_provider
    from ray.autoscaler._private.commands import _bootstrap_config

    config = _load(INFRA / "aws-gpu.yaml")
    used = sorted(
        {t["node_config"]["InstanceType"] for t in config["available_node_types"].values()}
    )

    def list_used_instance_types(region, aws_credentials=None):
        # Ray pages through every EC2 instance type (seconds under moto); the same moto
        # data for just the types this config uses.
        ec2 = boto3.client("ec2", region_name=region)
        return ec2.describe_instance_types(InstanceTypes=used)["InstanceTypes"]

    monkeypatch.setattr(node_provider, "list_ec2_instances", list_used_instance_types)
    with moto.mock_aws():
        iam = boto3.client("iam", region_name="us-west-2")
        for profile in ("mrl-embed-head", "mrl-embed-worker"):
            iam.create_instance_profile(InstanceProfileName=profile)
        resolved = _bootstrap_config(copy.deepcopy(config), no_config_cache=True)

    types = resolved["available_node_types"]
    gpu = types["gpu_worker"]["resources"]
    assert gpu["GPU"] == 1 and gpu["accelerator_type:A10G"] == 1  # detected from g5.xlarge
    assert types["head"]["resources"]["CPU"] == 0  # our override survives autodetection
    for name, node_type in types.items():
        node_config = node_type["node_config"]
        assert (
            node_config["IamInstanceProfile"]
            == config["available_node_types"][name]["node_config"]["IamInstanceProfile"]
        )
        assert node_config["SubnetIds"] and node_config["SecurityGroupIds"]


def test_install_script_and_image():
    bash = shutil.which("bash")
    if bash:
        subprocess.run([bash, "-n", str(INFRA / "install-project.sh")], check=True)
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", dockerfile, re.M)
    assert f"WORKDIR {PROJECT_HOME}" in dockerfile
    assert re.search(r"^ARG EXTRAS=gpu,", dockerfile, re.M)
    assert f'RUN bash infra/install-project.sh {PROJECT_HOME} "${{EXTRAS}}"' in dockerfile
    ignored = set((INFRA / "Dockerfile.dockerignore").read_text().split())
    assert {".git", ".venv", ".env", ".aws"} <= ignored


def test_ray_versions_agree():
    image = _dockerfile_ray_image()
    version = _ray_version_of(image)
    for name in LAUNCHER_CONFIGS:
        assert _load(INFRA / name)["docker"]["image"] == image
    specs = [doc["spec"] for _, doc in _of_kind("RayCluster")]
    specs += [doc["spec"]["rayClusterSpec"] for _, doc in _of_kind("RayJob")]
    assert specs and all(spec["rayVersion"] == version for spec in specs)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        return
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_req,) = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    assert ray_req.specifier.contains(version), f"{image} does not satisfy {ray_req}"


_SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\"type\":\s*\"service_account\""),  # GCP key file
]


def test_no_credentials_in_infra():
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        text = path.read_text(errors="replace")
        for pattern in _SECRET_PATTERNS:
            assert not pattern.search(text), f"{path.relative_to(ROOT)} matches {pattern.pattern}"


# --------------------------------------------------------------------------------------
# Kubernetes: core kinds against the Kubernetes schemas


def test_every_manifest_is_a_known_kind_with_a_name():
    seen = set()
    for where, doc in _manifests():
        assert doc.get("apiVersion") and doc.get("kind"), where
        meta = doc.get("metadata", {})
        if ":" in where:  # a template created with `kubectl create`, named at creation
            assert meta.get("generateName"), where
        else:
            assert meta.get("name"), where
        assert doc["kind"] in CORE_KINDS | RAY_KINDS, (
            f"{where}: {doc['kind']} is not validated here"
        )
        seen.add(doc["kind"])
    assert seen == CORE_KINDS | RAY_KINDS


@functools.cache
def _kubernetes_versions() -> tuple[str, ...]:
    kvu = pytest.importorskip("kubernetes_validate.utils")
    return ("1.30.0", kvu.latest_version())


@pytest.mark.parametrize("which", ["oldest", "latest"])
def test_core_kinds_match_kubernetes_schemas(which):
    kvu = pytest.importorskip("kubernetes_validate.utils")
    import jsonschema

    version = _kubernetes_versions()[0 if which == "oldest" else 1]
    checked = set()
    for where, doc in _manifests():
        if doc["kind"] in CORE_KINDS:
            try:
                kvu.validate(doc, version, strict=True)
            except jsonschema.ValidationError as e:
                pytest.fail(
                    f"{where} ({doc['kind']}), Kubernetes {version}: {e.message} at {list(e.path)}",
                    pytrace=False,
                )
            checked.add(doc["kind"])
    assert checked == CORE_KINDS


@functools.cache
def _pod_template_validator():
    """Strict validator for core/v1 PodTemplateSpec (what KubeRay embeds for each group)."""
    kvu = pytest.importorskip("kubernetes_validate.utils")
    import jsonschema
    from referencing import Registry, Resource

    version = _kubernetes_versions()[0]
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kvu.schema_contents(f"{folder}/podtemplatespec-v1.json", version)
    definitions = kvu.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _check_pod_template(template: dict, where: str):
    errors = [
        f"{e.message} at {list(e.absolute_path)}"
        for e in _pod_template_validator().iter_errors(template)
    ]
    assert not errors, f"{where}: {errors[:3]}"
    assert template["spec"]["containers"], where


# --------------------------------------------------------------------------------------
# Kubernetes: KubeRay objects


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert set(spec) <= RAY_CLUSTER_SPEC_FIELDS, f"{where}: {set(spec) - RAY_CLUSTER_SPEC_FIELDS}"
    assert spec["enableInTreeAutoscaling"] is True, where
    assert set(spec["autoscalerOptions"]) <= AUTOSCALER_FIELDS, where
    assert spec["autoscalerOptions"].get("upscalingMode", "Default") in {
        "Default",
        "Aggressive",
        "Conservative",
    }

    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS, where
    assert isinstance(head["rayStartParams"], dict), where
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), (
        f"{where}: rayStartParams values must be strings"
    )
    assert head["rayStartParams"].get("num-cpus") == "0", (
        f"{where}: the head should run no Ray tasks"
    )
    _check_pod_template(head["template"], f"{where} head")

    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups), where
    gpu_groups = []
    for group in groups:
        gwhere = f"{where} group {group['groupName']}"
        assert set(group) <= WORKER_GROUP_FIELDS, gwhere
        assert {
            "groupName",
            "replicas",
            "minReplicas",
            "maxReplicas",
            "rayStartParams",
            "template",
        } <= set(group), gwhere
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], gwhere
        assert group["maxReplicas"] >= 1 and group["minReplicas"] == 0, (
            f"{gwhere}: should scale from zero"
        )
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), gwhere
        _check_pod_template(group["template"], gwhere)
        limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        if "nvidia.com/gpu" in limits:
            assert int(limits["nvidia.com/gpu"]) >= 1, gwhere
            gpu_groups.append(group)
    assert len(gpu_groups) == 1, f"{where}: expected one GPU worker group"

    images = {
        c["image"]
        for t in [head["template"]] + [g["template"] for g in groups]
        for c in t["spec"]["containers"]
    }
    assert len(images) == 1 and not next(iter(images)).endswith(":latest"), f"{where}: {images}"


def test_raycluster():
    ((where, cluster),) = _of_kind("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(cluster["spec"], where)


def test_rayjobs():
    jobs = _of_kind("RayJob")
    assert {where.split(":")[0] for where, _ in jobs} == {
        "rayjob-embed.yaml",
        "reindex-cronjob.yaml",
    }
    for where, job in jobs:
        assert job["apiVersion"] == "ray.io/v1", where
        spec = job["spec"]
        assert set(spec) <= RAY_JOB_SPEC_FIELDS, f"{where}: {set(spec) - RAY_JOB_SPEC_FIELDS}"
        assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].startswith("python "), (
            where
        )
        assert spec["shutdownAfterJobFinishes"] is True, where
        if "runtimeEnvYAML" in spec:
            assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict), where
        _check_cluster_spec(spec["rayClusterSpec"], where)


def test_the_three_cluster_specs_are_one():
    ((_, cluster),) = _of_kind("RayCluster")
    for where, job in _of_kind("RayJob"):
        assert job["spec"]["rayClusterSpec"] == cluster["spec"], (
            f"{where} drifted from raycluster.yaml"
        )


def test_ray_pods_run_as_the_project_service_account():
    (account,) = [d for d in _docs(KUBERAY / "serviceaccount.yaml") if d["kind"] == "ServiceAccount"]
    ((_, cluster),) = _of_kind("RayCluster")
    spec = cluster["spec"]
    for template in [spec["headGroupSpec"]["template"]] + [
        g["template"] for g in spec["workerGroupSpecs"]
    ]:
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
        for container in template["spec"]["containers"]:
            assert {"secretRef": {"name": "mrl-embed-object-store", "optional": True}} in container[
                "envFrom"
            ]


# --------------------------------------------------------------------------------------
# Every shipped cluster's GPUs are used with default flags: the sizing (pipelines/layout.py)
# fed each cluster's node types, as its autoscaler sees them, asks for GPU actors.


def _launcher_node_types(name: str):
    from ray.autoscaler._private.util import prepare_config

    from pipelines.layout import node_types_from_config

    prepared = prepare_config(copy.deepcopy(_load(INFRA / name)))
    return node_types_from_config(prepared), prepared["max_workers"]


def _kuberay_node_types(spec: dict):
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    from pipelines.layout import node_types_from_config

    config = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "mrl-embed", "namespace": "default"},
                                                     "spec": spec})
    return node_types_from_config(config), config["max_workers"]


def _shipped_clusters():
    out = [(name, *_launcher_node_types(name)) for name in LAUNCHER_CONFIGS]
    out += [(where, *_kuberay_node_types(doc["spec"])) for where, doc in _of_kind("RayCluster")]
    out += [(where, *_kuberay_node_types(doc["spec"]["rayClusterSpec"])) for where, doc in _of_kind("RayJob")]
    return out


@pytest.mark.parametrize(("where", "node_types", "max_workers"), _shipped_clusters(),
                         ids=[c[0] for c in _shipped_clusters()])
def test_default_sizing_asks_every_shipped_cluster_for_its_gpus(where, node_types, max_workers):
    from pipelines.layout import HEAD_MARKER, capacity, embed_layout, task_gpus, train_layout

    head_up = [{HEAD_MARKER: 1.0, "CPU": 0.0}]  # at start only the head exists
    cap = capacity(node_types, head_up, max_workers)
    gpu_types = [t for t in node_types if t.resources.get("GPU", 0) >= 1 and t.max_workers]
    assert gpu_types, f"{where}: no GPU node type"
    layout = embed_layout(cap)
    assert layout.gpus_per_actor == 1.0, f"{where}: {layout}"
    want = sum(t.resources["GPU"] * t.max_workers for t in gpu_types)
    assert layout.max_actors == layout.initial_actors == want >= 1, f"{where}: {layout}"
    assert task_gpus(cap) >= 1 and train_layout(cap) == (want, True), where


def test_entrypoints_leave_the_device_and_layout_to_the_defaults():
    for where, job in _of_kind("RayJob"):
        entrypoint = job["spec"]["entrypoint"]
        for flag in ("--device", "--gpus-per-actor", "--actors", "--no-gpu", "--no-use-gpu"):
            assert flag not in entrypoint, f"{where}: {flag} overrides the GPU layout"


def test_ray_pods_may_read_their_raycluster():
    """The head's driver reads the RayCluster's worker groups (pipelines/layout.py): the pods'
    ServiceAccount needs get on rayclusters."""
    docs = _docs(KUBERAY / "serviceaccount.yaml")
    kinds = {d["kind"]: d for d in docs}
    role, binding, account = kinds["Role"], kinds["RoleBinding"], kinds["ServiceAccount"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"]} in binding["subjects"]
    assert any("ray.io" in r["apiGroups"] and "rayclusters" in r["resources"] and "get" in r["verbs"]
               for r in role["rules"])


# --------------------------------------------------------------------------------------
# The scheduled re-index

_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
_CRON_NAMES = [
    {},
    {},
    {},
    {
        m: i + 1
        for i, m in enumerate(
            ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
        )
    },
    {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
]


def _valid_cron(schedule: str) -> bool:
    """A standard five-field cron expression, as Kubernetes CronJob accepts it."""
    if schedule.strip().startswith("@"):
        return schedule.strip() in {
            "@yearly",
            "@annually",
            "@monthly",
            "@weekly",
            "@daily",
            "@midnight",
            "@hourly",
        }
    fields = schedule.split()
    if len(fields) != 5:
        return False

    def value(token, names):
        return names.get(token.lower(), None) if not token.isdigit() else int(token)

    for field, (low, high), names in zip(fields, _CRON_RANGES, _CRON_NAMES):
        for part in field.split(","):
            base, _, step = part.partition("/")
            if step and (not step.isdigit() or int(step) == 0):
                return False
            if base in ("*", "?"):
                continue
            first, _, last = base.partition("-")
            bounds = [value(first, names)] + ([value(last, names)] if last else [])
            if any(b is None or not low <= b <= high for b in bounds) or bounds != sorted(bounds):
                return False
    return True


@pytest.mark.parametrize(
    ("schedule", "ok"),
    [
        ("0 3 * * *", True),
        ("*/15 2-4 1,15 jan-mar mon-fri", True),
        ("@daily", True),
        ("0 3 * *", False),
        ("61 * * * *", False),
        ("0 25 * * *", False),
        ("*/0 * * * *", False),
        ("0 3 * * funday", False),
    ],
)
def test_cron_validator(schedule, ok):
    assert _valid_cron(schedule) is ok


def _reindex():
    docs = {doc["kind"]: doc for doc in _docs(KUBERAY / "reindex-cronjob.yaml")}
    assert set(docs) == CORE_KINDS, "one of each kind expected in reindex-cronjob.yaml"
    return docs


def test_reindex_cronjob():
    docs = _reindex()
    cron = docs["CronJob"]["spec"]
    assert _valid_cron(cron["schedule"]), cron["schedule"]
    assert cron["concurrencyPolicy"] == "Forbid", "a re-index must not overlap itself"
    job = cron["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in {"OnFailure", "Never"}
    (container,) = pod["containers"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]

    # The command's script comes from the ConfigMap, mounted where the command looks.
    configmap = docs["ConfigMap"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    script = container["command"][-1]
    (mount,) = [m for m in container["volumeMounts"] if script.startswith(m["mountPath"] + "/")]
    assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert script[len(mount["mountPath"]) + 1 :] in configmap["data"]
    assert "rayjob.yaml" in configmap["data"]

    # The trigger's own deadline outlives the RayJob's, so KubeRay ends a stuck run first.
    rayjob = yaml.safe_load(configmap["data"]["rayjob.yaml"])
    assert job["activeDeadlineSeconds"] > rayjob["spec"]["activeDeadlineSeconds"]
    assert job["backoffLimit"] == 0


def test_reindex_rbac_allows_creating_rayjobs():
    docs = _reindex()
    role, binding = docs["Role"], docs["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {
        "kind": "ServiceAccount",
        "name": docs["ServiceAccount"]["metadata"]["name"],
    } in binding["subjects"]
    allowed = {
        verb
        for rule in role["rules"]
        if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]
        for verb in rule["verbs"]
    }
    # create one, follow it (get), find running ones (list), prune and stop (delete)
    assert {"create", "get", "list", "delete"} <= allowed


_FAKE_KUBECTL = """#!{python}
import json, os, sys
state_path = os.path.join(os.environ["FAKE_KUBECTL_DIR"], "state.json")
args = sys.argv[1:]
with open(state_path) as f:
    st = json.load(f)
st["calls"].append(args)
out = ""
if args[:2] == ["get", "rayjobs"]:
    out = "".join(name + " " + status + "\\n" for name, status in st["jobs"])
elif args[0] == "create":
    assert args[1:3] == ["-f", os.environ["TEMPLATE"]], args
    name = "mrl-reindex-new%d" % len(st["calls"])
    st["jobs"].append([name, ""])
    out = name
elif args[:2] == ["get", "rayjob"]:
    out = st["states"].pop(0) if st["states"] else st["last"]
    st["last"] = out
    for job in st["jobs"]:
        if job[0] == args[2]:
            job[1] = out.split("/")[0]
elif args[:2] == ["delete", "rayjob"]:
    st["jobs"] = [j for j in st["jobs"] if j[0] != args[2]]
    st["deleted"].append(args[2])
else:
    sys.exit("unexpected kubectl call: %r" % (args,))
with open(state_path + ".tmp", "w") as f:
    json.dump(st, f)
os.replace(state_path + ".tmp", state_path)  # atomic: the test reads it while we run
sys.stdout.write(out)
"""


class _FakeCluster:
    """Runs trigger.sh from the ConfigMap with a fake kubectl first on PATH."""

    def __init__(self, tmp_path: Path, jobs, states):
        self.dir = tmp_path
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        kubectl = bin_dir / "kubectl"
        kubectl.write_text(_FAKE_KUBECTL.replace("{python}", sys.executable))
        kubectl.chmod(0o755)
        configmap = _reindex()["ConfigMap"]["data"]
        self.script = tmp_path / "trigger.sh"
        self.script.write_text(configmap["trigger.sh"])
        template = tmp_path / "rayjob.yaml"
        template.write_text(configmap["rayjob.yaml"])
        (tmp_path / "state.json").write_text(
            json.dumps({"jobs": jobs, "states": states, "last": "", "calls": [], "deleted": []})
        )
        self.env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "FAKE_KUBECTL_DIR": str(tmp_path),
            "TEMPLATE": str(template),
            "POLL_SECONDS": "0",
            "KEEP": "3",
        }

    def start(self, **overrides) -> subprocess.Popen:
        env = dict(self.env, **overrides)
        return subprocess.Popen(
            ["/bin/sh", str(self.script)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self) -> tuple[int, str]:
        proc = self.start()
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, out

    @property
    def state(self) -> dict:
        return json.loads((self.dir / "state.json").read_text())

    def created(self) -> list:
        return [c for c in self.state["calls"] if c[0] == "create"]


needs_sh = pytest.mark.skipif(
    not Path("/bin/sh").exists() or not shutil.which("awk"), reason="needs /bin/sh and awk"
)


@needs_sh
def test_trigger_runs_one_reindex_to_success_and_prunes(tmp_path):
    old = [[f"mrl-reindex-old{i}", "Complete" if i % 2 else "Failed"] for i in range(4)]
    fake = _FakeCluster(
        tmp_path, old, ["", "Initializing/", "Running/RUNNING", "Complete/SUCCEEDED"]
    )
    code, out = fake.run()
    assert code == 0, out
    assert len(fake.created()) == 1
    # KEEP=3 finished RayJobs remain: the new one and the two newest old ones.
    names = [name for name, _ in fake.state["jobs"]]
    assert names == ["mrl-reindex-old2", "mrl-reindex-old3", fake.state["jobs"][-1][0]]
    assert fake.state["deleted"] == ["mrl-reindex-old0", "mrl-reindex-old1"]


@needs_sh
@pytest.mark.parametrize(
    "final", ["Complete/FAILED", "Complete/STOPPED", "Failed/", "Failed/FAILED"]
)
def test_trigger_reports_a_failed_reindex(tmp_path, final):
    fake = _FakeCluster(tmp_path, [], ["Running/RUNNING", final])
    code, out = fake.run()
    assert code == 1, out
    assert len(fake.created()) == 1


@needs_sh
@pytest.mark.parametrize("status", ["Running", "Initializing", "Retrying", ""])
def test_trigger_skips_while_a_reindex_still_runs(tmp_path, status):
    fake = _FakeCluster(
        tmp_path, [["mrl-reindex-old", "Complete"], ["mrl-reindex-busy", status]], []
    )
    code, out = fake.run()
    assert code == 0, out
    assert "skipping" in out
    assert fake.created() == []


@needs_sh
def test_trigger_stops_its_rayjob_when_stopped(tmp_path):
    fake = _FakeCluster(tmp_path, [], [])
    proc = fake.start(POLL_SECONDS="0.2")
    try:
        deadline = time.monotonic() + 30
        while not any(c[:2] == ["get", "rayjob"] for c in fake.state["calls"]):
            assert time.monotonic() < deadline and proc.poll() is None, (
                proc.stdout.read() if proc.poll() is not None else "timeout"
            )
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    assert len(fake.created()) == 1
    assert fake.state["jobs"] == []  # the one RayJob it created was deleted
    assert len(fake.state["deleted"]) == 1


# --------------------------------------------------------------------------------------
# The pipelines the configs call


def _pipeline_calls() -> dict[str, set[str]]:
    """pipelines/<name>.py -> the --flags passed to it anywhere in infra/."""
    lines = []
    for path in INFRA.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".md", ".sh", ""}:
            lines += path.read_text().splitlines()
    lines += [doc["spec"]["entrypoint"] for _, doc in _of_kind("RayJob")]  # folded YAML
    calls: dict[str, set[str]] = {}
    for line in lines:
        for match in re.finditer(r"pipelines/(\w+)\.py\b([^|;&`]*)", line):
            flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", match.group(2)))
            calls.setdefault(match.group(1), set()).update(flags)
    return calls


_CALLS = _pipeline_calls()
_MISSING = sorted(name for name in _CALLS if not (ROOT / "pipelines" / f"{name}.py").exists())


def test_pipeline_calls_were_found():
    assert {"embed", "index", "reindex", "query"} <= set(_CALLS)
    assert {"--input", "--output"} <= _CALLS["embed"]
    assert {"--input", "--dataset"} <= _CALLS["reindex"]


@pytest.mark.xfail(bool(_MISSING), reason=f"pipelines not written yet: {_MISSING}", strict=False)
def test_called_pipelines_exist_and_define_their_flags():
    for name, flags in sorted(_CALLS.items()):
        script = ROOT / "pipelines" / f"{name}.py"
        assert script.exists(), f"infra calls {script.relative_to(ROOT)}, which does not exist"
        source = script.read_text()
        for flag in sorted(flags):
            assert f'"{flag}"' in source or f"'{flag}'" in source, (
                f"{script.relative_to(ROOT)} defines no {flag}"
            )
