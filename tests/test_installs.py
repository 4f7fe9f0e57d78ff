"""What installs: FAISS from exactly one extra (faiss-cpu and faiss-gpu install the same module
over each other), the GPU extra's FAISS and torch built for the same CUDA, an extra per object
store, and Lance's storage option names mapped for each store's fsspec filesystem."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from mrl_core.objectstore import fsspec_options

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is Python >= 3.11")
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name for r in requirements}


def test_faiss_comes_from_exactly_one_extra():
    project = _project()
    extras = project["optional-dependencies"]
    assert not _names(project["dependencies"]) & {"faiss-cpu", "faiss-gpu"}, "FAISS in the base dependencies"
    assert "faiss-cpu" in _names(extras["cpu"]) and "faiss-gpu" not in _names(extras["cpu"])
    assert "faiss-gpu" in _names(extras["gpu"]) and "faiss-cpu" not in _names(extras["gpu"])
    for name, requirements in extras.items():
        assert not {"faiss-cpu", "faiss-gpu"} <= _names(requirements), f"extra {name} installs both"
    # the test extra brings the CPU build (README's second command: pip install -e '.[test]')
    assert any(Requirement(r).name == "mrl-embed" and "cpu" in Requirement(r).extras for r in extras["test"])


def test_the_gpu_extra_pairs_faiss_and_torch_built_for_cuda_12():
    """faiss-gpu 1.15.1 is a CUDA 12 build; torch from PyPI is built for CUDA 12.8 up to 2.10 and
    for CUDA 13 from 2.11: the extra keeps both on one CUDA 12 runtime (driver >= 570)."""
    gpu = {Requirement(r).name: Requirement(r) for r in _project()["optional-dependencies"]["gpu"]}
    assert str(gpu["faiss-gpu"].specifier) == "==1.15.1"
    assert gpu["torch"].specifier.contains("2.10.0") and not gpu["torch"].specifier.contains("2.11.0")
    readme = (ROOT / "infra" / "README.md").read_text()
    assert "faiss-gpu 1.15.1" in readme and "torch 2.10" in readme and ">= 570" in readme


def test_an_extra_per_advertised_object_store():
    extras = _project()["optional-dependencies"]
    assert {"s3fs"} <= _names(extras["s3"]) and {"gcsfs"} <= _names(extras["gcs"])
    assert {"adlfs"} <= _names(extras["azure"])


def _accepts(cls_path: str, kwargs: dict) -> None:
    """The filesystem class (when installed) takes every mapped keyword."""
    module, _, name = cls_path.rpartition(".")
    cls = getattr(pytest.importorskip(module), name)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        assert set(kwargs) <= set(params), set(kwargs) - set(params)


def test_gcs_options_map_to_gcsfs():
    lance_style = {"google_service_account": "/keys/sa.json", "google_bucket": "b", "timeout": "30s",
                   "allow_http": "true", "project": "p"}
    assert fsspec_options("gs://b/x", lance_style) == {"token": "/keys/sa.json", "requests_timeout": 30.0,
                                                       "project": "p"}
    assert fsspec_options("gs://b/x", {"service_account_key": '{"type": "x"}'}) == {"token": {"type": "x"}}
    assert fsspec_options("gs://b/x", {"google_skip_signature": "true"}) == {"token": "anon"}
    assert fsspec_options("gs://b/x", {"token": "google_default"}) == {"token": "google_default"}  # gcsfs's own


def test_azure_options_map_to_adlfs():
    lance_style = {"azure_storage_account_name": "acct", "azure_storage_account_key": "k", "timeout": "1m",
                   "connect_timeout": "5s", "allow_http": "false"}
    assert fsspec_options("az://c/x", lance_style) == {"account_name": "acct", "account_key": "k",
                                                       "read_timeout": 60.0, "connection_timeout": 5.0}
    principal = {"azure_client_id": "id", "azure_client_secret": "s", "azure_tenant_id": "t", "account_name": "a"}
    assert fsspec_options("abfs://c/x", principal) == {"client_id": "id", "client_secret": "s", "tenant_id": "t",
                                                       "account_name": "a"}
    assert fsspec_options("az://c/x", {"sas_token": "sv=1", "azure_storage_endpoint": "https://a.blob.example"}) == {
        "sas_token": "sv=1", "account_host": "a.blob.example"}
    azurite = fsspec_options("az://c/x", {"account_name": "dev", "account_key": "k",
                                          "azure_storage_endpoint": "http://127.0.0.1:10000/dev"})
    assert azurite == {"account_name": "dev", "connection_string": "DefaultEndpointsProtocol=http;AccountName=dev;"
                       "AccountKey=k;BlobEndpoint=http://127.0.0.1:10000/dev;"}
    assert fsspec_options("az://c/x", {"azure_skip_signature": "true"}) == {"anon": True}


@pytest.mark.parametrize(("url", "cls"), [("gs://b/x", "gcsfs.GCSFileSystem"),
                                          ("az://c/x", "adlfs.AzureBlobFileSystem")])
def test_mapped_options_are_arguments_of_the_installed_filesystem(url, cls):
    lance_style = {"google_service_account": "/k.json", "timeout": "30s", "azure_storage_account_name": "a",
                   "azure_storage_account_key": "k", "azure_client_id": "i", "azure_client_secret": "s",
                   "azure_tenant_id": "t", "connect_timeout": "5s", "azure_storage_sas_token": "sv"}
    _accepts(cls, fsspec_options(url, lance_style))


def test_other_protocols_pass_options_through():
    assert fsspec_options("memory://x", {"a": 1}) == {"a": 1}
    assert fsspec_options("/local/path", {"allow_http": "true"}) == {"allow_http": "true"}
