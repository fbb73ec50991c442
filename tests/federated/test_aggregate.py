"""Aggregation: the masked weighted mean against NumPy; the scatter fast path against the dense one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_jax.federated import masked_weighted_mean, scatter_weighted_mean


def numpy_reference(values, weights, mask, fallback):
    """Entry by entry: average over the clients holding it, else the fallback."""
    out = np.array(fallback, np.float64)
    c, e = mask.shape
    for j in range(e):
        w = np.array([weights[i] * mask[i, j] for i in range(c)], np.float64)
        if w.sum() > 0:
            out[j] = sum(w[i] * values[i, j] for i in range(c)) / w.sum()
    return out


def test_hand_computed_three_rules():
    # expert 0: no holder -> unchanged; expert 1: one holder -> overwritten; expert 2: two holders,
    # weights 1 and 3 -> (1 * 10 + 3 * 20) / 4 = 17.5
    values = jnp.array([[1.0, 5.0, 10.0], [2.0, 6.0, 20.0]])
    mask = jnp.array([[False, True, True], [False, False, True]])
    got = masked_weighted_mean(values, jnp.array([1.0, 3.0]), mask, jnp.array([-1.0, -1.0, -1.0]))
    np.testing.assert_allclose(np.asarray(got), [-1.0, 5.0, 17.5])
    # dense FedAvg: all-true mask, example weights
    fedavg = masked_weighted_mean(values, jnp.array([1.0, 3.0]))
    np.testing.assert_allclose(np.asarray(fedavg), [1.75, 5.75, 17.5])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_masked_mean_matches_numpy(c, e, seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(c, e, 3)).astype(np.float32)
    weights = rng.integers(0, 4, c).astype(np.float32)  # includes zero-weight (padding) clients
    mask = rng.random((c, e)) < 0.5
    fallback = rng.normal(size=(e, 3)).astype(np.float32)
    got = jax.jit(masked_weighted_mean)(values, weights, mask, fallback)
    np.testing.assert_allclose(np.asarray(got), numpy_reference(values, weights, mask, fallback),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1])
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_scatter_mean_equals_dense_masked_mean(axis, seed):
    rng = np.random.default_rng(seed)
    c, e, s, d = 4, 6, 3, 2
    maps = rng.random((c, e)) < 0.5
    maps[np.arange(c), rng.integers(0, e, c)] = True
    indices = np.zeros((c, s), np.int32)
    valid = np.zeros((c, s), bool)
    for i in range(c):
        kept = np.flatnonzero(maps[i])[:s]
        maps[i] = False
        maps[i, kept] = True
        indices[i, : len(kept)] = kept
        indices[i, len(kept):] = kept[0]  # padding slots repeat a kept index: must not count
        valid[i, : len(kept)] = True
    weights = rng.integers(0, 3, c).astype(np.float32)
    slot_values = rng.normal(size=(c, s, d)).astype(np.float32)
    fallback = rng.normal(size=(e, d)).astype(np.float32)
    dense = np.zeros((c, e, d), np.float32)
    for i in range(c):
        for k in range(s):
            if valid[i, k]:
                dense[i, indices[i, k]] = slot_values[i, k]
    ref = masked_weighted_mean(jnp.asarray(dense), jnp.asarray(weights), jnp.asarray(maps),
                               jnp.asarray(fallback))
    if axis == 1:  # router layout: [D, S] per client, [D, E] global
        slot_values, fallback, ref = slot_values.swapaxes(1, 2), fallback.T, ref.T
    got = scatter_weighted_mean(jnp.asarray(slot_values), jnp.asarray(indices), jnp.asarray(valid),
                                jnp.asarray(weights), jnp.asarray(fallback), axis)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_dtype_kept_and_zero_weights_fall_back():
    values = jnp.ones((2, 3), jnp.bfloat16)
    out = masked_weighted_mean(values, jnp.zeros(2), None, jnp.full((3,), 7.0, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), [7.0, 7.0, 7.0])
