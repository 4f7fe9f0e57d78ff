"""``st:`` encoders against sentence-transformers itself, on tiny models built in the test: a BERT
from a config, then Pooling (every mode), Dense and Normalize, with a "query: " prompt."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense, Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from mrl_core.encoders import Encoder, get_encoder
from mrl_core.encoders.st import STEncoder, load_st
from mrl_core.nesting import l2_normalize

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = [
    "the quick brown fox jumps over the lazy dog",
    "what is a matryoshka doll and why does it nest",
    "nested embeddings make retrieval cheap at web scale",
    "query: passage: prompts for asymmetric models",
]
# not in length order (sorting and un-sorting is exercised); the long one is cut at max_seq_length;
# "" is the prompt and special tokens alone
TEXTS = ["a lazy dog", "the quick brown fox jumps over the lazy dog again and again, over and over the dog",
         "fox", "doll nest", ""]
MAX_SEQ_LENGTH = 16
DIM = 24  # Dense: 32 -> 24, so the nesting prefixes are 8, 16, 24


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (l2_normalize(a) * l2_normalize(b)).sum(1)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT with a WordPiece tokenizer trained on ``VOCAB``, saved as a Hugging Face checkpoint."""
    directory = tmp_path_factory.mktemp("bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(VOCAB * 3, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
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
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    return directory


def _st_dir(bert: Path, out: Path, pooling: str | tuple[str, ...] = "mean", include_prompt: bool = True,
            seed: int = 1, prompts: dict[str, str] | None = None) -> Path:
    """A sentence-transformers directory: Transformer + Pooling + Dense(tanh) + Normalize."""
    transformer = Transformer(str(bert), max_seq_length=MAX_SEQ_LENGTH)
    pool = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling, include_prompt=include_prompt)
    torch.manual_seed(seed)
    dense = Dense(pool.get_embedding_dimension(), DIM, activation_function=torch.nn.Tanh())
    model = SentenceTransformer(modules=[transformer, pool, dense, Normalize()], device="cpu",
                                prompts={"query": "query: "} if prompts is None else prompts)
    model.save(str(out))
    return out


def _load(path: Path, **kwargs) -> STEncoder:
    return load_st(path, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def mean_dir(bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _st_dir(bert, tmp_path_factory.mktemp("st") / "mean")


@pytest.mark.parametrize(
    "pooling, include_prompt",
    [("mean", True), ("cls", True), ("max", True), ("lasttoken", True), ("weightedmean", True),
     ("mean_sqrt_len_tokens", True), (("cls", "mean"), True), ("weightedmean", False), ("mean", False)],
)
def test_parity_with_sentence_transformers(bert, tmp_path, pooling, include_prompt) -> None:
    """Documents as ``encode``, queries as ``encode(prompt_name="query")``: cosine >= 0.9999 at the
    full dim and at every nesting prefix (re-normalised), whatever the token budget."""
    path = _st_dir(bert, tmp_path / "st", pooling, include_prompt)
    reference = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    expected = {"docs": reference.encode(TEXTS), "queries": reference.encode(TEXTS, prompt_name="query")}
    assert not np.allclose(expected["docs"], expected["queries"], atol=1e-3)  # the prompt matters
    for batch_tokens in (1 << 14, 1):  # one batch, and one row per forward pass
        enc = _load(path, batch_tokens=batch_tokens)
        assert enc.dim == DIM and enc.nesting.dims == (8, 16, 24) and enc.max_length == MAX_SEQ_LENGTH
        ours = {"docs": enc.encode(TEXTS), "queries": enc.encode_queries(TEXTS)}
        for kind in ours:
            assert ours[kind].shape == (len(TEXTS), DIM) and ours[kind].dtype == np.float32
            for dim in enc.nesting.dims:
                cos = _cosines(ours[kind][:, :dim], expected[kind][:, :dim])
                assert cos.min() >= 0.9999, (kind, dim, cos)
        # dim= gives the same prefixes, normalised, as sentence-transformers' truncate_dim does
        for dim in enc.nesting.dims:
            truncated = reference.encode(TEXTS, prompt_name="query", truncate_dim=dim)
            got = enc.encode_queries(TEXTS, dim=dim)
            np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
            assert _cosines(got, truncated).min() >= 0.9999


def test_directory_in_the_older_layout(mean_dir: Path, tmp_path: Path) -> None:
    """Most published models were saved by older sentence-transformers: ``sentence_transformers.models.*``
    types, one boolean per pooling mode, ``max_seq_length`` in ``sentence_bert_config.json``."""
    old = tmp_path / "old"
    shutil.copytree(mean_dir, old)
    modules = json.loads((old / "modules.json").read_text())
    for entry in modules:
        entry["type"] = "sentence_transformers.models." + entry["type"].rsplit(".", 1)[-1]
    (old / "modules.json").write_text(json.dumps(modules))
    (old / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
    }))
    (old / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": False}))
    enc = _load(old)
    assert enc.pooling == ("cls",) and enc.max_length == 12
    reference = SentenceTransformer(str(old), device="cpu", local_files_only=True)
    assert _cosines(enc.encode(TEXTS), reference.encode(TEXTS)).min() >= 0.9999
    assert _cosines(enc.encode_queries(TEXTS), reference.encode(TEXTS, prompt_name="query")).min() >= 0.9999


def test_protocol_prompts_and_query_document_api(mean_dir: Path) -> None:
    enc = get_encoder(f"st:{mean_dir}", device="cpu")
    assert isinstance(enc, Encoder) and enc.modality == "text"
    assert enc.name == f"st:{mean_dir.resolve()}"
    assert (enc.query_prompt, enc.document_prompt) == ("query: ", "")
    reference = SentenceTransformer(str(mean_dir), device="cpu", local_files_only=True)
    assert _cosines(enc.encode_queries(TEXTS), reference.encode_query(TEXTS)).min() >= 0.9999
    assert _cosines(enc.encode(TEXTS), reference.encode_document(TEXTS)).min() >= 0.9999
    # the query prompt is the text "query: " in front: the same as a document that starts with it
    plain = enc.encode([f"query: {t}" for t in TEXTS])
    np.testing.assert_allclose(enc.encode_queries(TEXTS), plain, atol=1e-6)


def test_document_prompt_and_overrides(bert: Path, tmp_path: Path) -> None:
    path = _st_dir(bert, tmp_path / "st", prompts={"query": "query: ", "passage": "passage: "})
    enc = _load(path)
    assert (enc.query_prompt, enc.document_prompt) == ("query: ", "passage: ")
    reference = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    assert _cosines(enc.encode(TEXTS), reference.encode(TEXTS, prompt_name="passage")).min() >= 0.9999
    bare = _load(path, query_prompt="", document_prompt="")
    assert _cosines(bare.encode_queries(TEXTS), reference.encode(TEXTS)).min() >= 0.9999
    assert len({enc.fingerprint, bare.fingerprint}) == 2


def test_single_text_and_dim(mean_dir: Path) -> None:
    enc = _load(mean_dir)
    one = enc.encode("a lazy dog")
    assert one.shape == (1, DIM)
    np.testing.assert_allclose(one[0], enc.encode(TEXTS)[0], atol=1e-6)
    assert enc.encode_queries("fox", dim=8).shape == (1, 8)
    for bad in (0, DIM + 1, 2.5, "8"):
        with pytest.raises(ValueError, match=f"dim={bad!r}"):
            enc.encode(TEXTS, dim=bad)
    with pytest.raises(TypeError, match="input 1 is None"):
        enc.encode(["fox", None])


def test_preprocessor_travels_without_the_model(mean_dir: Path) -> None:
    enc = _load(mean_dir)
    features = enc.preprocess(TEXTS)
    assert features["lengths"].max() == MAX_SEQ_LENGTH  # truncated to max_seq_length
    shipped = pickle.loads(pickle.dumps(enc.query_preprocessor))
    np.testing.assert_allclose(enc.embed_features(shipped(TEXTS)), enc.encode_queries(TEXTS), atol=1e-6)
    # a row without tokens encodes to zeros and does not disturb its neighbours
    fox = enc.preprocess(["fox"])
    rows = enc.embed_features({"ids": fox["ids"], "lengths": np.array([0, len(fox["ids"])])})
    assert (rows[0] == 0).all()
    np.testing.assert_allclose(rows[1], enc.encode(["fox"])[0], atol=1e-6)


def test_fingerprint_covers_weights_configs_and_prompts(bert: Path, mean_dir: Path, tmp_path: Path) -> None:
    first = _load(mean_dir).fingerprint
    assert _load(mean_dir).fingerprint == first
    copy = tmp_path / "copy"
    shutil.copytree(mean_dir, copy)
    assert _load(copy).fingerprint == first  # the content, not the location
    assert _load(mean_dir, max_length=8).fingerprint != first
    assert _st_dir(bert, tmp_path / "dense", seed=2) and _load(tmp_path / "dense").fingerprint != first
    assert _load(_st_dir(bert, tmp_path / "cls", "cls")).fingerprint != first
    prompts = tmp_path / "prompts"
    shutil.copytree(mean_dir, prompts)
    config = json.loads((prompts / "config_sentence_transformers.json").read_text())
    config["prompts"]["query"] = "search_query: "
    (prompts / "config_sentence_transformers.json").write_text(json.dumps(config))
    assert _load(prompts).query_prompt == "search_query: " and _load(prompts).fingerprint != first
    pool_config = tmp_path / "pool_config"  # a module's own config file
    shutil.copytree(mean_dir, pool_config)
    config = json.loads((pool_config / "1_Pooling" / "config.json").read_text())
    (pool_config / "1_Pooling" / "config.json").write_text(json.dumps({**config, "include_prompt": False}))
    assert _load(pool_config).fingerprint != first


def test_loading_errors(bert: Path, mean_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        get_encoder(f"st:{tmp_path / 'nope'}", device="cpu")
    with pytest.raises(FileNotFoundError, match="modules.json"):
        _load(bert)  # a plain Hugging Face checkpoint: hf:, not st:
    no_pooling = tmp_path / "no_pooling"
    SentenceTransformer(modules=[Transformer(str(bert))], device="cpu").save(str(no_pooling))
    with pytest.raises(ValueError, match="Transformer"):
        _load(no_pooling)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(mean_dir, corrupt)
    (corrupt / "2_Dense" / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(ValueError, match="model.safetensors"):
        _load(corrupt)


def test_corpus_encodes_queries_with_the_query_prompt(mean_dir: Path, tmp_path: Path, corpus_writer) -> None:
    """A dataset embedded by an st: encoder is searched with its query prompt (``encode_queries``)."""
    from mrl_core import Corpus

    enc = _load(mean_dir)
    docs = [f"{a} {b}" for a in ("the lazy dog", "a quick fox", "nested dolls", "web scale") for b in VOCAB]
    uri = str(tmp_path / "docs.lance")
    corpus_writer(uri, enc.encode(docs), docs, dims=(8, 16, 24), encoder=f"st:{mean_dir}",
                  fingerprint=enc.fingerprint)
    corpus = Corpus.open(uri, require_index=False)
    np.testing.assert_allclose(corpus.encode(TEXTS), enc.encode_queries(TEXTS), atol=1e-6)
    assert not np.allclose(corpus.encode(TEXTS), enc.encode(TEXTS), atol=1e-3)  # not the document side
    by_text = corpus.search(TEXTS[:4], k=5, exact=True)
    by_query_vectors = corpus.search(enc.encode_queries(TEXTS[:4]), k=5, exact=True)
    assert by_text["id"].to_pylist() == by_query_vectors["id"].to_pylist()
    np.testing.assert_allclose(by_text["score"].to_numpy(), by_query_vectors["score"].to_numpy(), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_sdpa_close_to_cpu(mean_dir: Path) -> None:
    enc = load_st(mean_dir)  # default device: the GPU, the transformer in bfloat16 with SDPA attention
    assert enc.device.type == "cuda" and enc.transformer.auto_model.dtype == torch.bfloat16
    gpu, cpu = enc.encode_queries(TEXTS * 10), _load(mean_dir).encode_queries(TEXTS * 10)
    assert gpu.dtype == np.float32 and enc.fingerprint == _load(mean_dir).fingerprint
    assert _cosines(gpu, cpu).min() > 0.99
