"""HFEncoder on a tiny BERT built in the test: pooling, prefixes, batching, fingerprints, errors."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from mrl_core.encoders import Encoder, get_encoder  # noqa: E402
from mrl_core.encoders.hf import HFEncoder, load_hf  # noqa: E402

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is a matryoshka doll and why does it nest",
    "nested embeddings make retrieval cheap at web scale",
    "search query: search document: prefixes for asymmetric models",
]
# deliberately not in length order, so sorting and un-sorting is exercised
TEXTS = ["a lazy dog", "the quick brown fox jumps over the lazy dog again and again", "fox", "doll nest"]


def _build_checkpoint(directory: Path, seed: int = 0) -> Path:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS * 3, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    transformers.BertTokenizerFast(tokenizer_object=tok, model_max_length=64).save_pretrained(directory)
    config = transformers.BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    transformers.BertModel(config).save_pretrained(directory)
    return directory


def _load(path: Path, **kwargs) -> HFEncoder:
    """The encoder pinned to the CPU, so results are float32 wherever the tests run."""
    return load_hf(path, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_checkpoint(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def reference(ckpt: Path):
    """The same model and tokenizer, loaded straight through transformers."""
    model = transformers.AutoModel.from_pretrained(ckpt, local_files_only=True, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    return model.eval(), tokenizer


def _hidden(reference, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    model, tokenizer = reference
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return hidden, batch["attention_mask"]


def _mean_ref(reference, texts: list[str]) -> np.ndarray:
    hidden, mask = _hidden(reference, texts)
    m = mask.unsqueeze(-1).float()
    return ((hidden * m).sum(1) / m.sum(1)).numpy()


def test_shape_dtype_and_protocol(ckpt: Path) -> None:
    enc = get_encoder(f"hf:{ckpt}", device="cpu")
    out = enc.encode(TEXTS)
    assert isinstance(enc, Encoder)
    assert out.shape == (len(TEXTS), 32) and out.dtype == np.float32
    assert enc.name == f"hf:{ckpt.resolve()}" and enc.modality == "text" and enc.dim == 32
    assert enc.nesting.dims == (8, 16, 32)
    assert np.isfinite(out).all() and not np.allclose(out[0], out[1])


def test_mean_pooling_matches_masked_mean(ckpt: Path, reference) -> None:
    out = _load(ckpt, batch_tokens=1 << 20).encode(TEXTS)
    np.testing.assert_allclose(out, _mean_ref(reference, TEXTS), atol=1e-5)
    # each row also equals the text embedded alone (no padding at all)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(out[i], _mean_ref(reference, [text])[0], atol=1e-5)


def test_cls_pooling_is_first_token(ckpt: Path, reference) -> None:
    out = _load(ckpt, pooling="cls").encode(TEXTS)
    hidden, _ = _hidden(reference, TEXTS)
    np.testing.assert_allclose(out, hidden[:, 0].numpy(), atol=1e-5)
    assert not np.allclose(out, _mean_ref(reference, TEXTS), atol=1e-3)


def test_prefixes_documents_and_queries(ckpt: Path) -> None:
    plain = _load(ckpt)
    enc = _load(ckpt, query_prefix="search query: ", document_prefix="search document: ")
    docs, queries = enc.encode(TEXTS), enc.encode_queries(TEXTS)
    np.testing.assert_allclose(docs, plain.encode([f"search document: {t}" for t in TEXTS]), atol=1e-5)
    np.testing.assert_allclose(queries, plain.encode([f"search query: {t}" for t in TEXTS]), atol=1e-5)
    assert not np.allclose(docs, queries, atol=1e-3)
    assert not np.allclose(docs, plain.encode(TEXTS), atol=1e-3)
    assert len({plain.fingerprint, enc.fingerprint}) == 2


def test_token_budget_batching_keeps_order(ckpt: Path) -> None:
    texts = TEXTS * 3
    big, tiny = _load(ckpt, batch_tokens=1 << 20), _load(ckpt, batch_tokens=1)
    calls = []
    tiny.model.register_forward_hook(lambda module, args, output: calls.append(1))
    big_out, tiny_out = big.encode(texts), tiny.encode(texts)
    assert len(calls) == len(texts)  # a budget below one row: one row per forward pass
    np.testing.assert_allclose(tiny_out, big_out, atol=1e-5)
    np.testing.assert_allclose(tiny_out[: len(TEXTS)], tiny_out[len(TEXTS) : 2 * len(TEXTS)], atol=1e-6)


def test_truncation_to_max_length(ckpt: Path, reference) -> None:
    enc = _load(ckpt, max_length=4)
    assert enc.preprocess([TEXTS[1], "fox"])["lengths"].tolist() == [4, 3]
    assert _load(ckpt, max_length=10_000).max_length == 64  # capped by the tokenizer's limit
    _, tokenizer = reference
    ids = tokenizer([TEXTS[1]], truncation=True, max_length=4)["input_ids"]
    np.testing.assert_array_equal(enc.preprocess([TEXTS[1]])["ids"], ids[0])
    # the CPU half travels to Ray tasks on its own, without the model
    shipped = pickle.loads(pickle.dumps(enc.preprocessor))
    np.testing.assert_array_equal(shipped(TEXTS)["ids"], enc.preprocess(TEXTS)["ids"])


def test_empty_string_and_zero_token_rows(ckpt: Path, reference) -> None:
    enc = _load(ckpt)
    out = enc.encode(["", "fox"])
    # BERT adds [CLS] [SEP], so an empty string is those two tokens through the model
    np.testing.assert_allclose(out[0], _mean_ref(reference, [""])[0], atol=1e-5)
    # a row with no tokens at all encodes to zeros and does not disturb its neighbours
    fox = enc.preprocess(["fox"])
    features = {"ids": fox["ids"], "lengths": np.array([0, len(fox["ids"]), 0])}
    rows = enc.embed_features(features)
    assert (rows[0] == 0).all() and (rows[2] == 0).all()
    np.testing.assert_allclose(rows[1], out[1], atol=1e-6)
    assert (enc.embed_features({"ids": np.zeros(0, np.int64), "lengths": np.array([0])}) == 0).all()


def test_fingerprint_stable_and_sensitive(ckpt: Path, tmp_path: Path) -> None:
    first = _load(ckpt).fingerprint
    assert _load(ckpt).fingerprint == first
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    assert _load(copy).fingerprint == first  # content, not location
    assert _load(ckpt, pooling="cls").fingerprint != first
    other = _build_checkpoint(tmp_path / "other", seed=1)  # same config and tokenizer, new weights
    assert _load(other).fingerprint != first


def test_pytorch_bin_weights(ckpt: Path, reference, tmp_path: Path) -> None:
    """Older checkpoints ship ``pytorch_model.bin``: same tensors, same fingerprint and output."""
    binary = tmp_path / "bin"
    shutil.copytree(ckpt, binary)
    (binary / "model.safetensors").unlink()
    torch.save(reference[0].state_dict(), binary / "pytorch_model.bin")
    enc = _load(binary)
    assert enc.fingerprint == _load(ckpt).fingerprint
    np.testing.assert_allclose(enc.encode(TEXTS), _mean_ref(reference, TEXTS), atol=1e-5)
    (binary / "pytorch_model.bin").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        _load(binary)


def test_input_errors(ckpt: Path) -> None:
    enc = _load(ckpt)
    with pytest.raises(TypeError, match="input 1 is None"):
        enc.encode(["fox", None])
    with pytest.raises(ValueError, match="empty"):
        enc.encode([])
    with pytest.raises(TypeError, match="input 0 is int"):
        enc.encode_queries([3])
    with pytest.raises(ValueError, match="dim=64"):
        enc.encode(["fox"], dim=64)
    with pytest.raises(ValueError, match="pooling"):
        _load(ckpt, pooling="median")


def test_single_text_and_prefix_dim(ckpt: Path) -> None:
    enc = _load(ckpt, query_prefix="search query: ")
    one = enc.encode("fox")
    assert one.shape == (1, 32)
    np.testing.assert_allclose(one[0], enc.encode(TEXTS)[2], atol=1e-6)
    assert enc.encode_queries("fox").shape == (1, 32)
    for dim in (8, 16, 32):
        got = enc.encode_queries(TEXTS, dim=dim)
        full = enc.encode_queries(TEXTS)[:, :dim]
        np.testing.assert_allclose(got, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-6)


def test_max_lasttoken_and_weighted_mean_pooling(ckpt: Path, reference) -> None:
    hidden, mask = _hidden(reference, TEXTS)
    lengths = mask.sum(1)
    rows = torch.arange(len(TEXTS))
    weights = mask.float() * torch.arange(1, mask.shape[1] + 1)
    expected = {
        "max": hidden.masked_fill(mask[..., None] == 0, -torch.inf).amax(1),
        "lasttoken": hidden[rows, lengths - 1],
        "weightedmean": (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True),
    }
    for mode, want in expected.items():
        np.testing.assert_allclose(_load(ckpt, pooling=mode).encode(TEXTS), want.numpy(), atol=1e-5)


def test_loading_errors(ckpt: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        get_encoder(f"hf:{missing}", device="cpu")
    no_config = tmp_path / "no_config"
    shutil.copytree(ckpt, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        _load(no_config)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(ValueError, match="model.safetensors"):
        _load(corrupt)
    truncated = tmp_path / "truncated"
    shutil.copytree(ckpt, truncated)
    data = (ckpt / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        _load(truncated)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(ckpt, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights"):
        _load(no_weights)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_sdpa_close_to_cpu(ckpt: Path) -> None:
    enc = load_hf(ckpt)  # default device: the GPU, in bfloat16 with SDPA attention
    assert enc.device.type == "cuda" and enc.model.dtype == torch.bfloat16
    assert enc.model.config._attn_implementation == "sdpa"
    gpu, cpu = enc.encode(TEXTS * 10), _load(ckpt).encode(TEXTS * 10)
    assert gpu.dtype == np.float32
    cos = (gpu * cpu).sum(1) / np.linalg.norm(gpu, axis=1) / np.linalg.norm(cpu, axis=1)
    assert cos.min() > 0.99
