"""The index and query CLIs, run as a user runs them: ``python pipelines/<name>.py ...``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / script), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )


@pytest.mark.parametrize("script", ["index.py", "query.py"])
def test_help_documents_every_option(script):
    out = run(script, "--help")
    assert out.returncode == 0, out.stderr
    for option in ("--dataset", "--index-uri", "--storage-option"):
        assert option in out.stdout
    if script == "index.py":
        for option in ("--factory", "--funnel", "--target-recall", "--calibration-queries",
                       "--no-ray", "--gpu", "--keep"):
            assert option in out.stdout
    else:
        for option in ("--k", "--funnel", "--exact", "--columns", "--allow-stale-index", "--format"):
            assert option in out.stdout


def test_index_then_query_by_text(tmp_path, text_corpus, corpus_writer):
    uri = str(tmp_path / "docs.lance")
    corpus_writer(uri, text_corpus["embeddings"][:3000], text_corpus["texts"][:3000],
                  fingerprint=text_corpus["encoder"].fingerprint)
    built = run("index.py", "--dataset", uri, "--calibration-queries", "200", "--keep", "2")
    assert built.returncode == 0, built.stderr
    assert "of memory" in built.stderr and "index v000001" in built.stdout and "recall@10" in built.stdout

    query = text_corpus["texts"][7]
    out = run("query.py", query, "--dataset", uri, "--k", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split() == ["query", "rank", "id", "score", "text"]
    assert len(lines) == 2 + 3
    assert query[:40] in out.stdout  # the row itself is its own best match

    exact = run("query.py", query, "other text", "--dataset", uri, "--k", "2", "--exact", "--format", "csv",
                "--columns", "text,shard")
    assert exact.returncode == 0, exact.stderr
    assert exact.stdout.splitlines()[0] == "query,rank,id,score,text,shard"
    assert len(exact.stdout.splitlines()) == 1 + 4


def test_cli_errors_are_one_line(tmp_path):
    out = run("query.py", "x", "--dataset", str(tmp_path / "missing.lance"))
    assert out.returncode == 1 and out.stderr.startswith("error:")
    out = run("index.py", "--dataset", str(tmp_path / "missing.lance"))
    assert out.returncode == 1 and out.stderr.startswith("error:")
    out = run("index.py", "--dataset", "x", "--funnel", "64:abc")
    assert out.returncode != 0 and "funnel schedule" in out.stderr
