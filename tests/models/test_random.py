"""Counter-based dropout masks and jitter: rates, independence, purity under vmap, and the module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmoe_jax.models.random import Dropout, hash_bits, hash_uniform, keep_mask, lowbias32


def test_lowbias32_by_hand():
    # reference values computed with Python ints: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; ...
    def ref(x):
        m = 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m
        x ^= x >> 15
        x = (x * 0x846CA68B) & m
        return x ^ (x >> 16)

    xs = np.array([0, 1, 2, 12345, 0xFFFFFFFF], np.uint32)
    assert np.asarray(lowbias32(jnp.asarray(xs))).tolist() == [ref(int(x)) for x in xs]
    assert ref(1) != ref(2) and ref(0) == 0


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_rate_and_independence(rate):
    n = 1 << 20
    a, b = keep_mask(jax.random.key(0), (n,), rate), keep_mask(jax.random.key(1), (n,), rate)
    a, b = np.asarray(a), np.asarray(b)
    sd = np.sqrt(rate * (1 - rate) / n)
    assert abs(a.mean() - (1 - rate)) < 5 * sd and abs(b.mean() - (1 - rate)) < 5 * sd
    # two keys: joint keep rate = product (independent masks); neighbours within a mask too
    assert abs((a & b).mean() - (1 - rate) ** 2) < 5 * sd
    assert abs((a[1:] & a[:-1]).mean() - (1 - rate) ** 2) < 5 * sd
    assert not np.array_equal(a, b)


def test_bits_are_pure_functions_of_key_and_index_under_vmap_and_jit():
    keys = jax.random.split(jax.random.key(3), 4)
    batched = jax.jit(jax.vmap(lambda k: hash_bits(k, (5, 7))))(keys)
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(hash_bits(keys[i], (5, 7))))
    # the flat index decides: a [35] draw is the [5, 7] one flattened
    np.testing.assert_array_equal(np.asarray(hash_bits(keys[0], (35,))),
                                  np.asarray(hash_bits(keys[0], (5, 7))).ravel())


def test_uniform_range_and_moments():
    u = np.asarray(hash_uniform(jax.random.key(0), (1 << 18,), 0.99, 1.01))
    assert u.min() >= 0.99 and u.max() <= 1.01  # float32 rounding may reach the upper end
    assert abs(u.mean() - 1.0) < 1e-4 and abs(u.std() - 0.02 / np.sqrt(12)) < 1e-4


def test_dropout_module():
    x = jnp.ones((64, 128))
    layer = Dropout(0.25)
    assert layer.apply({}, x, deterministic=True) is x
    y = np.asarray(layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
    kept = y != 0
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs(kept.mean() - 0.75) < 0.02
    z = np.asarray(layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
    np.testing.assert_array_equal(y, z)  # same key, same mask
    assert np.all(np.asarray(Dropout(1.0).apply({}, x, deterministic=False,
                                                rngs={"dropout": jax.random.key(0)})) == 0)
    assert Dropout(0.0).apply({}, x, deterministic=False) is x
