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
