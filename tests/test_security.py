"""Security: no unpickling of untrusted files, credentials never printed, logged or stored,
outputs only under the URIs given, no path or SQL injection through names or pointers.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_corpus

from mrl_core import objectstore
from mrl_core.index import build_index
from mrl_core.index_store import load_index, read_current, read_manifest
from mrl_core.storage import delete_shards, derive_ids, embedding_arrays, make_schema

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("mrl_core", "pipelines", "benchmarks") for p in (REPO / d).rglob("*.py"))


# ----------------------------------------------------------------------------- deserialisation


def _call_name(node: ast.Call) -> str:
    parts = []
    func = node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        short = name.rsplit(".", 1)[-1]
        module = name.rsplit(".", 1)[0] if "." in name else ""
        unpickler = ("pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve")
        if (module in unpickler and short in ("load", "loads", "open", "Unpickler")) or short == "read_pickle":
            found.append((node.lineno, f"{name}: unpickles"))
        elif name == "torch.load" or name.endswith(".torch.load"):
            weights_only = _keyword(node, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append((node.lineno, "torch.load without weights_only=True"))
        elif name in ("np.load", "numpy.load"):
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append((node.lineno, "np.load with allow_pickle"))
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            loader = _keyword(node, "Loader")
            if name != "yaml.load" or loader is None or "Safe" not in ast.unparse(loader):
                found.append((node.lineno, f"{name} without a SafeLoader"))
        elif name in ("eval", "exec", "compile"):
            found.append((node.lineno, f"{name}()"))
        elif short in ("run", "Popen", "call", "check_call", "check_output") and module == "subprocess":
            shell = _keyword(node, "shell")
            if isinstance(shell, ast.Constant) and shell.value is True:
                found.append((node.lineno, "subprocess with shell=True"))
    return found


def test_no_unsafe_deserialisation_in_the_code():
    """No pickle of files, no ``torch.load`` without ``weights_only=True``, no ``allow_pickle``,
    no unsafe YAML, no eval/exec, no shell=True: over every module of the library, the jobs and
    the benchmarks."""
    assert len(SOURCES) > 20
    problems = []
    for path in SOURCES:
        for line, what in _unsafe_calls(ast.parse(path.read_text(), str(path))):
            problems.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not problems, "\n".join(problems)


def test_the_scanner_catches_what_it_should():
    bad = ast.parse("import torch, pickle, numpy as np\n"
                    "torch.load(f)\ntorch.load(f, weights_only=False)\npickle.loads(b)\n"
                    "np.load(f, allow_pickle=True)\neval('1')\n")
    assert [line for line, _ in _unsafe_calls(bad)] == [2, 3, 4, 5, 6]
    good = ast.parse("torch.load(f, map_location='cpu', weights_only=True)\nnp.load(f)\n")
    assert _unsafe_calls(good) == []


class _Payload:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoints_are_refused_without_running_code(tmp_path):
    """A checkpoint whose pickle would run code is refused by the ResNet and Hugging Face loaders
    (``weights_only=True``), naming the file, and the code never runs."""
    from mrl_core.encoders import get_encoder

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "x": _Payload(str(marker))}, ckpt)
    with pytest.raises(ValueError, match=r"evil\.pt"):
        get_encoder(f"mrl-resnet50:{ckpt}", device="cpu")
    assert not marker.exists()

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, '
                                    '"num_attention_heads": 1, "intermediate_size": 8, "vocab_size": 10}')
    torch.save({"w": _Payload(str(marker))}, hf / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"cannot read weights file .*pytorch_model\.bin"):
        get_encoder(f"hf:{hf}", device="cpu")
    assert not marker.exists()


def test_tampered_index_files_are_refused(tmp_path):
    """A FAISS file that does not match its manifest's checksum is never deserialised, and
    ``CURRENT`` can only name a version directory (no path traversal)."""
    uri = str(tmp_path / "c.lance")
    write_corpus(uri, np.random.default_rng(0).normal(size=(300, 256)).astype(np.float32))
    manifest = build_index(uri, funnel="paper", calibration_queries=10)
    index_uri = uri + ".indexes"
    tier0 = Path(index_uri) / manifest.version / manifest.tier0_file
    tier0.write_bytes(tier0.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(ValueError, match="checksum"):
        load_index(index_uri)
    for bad in ("../../etc/passwd", "v000001/../../x", "/etc/passwd", ""):
        (Path(index_uri) / "CURRENT").write_text(bad + "\n")
        with pytest.raises(ValueError, match="not an index version"):
            read_current(index_uri)


def test_shard_names_cannot_inject_sql(tmp_path):
    """Shard URIs go into Lance filters as quoted literals: a name crafted as SQL deletes only
    its own rows."""
    uri = str(tmp_path / "d.lance")
    names = ["plain.parquet", "it's.parquet", "x' OR '1'='1", "y') OR shard IS NOT NULL OR ('"]
    schema = make_schema((8,), "float16")
    tables = []
    for name in names:
        ids = derive_ids(names.index(name) + 1, np.arange(3))
        tables.append(pa.table({"id": ids, "shard": [name] * 3,
                                **embedding_arrays(np.ones((3, 8), np.float32), (8,))}, schema=schema))
    lance.write_dataset(pa.concat_tables(tables), uri)
    ds = lance.dataset(uri)
    assert delete_shards(ds, [names[2]]) == 3
    assert delete_shards(lance.dataset(uri), [names[3]]) == 3
    assert delete_shards(lance.dataset(uri), [names[1]]) == 3
    left = lance.dataset(uri).to_table(columns=["shard"])["shard"].to_pylist()
    assert left == ["plain.parquet"] * 3


# ----------------------------------------------------------------------------- credentials


def test_redact_hides_secrets_and_userinfo():
    options = {"aws_access_key_id": "AKIAFAKE", "aws_secret_access_key": "s3cr3t", "aws_session_token": "T0kenValue",
               "aws_endpoint": "http://user:pa55@127.0.0.1:9000", "aws_region": "eu-west-1",
               "allow_http": "true", "google_service_account_key": "{json}"}
    shown = objectstore.redact(options)
    text = repr(shown)
    for secret in ("AKIAFAKE", "s3cr3t", "T0kenValue", "pa55", "user:", "{json}"):
        assert secret not in text
    assert shown["aws_region"] == "eu-west-1" and shown["aws_endpoint"] == "http://***@127.0.0.1:9000"


def _files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {n.decode()}" for n in needles if n in data]
    return hits


def test_credentials_never_printed_logged_or_stored(s3_endpoint, make_bucket, tmp_path, capfd, caplog):
    """The embed, index and query CLIs run against S3 with fake credentials passed as storage
    options on the command line, over shards one of which is corrupt (an error raised in a Ray
    worker), then once more with a missing input (an error in the driver). Their
    output and logging (INFO), every log file Ray writes, every object in the bucket (dataset,
    ledger, index, manifest) and every file left in the working directory are scanned: no
    credential appears anywhere. All objects written lie under the dataset URI and its index URI.
    (botocore's own DEBUG logging prints the access key id and session token: see RELIABILITY.md.)"""
    key, secret, token = "AKIAFAKEKEY7Q3X9", "fake-secret-Zq81vBn44Lk", "fake-session-token-Yt62"
    needles = [key.encode(), secret.encode(), token.encode()]
    bucket = make_bucket("secure")
    endpoint = s3_endpoint["endpoint_url"]
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    name = bucket[len("s3://"):]
    for i in range(2):
        local = tmp_path / f"s{i}.parquet"
        pq.write_table(pa.table({"text": [f"secure search record {i}-{j}" for j in range(40)]}), local)
        client.upload_file(str(local), name, f"in/s{i}.parquet")
    client.put_object(Bucket=name, Key="in/z-corrupt.parquet", Body=b"PAR1 not really parquet PAR1")
    inputs = {o["Key"] for o in client.list_objects_v2(Bucket=name)["Contents"]}
    out = f"{bucket}/deep/out.lance"
    options = ["allow_http=true", "aws_region=us-east-1", f"aws_endpoint={endpoint}",
               f"aws_access_key_id={key}", f"aws_secret_access_key={secret}", f"aws_session_token={token}"]
    flags = [a for o in options for a in ("--storage-option", o)]
    work = tmp_path / "cwd"
    work.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths have a limit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=str(ray_tmp))
    outputs = []
    try:  # the embed job as a user runs it: its own process, its own local Ray (logs under ray_tmp)
        for args in (
            # a corrupt shard fails inside a Ray worker: the error path crosses processes and logs
            ["pipelines/embed.py", "--input", f"{bucket}/in/", "--output", out, "--on-error", "skip", *flags],
            ["pipelines/embed.py", "--input", f"{bucket}/missing/", "--output", out, "--no-progress", *flags],
        ):
            proc = subprocess.run([sys.executable, str(REPO / args[0]), *args[1:]], cwd=work, env=env,
                                  capture_output=True, timeout=600)
            outputs.append((proc.returncode, proc.stdout + proc.stderr))
        assert [rc for rc, _ in outputs] == [2, 1], [o.decode()[-1500:] for _, o in outputs]
        assert b"z-corrupt.parquet" in outputs[0][1] and b"does not exist" in outputs[1][1]
        leaked = _files_containing(ray_tmp, needles) + _files_containing(work, needles)
        assert not leaked, leaked
        assert any(ray_tmp.rglob("*.log")), "Ray wrote no logs where expected; the scan saw nothing"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    for _, text in outputs:
        for needle in needles:
            assert needle not in text, "the embed CLI printed a credential"

    # the index and query CLIs, in this process: their output and the library's logging
    from pipelines.index import main as index_main
    from pipelines.query import main as query_main

    capfd.readouterr()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with caplog.at_level("INFO"):
            assert index_main(["--dataset", out, "--funnel", "paper", "--calibration-queries", "20", *flags]) == 0
            assert query_main(["secure search", "--dataset", out, "--k", "3", *flags]) == 0
    finally:
        os.chdir(cwd)
    captured = capfd.readouterr()
    assert "score" in captured.out.lower()
    for needle in needles:
        assert needle.decode() not in captured.out + captured.err + caplog.text

    stored = 0
    for obj in client.list_objects_v2(Bucket=name)["Contents"]:
        data = client.get_object(Bucket=name, Key=obj["Key"])["Body"].read()
        stored += 1
        for needle in needles:
            assert needle not in data, f"{obj['Key']} holds a credential"
        if obj["Key"] not in inputs:
            assert obj["Key"].startswith(("deep/out.lance/", "deep/out.lance.indexes/")), obj["Key"]
    assert stored > len(inputs) + 3
    assert list(work.iterdir()) == [], "a job wrote into its working directory"
    opts = dict(o.split("=", 1) for o in options)
    assert read_manifest(out + ".indexes", storage_options=opts).rows == 80


def test_local_outputs_stay_under_the_output_path(tmp_path):
    """A local run writes only under the dataset path, its index path and its writer lease (and
    the system temp dir, for Ray's session and the index build's scratch file)."""
    import ray

    from pipelines.embed import EmbedConfig, run_embed

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"text": [f"local record {i}" for i in range(50)]}), src / "a.parquet")
    before = {p for p in tmp_path.rglob("*")}
    cwd = os.getcwd()
    os.chdir(src)  # a job must not write into its working directory either
    try:
        out = tmp_path / "results" / "emb.lance"
        run_embed(EmbedConfig(input=str(src), output=str(out), progress=False))
        build_index(str(out), funnel="paper", calibration_queries=10)
    finally:
        os.chdir(cwd)
    new = {p for p in tmp_path.rglob("*")} - before
    allowed = (tmp_path / "results", out, Path(str(out) + ".indexes"), Path(str(out) + ".lease"))
    assert new and all(p in allowed or any(a in p.parents for a in allowed[1:]) for p in new), sorted(new)
