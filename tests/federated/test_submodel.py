"""Sub-MoE slots: gather/scatter round trips, narrow model == masked full model, cohort aggregation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from fedmoe_jax.federated import (
    aggregate_cohort,
    bucket_width,
    expert_slots,
    gather_submodel,
    moe_layer_paths,
    scatter_submodel,
)
from fedmoe_jax.models import SwitchTransformer, get_config


def test_bucket_width():
    assert [bucket_width(k, 8) for k in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert bucket_width(5, 6) == 6
    with pytest.raises(ValueError, match="between 1 and"):
        bucket_width(0, 8)


def test_expert_slots_by_hand():
    maps = jnp.array([[[True, False, True, False], [False, False, False, True]]])
    idx, valid = expert_slots(maps, 2)
    assert idx[0, 0].tolist() == [0, 2] and valid[0, 0].tolist() == [True, True]
    assert idx[0, 1, 0] == 3 and valid[0, 1].tolist() == [True, False]
    with pytest.raises(ValueError, match="cannot hold"):
        expert_slots(maps, 1)


@pytest.fixture(scope="module")
def setup():
    config = get_config("switch-tiny-8")
    model = SwitchTransformer(config)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(2, config.vocab_size, (2, 7)))
    dec = jnp.asarray(rng.integers(2, config.vocab_size, (2, 5)))
    params = model.init(jax.random.key(0), ids, dec)["params"]
    maps = np.zeros((3, config.num_moe_layers, config.num_experts), bool)
    for c in range(3):
        for layer in range(config.num_moe_layers):
            maps[c, layer, rng.choice(config.num_experts, rng.integers(1, 5), replace=False)] = True
    return config, model, params, ids, dec, maps


def test_narrow_model_equals_masked_full_model(setup):
    config, model, params, ids, dec, maps = setup
    width = bucket_width(int(maps.sum(-1).max()), config.num_experts)
    idx, valid = expert_slots(jnp.asarray(maps), width)
    narrow_model = SwitchTransformer(config.replace(num_experts=width))
    for c in range(3):
        sub = gather_submodel(params, config, idx[c])
        narrow = narrow_model.apply({"params": sub}, ids, dec, expert_mask=valid[c])
        full = model.apply({"params": params}, ids, dec, expert_mask=jnp.asarray(maps[c]))
        np.testing.assert_allclose(np.asarray(narrow.logits), np.asarray(full.logits), atol=1e-5)
        tpe_narrow = np.asarray(narrow.routing.tokens_per_expert)
        tpe_full = np.asarray(full.routing.tokens_per_expert)
        for layer in range(config.num_moe_layers):
            k = int(valid[c, layer].sum())
            kept = np.asarray(idx[c, layer, :k])
            np.testing.assert_array_equal(tpe_narrow[layer, :k], tpe_full[layer, kept])


def test_scatter_round_trip_changes_only_kept_experts(setup):
    config, _, params, _, _, maps = setup
    idx, valid = expert_slots(jnp.asarray(maps), config.num_experts)
    sub = gather_submodel(params, config, idx[0])
    same = scatter_submodel(params, sub, config, idx[0], valid[0])
    for (k, a), (_, b) in zip(sorted(flatten_dict(params).items()), sorted(flatten_dict(same).items())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(k))
    changed = scatter_submodel(params, jax.tree.map(lambda a: a + 1.0, sub), config, idx[0], valid[0])
    for layer, path in enumerate(moe_layer_paths(config)):
        old = np.asarray(flatten_dict(params)[path + ("experts", "wi")])
        new = np.asarray(flatten_dict(changed)[path + ("experts", "wi")])
        kept = maps[0, layer]
        np.testing.assert_allclose(new[kept], old[kept] + 1.0)
        np.testing.assert_array_equal(new[~kept], old[~kept])
    dense = ("shared", "embedding")
    np.testing.assert_allclose(np.asarray(flatten_dict(changed)[dense]),
                               np.asarray(flatten_dict(params)[dense]) + 1.0)


def reference_aggregate(params, clients, config, maps, weights):
    """Loop over every tensor, layer, expert and client."""
    flat_g = {k: np.asarray(v, np.float64) for k, v in flatten_dict(params).items()}
    flat_c = [{k: np.asarray(v, np.float64) for k, v in flatten_dict(c).items()} for c in clients]
    out = {}
    moe = {path: layer for layer, path in enumerate(moe_layer_paths(config))}
    for key, cur in flat_g.items():
        layer = next((lyr for p, lyr in moe.items() if key[: len(p)] == p), None)
        if layer is None:
            out[key] = sum(w * c[key] for w, c in zip(weights, flat_c)) / sum(weights)
            continue
        axis = 1 if key[-2:] == ("router", "kernel") else 0
        new = np.moveaxis(cur.copy(), axis, 0)
        for e in range(config.num_experts):
            holders = [(w, np.moveaxis(c[key], axis, 0)[e]) for w, c, m in zip(weights, flat_c, maps)
                       if m[layer, e] and w > 0]
            if holders:
                new[e] = sum(w * v for w, v in holders) / sum(w for w, _ in holders)
        out[key] = np.moveaxis(new, 0, axis)
    return out


def test_aggregate_cohort_matches_reference(setup):
    config, _, params, _, _, maps = setup
    width = bucket_width(int(maps.sum(-1).max()), config.num_experts)
    idx, valid = expert_slots(jnp.asarray(maps), width)
    weights = np.array([3.0, 1.0, 2.0])
    trained_full, narrow = [], []
    for c in range(3):
        noise = jax.tree.map(lambda a, c=c: a + 0.1 * (c + 1), params)  # "training" moves every weight
        trained_full.append(noise)
        narrow.append(gather_submodel(noise, config, idx[c]))
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *narrow)
    aggregate = jax.jit(aggregate_cohort, static_argnums=2)
    got = aggregate(params, stacked, config, idx, valid, jnp.asarray(weights))
    ref = reference_aggregate(params, trained_full, config, maps, weights)
    for key, value in flatten_dict(got).items():
        np.testing.assert_allclose(np.asarray(value), ref[key], rtol=1e-5, atol=1e-6, err_msg=str(key))
    # an expert nobody in the cohort holds is unchanged
    layer0 = moe_layer_paths(config)[0] + ("experts", "wo")
    unheld = ~maps[:, 0].any(0)
    if unheld.any():
        np.testing.assert_array_equal(np.asarray(flatten_dict(got)[layer0])[unheld],
                                      np.asarray(flatten_dict(params)[layer0])[unheld])


def test_capacity_table_by_hand():
    from fedmoe_jax.models.moe import capacity_table
    # T = 24 tokens, capacity factor 1, top-1: ceil(24 / a) for a = 1..8 allowed experts
    assert capacity_table(24, 8, 1, None, 1.0)[1:].tolist() == [24, 12, 8, 6, 5, 4, 4, 3]
    # factor 2, top-2, T = 10: ceil(40 / a) clipped to T
    assert capacity_table(10, 4, 2, None, 2.0)[1:].tolist() == [10, 10, 10, 10]
    assert capacity_table(24, 4, 1, 5, None)[1:].tolist() == [5, 5, 5, 5]  # absolute: as given


def test_capacity_bound_and_narrow_config():
    from fedmoe_jax.federated.submodel import capacity_bound, narrow_config
    valid = np.zeros((3, 2, 8), bool)
    valid[0, :, :3] = True  # 3 experts in every layer
    valid[1, 0, :8], valid[1, 1, :5] = True, True
    # client 2 is padding (no slot valid): it does not count
    assert capacity_bound(valid) == 2  # 3 rounded down to a power of two
    assert capacity_bound(valid[1:2]) == 4  # 5 -> 4
    assert capacity_bound(np.ones((2, 2, 8), bool)) == 8  # every slot kept: the width itself
    config = get_config("switch-tiny-8", expert_capacity=None, capacity_factor=1.0)
    assert narrow_config(config, valid).num_experts == 8
    assert narrow_config(config, valid).capacity_min_experts == 2
    assert narrow_config(get_config("switch-tiny-8"), valid).capacity_min_experts == 0  # absolute cap


def test_capacity_follows_the_clients_experts_in_every_layout():
    """A 3-expert client computes the same function, and drops the same tokens, as the full layer with
    a mask and gathered into 4, 8 or 16 slots next to wider clients (capacity ceil(cf*T*K / 3))."""
    from fedmoe_jax.federated.submodel import narrow_config
    config = get_config("switch-tiny-8", num_experts=16, expert_capacity=None, capacity_factor=1.0)
    model = SwitchTransformer(config)
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(2, config.vocab_size, (2, 24)))
    dec = jnp.asarray(rng.integers(2, config.vocab_size, (2, 24)))
    params = model.init(jax.random.key(1), ids, dec)["params"]
    layers = config.num_moe_layers
    client = np.zeros((layers, 16), bool)
    for layer in range(layers):
        client[layer, rng.choice(16, 3, replace=False)] = True
    full = model.apply({"params": params}, ids, dec, expert_mask=jnp.asarray(client))
    dropped = np.asarray(full.routing.dropped_fraction)
    assert (dropped > 0).any()  # capacity binds: the test can tell capacities apart
    for width in (4, 8, 16):
        wide = np.zeros((layers, 16), bool)
        wide[:, :width] = True  # a cohort member holding `width` experts sets S
        idx, valid = (np.asarray(a) for a in expert_slots(jnp.asarray(np.stack([client, wide])), width))
        narrow = narrow_config(config, valid)
        sub = gather_submodel(params, config, idx[0])
        out = jax.jit(SwitchTransformer(narrow).apply)({"params": sub}, ids, dec, expert_mask=valid[0])
        np.testing.assert_allclose(np.asarray(out.logits), np.asarray(full.logits), atol=1e-5,
                                   err_msg=f"S={width}")
        np.testing.assert_array_equal(np.asarray(out.routing.dropped_fraction), dropped, err_msg=f"S={width}")
