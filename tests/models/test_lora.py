"""LoRA on experts: starts at the base model, merges as W + (alpha/r) A B, trains only adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from fedmoe_jax.models import SwitchTransformer, get_config, shift_right, switch_loss
from fedmoe_jax.models.lora import init_lora, lora_param_count, merge_lora


@pytest.fixture(scope="module")
def tiny():
    config = get_config("switch-tiny-4")
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 128, (2, 6)))
    params = SwitchTransformer(config).init(jax.random.key(0), ids, ids)["params"]
    return config, params, ids


def test_zero_init_is_the_base_model_and_merge_by_hand(tiny):
    config, params, _ = tiny
    lora = init_lora(params, config, rank=2, key=jax.random.key(1))
    merged = merge_lora(params, lora, alpha=4.0, rank=2)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # 2 MoE layers x (wi, wo) x 4 experts x (32*2 + 2*64)
    assert lora_param_count(lora) == 2 * 2 * 4 * (32 * 2 + 2 * 64)
    lora = jax.tree.map(lambda x: x + 0.5, lora)
    merged = flatten_dict(merge_lora(params, lora, alpha=4.0, rank=2))
    path = ("encoder", "block_1", "mlp", "experts", "wi")
    ab = lora["encoder"]["block_1"]["mlp"]["experts"]["wi"]
    expected = np.asarray(flatten_dict(params)[path]) + 2.0 * np.einsum(
        "eir,ero->eio", np.asarray(ab["a"]), np.asarray(ab["b"]))
    np.testing.assert_allclose(np.asarray(merged[path]), expected, rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_adapters_and_move_the_loss(tiny):
    config, params, ids = tiny
    model = SwitchTransformer(config)
    lora = init_lora(params, config, rank=2, key=jax.random.key(1))

    def loss(lora_params):
        out = model.apply({"params": merge_lora(params, lora_params, 4.0, 2)}, ids, shift_right(ids))
        return switch_loss(out, ids, jnp.ones(ids.shape))[0]

    grads = jax.grad(loss)(lora)
    b_grads = [np.abs(np.asarray(g)).sum() for k, g in flatten_dict(grads).items() if k[-1] == "b"]
    assert all(g > 0 for g in b_grads)  # b starts at 0; its gradient is a^T dL/dW != 0
    stepped = jax.tree.map(lambda p, g: p - 1.0 * g, lora, grads)
    assert float(loss(stepped)) < float(loss(lora))


def test_bad_targets_and_rank(tiny):
    config, params, _ = tiny
    with pytest.raises(ValueError, match="rank"):
        init_lora(params, config, rank=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="no expert weight"):
        init_lora(params, config, rank=2, key=jax.random.key(0), targets=("wq",))
