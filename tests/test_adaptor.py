"""The Matryoshka adaptor: its module, its loss, training on a synthetic corpus, and loading
through ``get_encoder`` composed with a (tiny, built-in-the-test) base encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mrl_core.adaptor import (
    MatryoshkaAdaptor,
    load_adaptor,
    mine_neighbours,
    read_adaptor,
    save_adaptor,
)
from mrl_core.encoders import Encoder, get_encoder
from mrl_core.evaluate import prefix_recall, random_rotation
from mrl_core.losses import NeighbourhoodLoss
from mrl_core.nesting import l2_normalize
from mrl_core.training import FitConfig, Runner, embed_with, train_adaptor

QUIET = Runner()
pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_corpus(n: int = 1500, dim: int = 24, seed: int = 0) -> np.ndarray:
    """Clustered embeddings whose variance sits in a few directions, hidden by a random
    rotation so that the raw prefixes carry little of it."""
    rng = np.random.default_rng(seed)
    scales = np.r_[np.full(4, 3.0), np.full(dim - 4, 0.4)]
    centres = rng.standard_normal((40, dim)) * scales
    x = centres[rng.integers(0, 40, n)] + rng.standard_normal((n, dim)) * scales * 0.3
    return l2_normalize((x @ random_rotation(dim, seed=seed + 1)).astype(np.float32))


def test_orthogonal_adaptor_keeps_inner_products():
    ad = MatryoshkaAdaptor(8, [2, 4, 8])
    ad.set_rotation(random_rotation(8, seed=1))
    x = torch.randn(20, 8)
    y = ad(x)
    assert torch.allclose(y @ y.T, x @ x.T, atol=1e-4)
    assert torch.allclose(ad.matrix(), torch.from_numpy(random_rotation(8, seed=1)), atol=1e-5)


def test_adaptor_rejects_bad_config():
    with pytest.raises(ValueError, match="kind"):
        MatryoshkaAdaptor(8, [4, 8], kind="cubic")
    with pytest.raises(ValueError, match="nesting ends"):
        MatryoshkaAdaptor(8, [4, 16])
    with pytest.raises(ValueError, match="rotation must be"):
        MatryoshkaAdaptor(8, [4, 8]).set_rotation(np.eye(4))


@pytest.mark.parametrize("kind", ["orthogonal", "linear", "mlp"])
def test_plain_state_round_trip(kind):
    torch.manual_seed(0)
    ad = MatryoshkaAdaptor(8, [2, 8], kind=kind, hidden=16)
    ad.set_rotation(random_rotation(8, seed=2))
    if ad.mlp is not None:
        torch.nn.init.normal_(ad.mlp[2].weight)
    back = MatryoshkaAdaptor.from_plain_state(ad.config(), ad.plain_state())
    x = torch.randn(5, 8)
    assert torch.allclose(ad(x), back(x), atol=1e-5)


def test_neighbourhood_loss_is_zero_when_the_prefix_is_the_full_embedding():
    loss = NeighbourhoodLoss([4, 8], temperature=0.1)
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    nb = torch.nn.functional.normalize(torch.randn(6, 3, 8), dim=-1)
    per_dim = loss.per_dim(a, nb, a, nb)
    assert per_dim[1].item() == pytest.approx(0.0, abs=1e-5)
    assert per_dim[0].item() > 0


def test_mine_neighbours_leaves_self_out():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    assert mine_neighbours(x, 1)[:, 0].tolist() == [1, 0, 3, 2]


def test_trained_adaptor_beats_raw_prefixes(tmp_path):
    x = synthetic_corpus(n=1100)
    q, c = x[:100], x[100:]
    dims = [4, 8]
    cfg = FitConfig(epochs=3, batch_size=128, lr=3e-3, cosine=False, log_every=0)
    ad, history = train_adaptor(c, [4, 8, 24], cfg, tmp_path, neighbours=16, runner=QUIET)
    assert history[-1]["loss"] < history[0]["loss"]
    raw = prefix_recall(q, c, dims)
    learnt = prefix_recall(embed_with(ad, q), embed_with(ad, c), dims, reference=(q, c))
    assert all(learnt[m] > raw[m] + 0.1 for m in dims), (raw, learnt)
    # the orthogonal adaptor keeps full-dim neighbours exactly
    assert prefix_recall(embed_with(ad, q), embed_with(ad, c), [24], reference=(q, c))[24] == 1.0


def test_identity_init_learns_an_order_on_its_own(tmp_path):
    x = synthetic_corpus(n=1100, seed=3)
    q, c = x[:100], x[100:]
    cfg = FitConfig(epochs=4, batch_size=128, lr=1e-2, cosine=False, log_every=0)
    ad, _ = train_adaptor(c, [4, 24], cfg, tmp_path, init="identity", neighbours=16, runner=QUIET)
    raw = prefix_recall(q, c, [4])[4]
    learnt = prefix_recall(embed_with(ad, q), embed_with(ad, c), [4], reference=(q, c))[4]
    assert learnt > raw + 0.1, (raw, learnt)


@pytest.fixture()
def base_dir(tmp_path, make_static_dir):
    return make_static_dir(tmp_path / "base")


def test_round_trip_through_get_encoder(tmp_path, base_dir):
    base = get_encoder(f"static:{base_dir}")
    ad = MatryoshkaAdaptor(16, [4, 8, 16])
    ad.set_rotation(random_rotation(16, seed=5))
    out = save_adaptor(ad, tmp_path / "ad", f"static:{base_dir}", base.fingerprint)
    assert json.loads((out / "adaptor.json").read_text())["base"] == f"static:{base_dir}"

    enc = get_encoder(f"adaptor:{out}", device="cpu")
    assert isinstance(enc, Encoder)
    assert enc.name == f"adaptor:{out.resolve()}"
    assert enc.dim == 16 and enc.nesting.dims == (4, 8, 16) and enc.modality == "text"
    texts = ["w1 w2 w3", "w4", "w5 w6 w7 w8"]
    expected = l2_normalize(base.encode(texts)) @ random_rotation(16, seed=5)
    np.testing.assert_allclose(enc.encode(texts), expected, atol=1e-5)
    np.testing.assert_allclose(enc.embed_features(enc.preprocess(texts)), expected, atol=1e-5)
    assert enc.preprocessor is base.preprocessor or enc.preprocessor is not None
    assert get_encoder(f"adaptor:{out}", nesting=[8]).nesting.dims == (8, 16)

    # the fingerprint covers the adaptor's weights and the base's
    fp = enc.fingerprint
    assert get_encoder(f"adaptor:{out}").fingerprint == fp
    ad.set_rotation(random_rotation(16, seed=6))
    save_adaptor(ad, tmp_path / "ad2", f"static:{base_dir}", base.fingerprint)
    assert get_encoder(f"adaptor:{tmp_path / 'ad2'}").fingerprint != fp
    assert fp != base.fingerprint


def test_refuses_a_changed_base_and_missing_files(tmp_path, base_dir, make_static_dir):
    ad = MatryoshkaAdaptor(16, [4, 16])
    save_adaptor(ad, tmp_path / "ad", f"static:{base_dir}", "0123456789abcdef")
    with pytest.raises(ValueError, match="fingerprint"):
        load_adaptor(tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="not a saved adaptor"):
        read_adaptor(tmp_path / "nothing")
    other = make_static_dir(tmp_path / "base32", dim=32)
    save_adaptor(ad, tmp_path / "ad3", f"static:{other}", "")
    with pytest.raises(ValueError, match="16-dim"):
        load_adaptor(tmp_path / "ad3")
