"""The default static encoder: WordLlama's table read from the installed package."""

import json
import logging
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer
from wordllama.inference import WordLlamaInference

from mrl_core.encoders import get_encoder
from mrl_core.encoders.base import budget_batches
from mrl_core.nesting import l2_normalize

TEXTS = [
    "hello world",
    "A fast library for approximate nearest neighbour search",
    "Matryoshka representation learning nests coarse-to-fine information",
    "ünïcødé 😀 text with emoji and accents",
    "x" * 300,
    "  leading and trailing spaces  ",
]


@pytest.fixture(scope="module")
def encoder():
    return get_encoder("wordllama-256", device="cpu")


def _wordllama_reference():
    pkg = resources.files("wordllama")
    table = load_file(str(pkg / "weights" / "l2_supercat_256.safetensors"))["embedding.weight"]
    tok = Tokenizer.from_file(str(pkg / "tokenizers" / "l2_supercat_tokenizer_config.json"))
    return WordLlamaInference(table, tok)


def test_default_encoder_shape_and_protocol(encoder):
    out = encoder.encode(["hello world"])
    assert out.shape == (1, 256) and out.dtype == np.float32
    assert encoder.name == "wordllama-256"
    assert encoder.dim == 256 and encoder.modality == "text"
    assert encoder.nesting.dims == (64, 128, 256)
    assert len(encoder.fingerprint) == 16


@pytest.mark.parametrize("dim", [64, 128, 256])
def test_agrees_with_wordllamas_own_inference(encoder, dim):
    ours = encoder.encode(TEXTS)[:, :dim]
    theirs = _wordllama_reference().embed(TEXTS)[:, :dim]
    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    assert cos.min() >= 0.999, cos


def test_empty_string_encodes_to_zero_vector(encoder):
    out = encoder.encode(["", "hello"])
    np.testing.assert_array_equal(out[0], 0.0)
    assert np.linalg.norm(out[1]) > 0


def test_token_budget_batching_matches_one_batch_and_keeps_order():
    small = get_encoder("wordllama-256", device="cpu", batch_tokens=7)
    big = get_encoder("wordllama-256", device="cpu")
    np.testing.assert_allclose(small.encode(TEXTS), big.encode(TEXTS), rtol=1e-5, atol=1e-6)


def test_budget_batches_respects_budget_and_covers_every_row():
    costs = [5, 1, 9, 3, 3, 20, 2]
    for padded in (False, True):
        batches = list(budget_batches(costs, budget=10, sort=True, padded=padded))
        seen = np.sort(np.concatenate(batches))
        np.testing.assert_array_equal(seen, np.arange(len(costs)))
        for b in batches:
            c = [costs[i] for i in b]
            cost = len(c) * max(c) if padded else sum(c)
            assert cost <= 10 or len(b) == 1


def test_fingerprint_is_stable_and_depends_on_weights(tmp_path):
    a = get_encoder("wordllama-256", device="cpu")
    b = get_encoder("wordllama-256", device="cpu")
    assert a.fingerprint == b.fingerprint
    assert get_encoder("wordllama-128", device="cpu").fingerprint != a.fingerprint


def _write_static_dir(path, table, nesting=None):
    pkg = resources.files("wordllama")
    path.mkdir()
    save_file({"embeddings": np.ascontiguousarray(table)}, str(path / "model.safetensors"))
    (path / "tokenizer.json").write_text(
        (pkg / "tokenizers" / "l2_supercat_tokenizer_config.json").read_text()
    )
    if nesting:
        (path / "config.json").write_text(json.dumps({"nesting_dims": nesting}))


def test_model2vec_style_directory_loads_the_same_way(tmp_path, encoder):
    pkg = resources.files("wordllama")
    table = load_file(str(pkg / "weights" / "l2_supercat_256.safetensors"))["embedding.weight"]
    _write_static_dir(tmp_path / "m", table[:, :128], nesting=[32, 64])
    enc = get_encoder(f"static:{tmp_path / 'm'}", device="cpu")
    assert enc.dim == 128 and enc.nesting.dims == (32, 64, 128)
    np.testing.assert_allclose(enc.encode(TEXTS), encoder.encode(TEXTS)[:, :128], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("no-such-encoder", ValueError, "unknown encoder spec 'no-such-encoder'"),
        ("bogus:/x", ValueError, "unknown encoder spec"),
        ("static:/definitely/missing", FileNotFoundError, "/definitely/missing"),
    ],
)
def test_bad_specs_are_named(spec, error, message):
    with pytest.raises(error, match=message):
        get_encoder(spec)


def test_corrupt_table_is_named(tmp_path):
    d = tmp_path / "m"
    _write_static_dir(d, np.zeros((4, 8), dtype=np.float32))
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        get_encoder(f"static:{d}")


def test_nesting_dim_above_model_dim_is_named():
    with pytest.raises(ValueError, match="exceed the model's embedding dim 256"):
        get_encoder("wordllama-256", nesting=[64, 512])


@pytest.mark.parametrize(
    "inputs, error, message",
    [
        ([], ValueError, "empty input list"),
        (["ok", None], TypeError, "input 1 is None"),
        (["ok", 3], TypeError, "input 1 is int"),
    ],
)
def test_bad_inputs_are_named(encoder, inputs, error, message):
    with pytest.raises(error, match=message):
        encoder.encode(inputs)


def test_a_single_string_is_one_row(encoder):
    one = encoder.encode("hello world")
    assert one.shape == (1, 256)
    np.testing.assert_array_equal(one, encoder.encode(["hello world"]))
    with pytest.raises(TypeError, match="not a single str"):  # the CPU half that pipelines ship takes lists
        encoder.preprocess("hello world")


def test_dim_gives_the_normalised_prefix(encoder):
    full = encoder.encode(TEXTS)
    for dim in (*encoder.nesting.dims, 100):  # any prefix, not only the trained ones
        got = encoder.encode(TEXTS, dim=dim)
        assert got.shape == (len(TEXTS), dim)
        np.testing.assert_allclose(got, l2_normalize(full[:, :dim]), rtol=1e-6, atol=1e-7)
    for bad in (0, 257, -1, True, 64.0):
        with pytest.raises(ValueError, match=rf"dim={bad!r}.*1\.\.256"):
            encoder.encode(TEXTS, dim=bad)


def test_the_default_encoder_leaves_the_callers_logging_alone():
    """wordllama's __init__ runs logging.basicConfig(level=INFO); the encoder reads its files only,
    so a notebook or script using the default encoder does not start printing every INFO record."""
    code = (
        "import logging, sys\n"
        "from mrl_core.encoders import get_encoder\n"
        "get_encoder('wordllama-256').encode(['x'])\n"
        "root = logging.getLogger()\n"
        "print(root.level, len(root.handlers), 'wordllama' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(logging.WARNING), "0", "False"], out.stdout + out.stderr
