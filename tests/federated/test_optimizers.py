"""make_optimizer: the named optax optimizers with the documented settings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedmoe_jax.federated.optimizers import OPTIMIZERS, make_optimizer


def one_update(tx, params, grads):
    return tx.update(grads, tx.init(params), params)[0]


def test_adamw_and_adafactor_are_optax_with_t5_settings():
    params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda x: 0.1 * x - 0.2, params)
    pairs = [(make_optimizer("adamw", 0.05, 0.01), optax.adamw(0.05, weight_decay=0.01)),
             (make_optimizer("adafactor", 0.05), optax.adafactor(0.05, multiply_by_parameter_scale=True,
                                                                  clipping_threshold=1.0))]
    for ours, ref in pairs:
        for a, b in zip(jax.tree.leaves(one_update(ours, params, grads)),
                        jax.tree.leaves(one_update(ref, params, grads))):
            np.testing.assert_array_equal(a, b)


def test_adafactor_first_update_by_hand():
    """Step 1 of Adafactor on a vector (not factored): v = g^2 (decay 0.8 gives weight 1 at step 1),
    u = g / sqrt(v) = sign(g), clipped at RMS 1 (no-op), scaled by max(RMS(param), 1e-3) and -lr."""
    p = {"b": jnp.array([2.0, -2.0, 2.0, -2.0])}
    g = {"b": jnp.array([0.5, -0.25, 1e-3, 3.0])}
    u = one_update(make_optimizer("adafactor", 0.1), p, g)["b"]
    np.testing.assert_allclose(u, -0.1 * 2.0 * np.sign(np.asarray(g["b"])), rtol=1e-4)


def test_weight_decay_is_decoupled_and_unknown_names_fail():
    p = {"w": jnp.full((3,), 4.0)}
    zero = {"w": jnp.zeros(3)}
    u = one_update(make_optimizer("adamw", 0.1, weight_decay=0.5), p, zero)["w"]
    np.testing.assert_allclose(u, -0.1 * 0.5 * 4.0)  # AdamW: -lr * wd * p when the gradient is 0
    assert OPTIMIZERS == ("adamw", "adafactor")
    with pytest.raises(ValueError, match="optimizer='sgd'; use one of"):
        make_optimizer("sgd", 0.1)
