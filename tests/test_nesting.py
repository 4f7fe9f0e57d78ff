"""NestingSpec, prefix slicing and per-prefix re-normalisation (numpy and torch)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mrl_core.nesting import NestingSpec, default_dims, l2_normalize, prefix


def test_default_dims_double_from_8_and_end_at_full_dim():
    assert default_dims(256) == (8, 16, 32, 64, 128, 256)
    assert default_dims(768) == (8, 16, 32, 64, 128, 256, 512, 768)
    assert default_dims(5) == (5,)
    assert NestingSpec.for_model(2048).dims[-1] == 2048


def test_for_model_parses_strings_sorts_and_appends_full_dim():
    assert NestingSpec.for_model(256, "64,16").dims == (16, 64, 256)
    assert NestingSpec.for_model(256, [256, 64]).dims == (64, 256)


@pytest.mark.parametrize("bad", [(16, 8), (8, 8), (0, 8), ()])
def test_spec_rejects_non_increasing_or_empty(bad):
    with pytest.raises(ValueError):
        NestingSpec(bad)


def test_dim_above_model_dim_is_named():
    with pytest.raises(ValueError, match=r"\[512\] exceed the model's embedding dim 256"):
        NestingSpec.for_model(256, [64, 512])


def test_bad_dim_string_is_named():
    with pytest.raises(ValueError, match="comma-separated"):
        NestingSpec.for_model(256, "16,sixty-four")


def test_prefixes_are_unit_norm_and_match_slices_numpy_and_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 32)).astype(np.float32)
    spec = NestingSpec((4, 8, 32))
    for src in (x, torch.from_numpy(x)):
        heads = spec.prefixes(src)
        assert list(heads) == [4, 8, 32]
        for m, h in heads.items():
            h = np.asarray(h)
            assert h.shape == (5, m)
            np.testing.assert_allclose(np.linalg.norm(h, axis=1), 1.0, rtol=1e-5)
            direction = x[:, :m] / np.linalg.norm(x[:, :m], axis=1, keepdims=True)
            np.testing.assert_allclose(h, direction, rtol=1e-5, atol=1e-6)


def test_prefix_without_normalize_is_a_plain_slice_and_bounds_checked():
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    np.testing.assert_array_equal(prefix(x, 3, normalize=False), x[:, :3])
    with pytest.raises(ValueError):
        prefix(x, 7)


def test_zero_rows_stay_zero_and_float16_keeps_dtype():
    x = np.zeros((2, 4), dtype=np.float16)
    x[1] = [3, 4, 0, 0]
    y = l2_normalize(x)
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y[0], 0)
    np.testing.assert_allclose(y[1].astype(np.float32), [0.6, 0.8, 0, 0], atol=1e-3)


COORD = st.one_of(st.just(0.0), st.floats(1e-3, 1e6), st.floats(-1e6, -1e-3))


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 40)), elements=COORD))
def test_normalised_rows_have_norm_one_or_zero(x):
    y = l2_normalize(x)
    norms = np.linalg.norm(y, axis=1)
    assert np.all((np.abs(norms - 1) < 1e-6) | (norms == 0))
    # normalising is idempotent and keeps direction
    np.testing.assert_allclose(l2_normalize(y), y, atol=1e-9)
