"""Shared fixtures: a real S3 endpoint (moto's server), a real-text corpus of nested embeddings,
tiny static encoders, and one torch thread for modules of small ops."""

from __future__ import annotations

import ast
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free 127.0.0.1 port, for the session.

    Yields ``{"endpoint_url": URL, "storage_options": {...}}``: Lance-style storage options (also
    accepted by ``mrl_core.objectstore`` for fsspec/s3fs). Make buckets with ``make_bucket``.
    """
    pytest.importorskip("moto.server")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        yield {
            "endpoint_url": url,
            "storage_options": {
                "aws_endpoint": url,
                "allow_http": "true",
                "aws_region": "us-east-1",
                "aws_access_key_id": "testing",
                "aws_secret_access_key": "testing",
            },
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def make_bucket(s3_endpoint):
    """A function that creates a fresh bucket on the moto endpoint and returns ``s3://<name>``."""
    import boto3

    client = boto3.client(
        "s3", endpoint_url=s3_endpoint["endpoint_url"], region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )

    def make(prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    return make


def docstring_lines(limit: int, min_chars: int = 30, max_chars: int = 400) -> list[str]:
    """Distinct docstring lines of the installed packages, read with ``ast`` (never imported)."""
    root = Path(sysconfig.get_paths()["purelib"])
    seen: set[str] = set()
    out: list[str] = []
    for package in sorted(p for p in root.iterdir()
                          if p.is_dir() and not p.name.endswith((".dist-info", "__pycache__"))):
        for file in sorted(package.rglob("*.py")):
            try:
                tree = ast.parse(file.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node, clean=True)
                for line in (doc or "").splitlines():
                    text = " ".join(line.split())
                    if min_chars <= len(text) <= max_chars and text not in seen:
                        seen.add(text)
                        out.append(text)
            if len(out) >= limit:
                return out
    return out


@pytest.fixture(scope="session")
def text_corpus():
    """50,000 corpus texts and 1,000 held-out query texts with their WordLlama embeddings.

    Returns a dict: texts, embeddings (float32 [50000, 256]), query_texts, query_embeddings.
    """
    from mrl_core.encoders import get_encoder

    rows, queries = 50_000, 1_000
    texts = docstring_lines(rows + queries)[: rows + queries]
    if len(texts) < rows + queries:
        pytest.skip(f"only {len(texts)} docstring lines in site-packages; need {rows + queries}")
    order = np.random.default_rng(0).permutation(len(texts))
    texts = [texts[i] for i in order]
    encoder = get_encoder("wordllama-256")
    emb = encoder.encode(texts)
    return {
        "texts": texts[:rows],
        "embeddings": emb[:rows],
        "query_texts": texts[rows:],
        "query_embeddings": emb[rows:],
        "encoder": encoder,
    }


def write_corpus(
    uri: str,
    embeddings: np.ndarray,
    texts: list[str] | None = None,
    dims: tuple[int, ...] = (16, 32, 64, 128, 256),
    encoder: str = "wordllama-256",
    fingerprint: str = "test-fingerprint",
    storage_options: dict | None = None,
    rows_per_file: int = 16_384,
    shard: str = "shard-0",
    mode: str = "create",
    key: int = 1,
):
    """Write a Lance dataset exactly as the embed pipeline does (ids, shard, text, emb_<d>, mrl.info)."""
    import lance

    from mrl_core.settings import EmbedSettings
    from mrl_core.storage import INFO_KEY, DatasetInfo, derive_ids, embedding_arrays, make_schema

    n = len(embeddings)
    schema = make_schema(dims, "float16", [pa.field("text", pa.string())])
    columns = {
        "id": pa.array(derive_ids(key, np.arange(n)), pa.int64()),
        "shard": pa.array([shard] * n),
        "text": pa.array(texts if texts is not None else [f"row {i}" for i in range(n)]),
        **embedding_arrays(embeddings, dims),
    }
    ds = lance.write_dataset(
        pa.table(columns, schema=schema), uri, mode=mode, max_rows_per_file=rows_per_file,
        storage_options=storage_options,
    )
    if mode == "create":
        trained = tuple(d for d in (64, 128, 256) if d in dims)
        settings = EmbedSettings(encoder=encoder, dims=dims, keep=("text",))
        info = DatasetInfo(settings, fingerprint, max(dims), trained, kept_types={"text": "string"})
        ds.update_config({INFO_KEY: info.to_json()})
    return lance.dataset(uri, storage_options=storage_options)


@pytest.fixture(scope="session")
def text_dataset(text_corpus, tmp_path_factory):
    """The 50k-row corpus as a Lance dataset (local path), with the real encoder's fingerprint."""
    uri = str(tmp_path_factory.mktemp("corpus") / "docstrings.lance")
    write_corpus(
        uri, text_corpus["embeddings"], text_corpus["texts"],
        fingerprint=text_corpus["encoder"].fingerprint,
    )
    return uri


@pytest.fixture(scope="session")
def corpus_writer():
    """``write_corpus`` as a fixture: write a Lance dataset as the embed pipeline does."""
    return write_corpus


@pytest.fixture(scope="module")
def one_thread():
    """Small ops run far faster on one thread than on several contending for busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _make_static_dir(path: Path, dim: int = 16, vocab: int = 60, seed: int = 0) -> Path:
    """A model2vec-style directory: word-level tokenizer over w0..w{vocab-1} and a random table."""
    words = {f"w{i}": i for i in range(vocab)}
    words["[UNK]"] = vocab
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    table = np.random.default_rng(seed).standard_normal((vocab + 1, dim)).astype(np.float32)
    save_file({"embeddings": table}, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="session")
def make_static_dir():
    """Builds a tiny ``static:`` encoder directory: ``make_static_dir(path, dim=16, vocab=60, seed=0)``."""
    return _make_static_dir
