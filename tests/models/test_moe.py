"""MoE layer: both dispatch paths against a for-loop reference, masks, losses, statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmoe_jax.models.moe import (
    MASK_VALUE,
    MoELayer,
    compute_capacity,
    put_experts,
    routing_stats,
    take_experts,
)

D, F, E = 8, 16, 4


def _act(name):
    return {"relu": lambda h: np.maximum(h, 0.0), "silu": lambda h: h / (1.0 + np.exp(-h))}[name]


def loop_reference(params, x, token_mask, expert_mask, top_k, capacity, activation="relu",
                   gated=False, dropped_token_mode="zero"):
    """Token by token, expert by expert, in float64: the obvious semantics of MoELayer."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    act = _act(activation)
    y = np.zeros_like(x)
    tokens_per_expert = np.zeros(E)
    dropped = 0
    for bi in range(b):
        logits = x[bi] @ p["router"]["kernel"]
        if expert_mask is not None:
            logits = np.where(expert_mask, logits, MASK_VALUE)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        choices = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
        used = np.zeros(E, int)
        for k in range(top_k):  # every top-1 choice before any top-2 choice
            for ti in range(t):
                if not token_mask[bi, ti]:
                    continue
                e = choices[ti, k]
                gate = probs[ti, e]
                tokens_per_expert[e] += 1
                if capacity is not None and used[e] >= capacity:
                    dropped += 1
                    if dropped_token_mode == "hf_legacy":
                        y[bi, ti] += gate * x[bi, ti]
                    continue
                used[e] += 1
                w = p["experts"]
                if gated:
                    h = act(x[bi, ti] @ w["wi_0"][e]) * (x[bi, ti] @ w["wi_1"][e])
                else:
                    h = act(x[bi, ti] @ w["wi"][e])
                y[bi, ti] += gate * (h @ w["wo"][e])
    return y, tokens_per_expert, dropped


# Dispatch paths under test: the capacity path and the two dropless implementations.
PATHS = {"capacity": {}, "ragged": {"dispatch": "dropless", "dropless_impl": "ragged"},
         "blocks": {"dispatch": "dropless", "dropless_impl": "blocks", "block_rows": 4}}


def _setup(top_k=1, dispatch="capacity", capacity=3, seed=0, b=3, t=7, **kw):
    """`dispatch`: "capacity", "dropless" (the default implementation) or a key of `PATHS`."""
    kw = {**PATHS.get(dispatch, {"dispatch": dispatch}), **kw}
    kw.setdefault("dispatch", "capacity")
    layer = MoELayer(num_experts=E, d_ff=F, top_k=top_k, expert_capacity=capacity, **kw)
    kx, kp = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (b, t, D))
    params = layer.init(kp, x)
    mask = np.ones((b, t), bool)
    mask[0, -2:] = False  # right padding
    mask[1, 0] = False  # and a padding token in front
    return layer, params, x, mask


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity", [1, 2, 64])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("mode", ["zero", "hf_legacy"])
def test_capacity_path_matches_loop_reference(top_k, capacity, use_mask, mode):
    layer, params, x, tmask = _setup(top_k, "capacity", capacity, dropped_token_mode=mode)
    emask = np.array([True, False, True, True]) if use_mask else None
    y, stats = layer.apply(params, x, jnp.asarray(tmask), None if emask is None else jnp.asarray(emask))
    ref, ref_tpe, ref_dropped = loop_reference(params, x, tmask, emask, top_k, capacity,
                                               dropped_token_mode=mode)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats.tokens_per_expert), ref_tpe)
    assert float(stats.dropped) == ref_dropped
    assert float(stats.num_tokens) == tmask.sum()
    if capacity == 1:
        assert ref_dropped > 0  # the case really exercises dropping


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("impl", ["ragged", "blocks"])
def test_dropless_path_matches_loop_reference(top_k, gated, impl):
    layer, params, x, tmask = _setup(top_k, impl, None, gated=gated, activation="silu")
    emask = np.array([True, True, False, True])
    y, stats = layer.apply(params, x, jnp.asarray(tmask), jnp.asarray(emask))
    ref, ref_tpe, _ = loop_reference(params, x, tmask, emask, top_k, None, "silu", gated)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(stats.tokens_per_expert), ref_tpe)
    assert float(stats.dropped) == 0.0


@pytest.mark.parametrize("impl", ["ragged", "blocks"])
def test_paths_agree_when_nothing_is_dropped(impl):
    layer, params, x, tmask = _setup(2, "capacity", 64)
    dropless = layer.clone(**PATHS[impl])
    (y1, s1), (y2, s2) = (m.apply(params, x, jnp.asarray(tmask)) for m in (layer, dropless))
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), atol=1e-6)
    np.testing.assert_allclose(np.asarray(s1.lb_loss), np.asarray(s2.lb_loss), rtol=1e-6)
    # padding tokens produce nothing
    assert np.all(np.asarray(y1)[~tmask] == 0.0)


@pytest.mark.parametrize("dispatch", ["capacity", "ragged", "blocks"])
def test_absent_experts_get_exactly_zero_gradient(dispatch):
    layer, params, x, tmask = _setup(1, dispatch, 64 if dispatch == "capacity" else None)
    emask = jnp.array([True, False, True, False])

    def loss(p):
        y, stats = layer.apply(p, x, jnp.asarray(tmask), emask)
        return jnp.sum(y**2) + stats.lb_loss + stats.z_loss

    g = jax.grad(loss)(params)["params"]
    for name in ("wi", "wo"):
        w = np.asarray(g["experts"][name])
        assert np.all(w[[1, 3]] == 0.0)
        assert np.any(w[[0, 2]] != 0.0)
    router = np.asarray(g["router"]["kernel"])
    assert np.all(router[:, [1, 3]] == 0.0)
    assert np.any(router[:, [0, 2]] != 0.0)


def test_top_k_equal_to_allowed_count_has_no_nan():
    layer, params, x, tmask = _setup(2, "capacity", 64)
    emask = jnp.array([False, True, False, True])
    y, stats = layer.apply(params, x, jnp.asarray(tmask), emask)
    assert np.all(np.isfinite(np.asarray(y)))
    tpe = np.asarray(stats.tokens_per_expert)
    assert tpe[0] == tpe[2] == 0 and tpe[1] == tpe[3] == tmask.sum()
    assert np.isfinite(float(stats.z_loss)) and np.isfinite(float(stats.lb_loss))


def _stats_from_probs(probs, token_mask, expert_mask=None, top_k=1):
    probs = jnp.asarray(probs, jnp.float32)[None]
    logits = jnp.log(jnp.maximum(probs, 1e-30))
    _, top_idx = jax.lax.top_k(probs, top_k)
    kept = jnp.ones(top_idx.shape, bool)
    return routing_stats(logits, probs, top_idx, kept, jnp.asarray(token_mask, jnp.float32)[None],
                         expert_mask)


VMOE_GATES = [[0.5, 0.4, 0.1], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7], [0.8, 0.2, 0.0]]


def test_load_balance_loss_hand_computed():
    # top-1 choices [0, 2, 2, 0] -> f = [1/2, 0, 1/2]; P = [1.7, 1.1, 1.2] / 4
    # L = 3 * (0.5 * 0.425 + 0.5 * 0.3) = 1.0875 (the value in vmoe's routing_test).
    stats = _stats_from_probs(VMOE_GATES, [1, 1, 1, 1])
    np.testing.assert_allclose(float(stats.lb_loss), 1.0875, rtol=1e-6)
    # A padding token with any probabilities changes nothing.
    padded = _stats_from_probs(VMOE_GATES + [[0.0, 1.0, 0.0]], [1, 1, 1, 1, 0])
    np.testing.assert_allclose(float(padded.lb_loss), 1.0875, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(padded.tokens_per_expert), [2, 0, 2])
    np.testing.assert_allclose(np.asarray(padded.prob_mass), [1.7, 1.1, 1.2], rtol=1e-6)
    assert float(padded.num_tokens) == 4
    # Over allowed experts only: the factor is |A| = 2 instead of E = 3.
    masked = _stats_from_probs(VMOE_GATES, [1, 1, 1, 1], jnp.array([True, False, True]))
    np.testing.assert_allclose(float(masked.lb_loss), 2 * 0.3625, rtol=1e-6)
    # Uniform routing over the allowed experts gives exactly 1.
    uniform = _stats_from_probs([[0.5, 0.0, 0.5], [0.5, 0.0, 0.5]], [1, 1],
                                jnp.array([True, False, True]))
    # ties: top_k picks expert 0 for both tokens -> f = [1, 0, 0], P = [.5, 0, .5] -> 2 * .5 = 1
    np.testing.assert_allclose(float(uniform.lb_loss), 1.0, rtol=1e-6)


def test_z_loss_hand_computed():
    # logsumexp of [0, 0] is ln 2, of [ln 3, 0] is ln 4 = 2 ln 2 -> mean of squares = 2.5 (ln 2)^2
    logits = jnp.array([[[0.0, 0.0], [np.log(3.0), 0.0], [50.0, 0.0]]], jnp.float32)
    probs = jax.nn.softmax(logits)
    _, idx = jax.lax.top_k(probs, 1)
    stats = routing_stats(logits, probs, idx, jnp.ones(idx.shape, bool),
                          jnp.array([[1.0, 1.0, 0.0]]), None)
    np.testing.assert_allclose(float(stats.z_loss), 2.5 * np.log(2.0) ** 2, rtol=1e-6)


def test_activation_probs_and_merge():
    a = _stats_from_probs(VMOE_GATES, [1, 1, 1, 1])
    np.testing.assert_allclose(np.asarray(a.activation_probs), [0.5, 0.0, 0.5])
    b = _stats_from_probs([[0.0, 1.0, 0.0]] * 4, [1, 1, 0, 0])
    merged = a + b
    np.testing.assert_allclose(np.asarray(merged.activation_probs), [2 / 6, 2 / 6, 2 / 6])
    assert float(merged.num_tokens) == 6
    np.testing.assert_allclose(float(merged.lb_loss),
                               (4 * float(a.lb_loss) + 2 * float(b.lb_loss)) / 6, rtol=1e-6)
    stacked = jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b).total()  # same merge over an axis
    for x, y in zip(jax.tree.leaves(stacked), jax.tree.leaves(merged)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


def test_compute_capacity():
    assert compute_capacity(10, 4, 1, capacity_factor=1.0) == 3  # ceil(10 / 4)
    assert compute_capacity(10, 4, 2, capacity_factor=1.25) == 7  # ceil(1.25 * 20 / 4)
    assert compute_capacity(10, 4, 1, expert_capacity=64) == 10  # never more than the group
    assert compute_capacity(100, 8, 1, expert_capacity=64) == 64
    with pytest.raises(ValueError, match="capacity"):
        compute_capacity(10, 4)
    with pytest.raises(ValueError, match="expert_capacity"):
        compute_capacity(10, 4, expert_capacity=0)


@pytest.mark.parametrize("dispatch", ["capacity", "ragged", "blocks"])
def test_gathered_subset_equals_masked_full_layer(dispatch):
    layer, params, x, tmask = _setup(1, dispatch, 64 if dispatch == "capacity" else None)
    keep = jnp.array([3, 1, 0, 0])  # two kept experts + padding slots (index 0 reused)
    valid = jnp.array([True, True, False, False])
    sub = {"params": take_experts(params["params"], keep)}
    y_sub, s_sub = layer.apply(sub, x, jnp.asarray(tmask), valid)
    y_full, s_full = layer.apply(params, x, jnp.asarray(tmask), jnp.array([False, True, False, True]))
    np.testing.assert_allclose(np.asarray(y_sub), np.asarray(y_full), atol=1e-6)
    np.testing.assert_allclose(np.asarray(s_sub.tokens_per_expert)[:2],
                               np.asarray(s_full.tokens_per_expert)[[3, 1]])
    np.testing.assert_allclose(float(s_sub.lb_loss), float(s_full.lb_loss), rtol=1e-6)

    # Write a modified subset back: only valid slots land, padding slots (index 0) do not.
    changed = jax.tree.map(lambda a: a + 1.0, sub["params"])
    back = put_experts(params["params"], changed, keep, valid)
    for name in ("wi", "wo"):
        old, new = np.asarray(params["params"]["experts"][name]), np.asarray(back["experts"][name])
        np.testing.assert_allclose(new[[1, 3]], old[[1, 3]] + 1.0)
        np.testing.assert_array_equal(new[[0, 2]], old[[0, 2]])
    old_r, new_r = np.asarray(params["params"]["router"]["kernel"]), np.asarray(back["router"]["kernel"])
    np.testing.assert_allclose(new_r[:, [1, 3]], old_r[:, [1, 3]] + 1.0)
    np.testing.assert_array_equal(new_r[:, [0, 2]], old_r[:, [0, 2]])


@pytest.mark.parametrize("dispatch", ["capacity", "ragged", "blocks"])
def test_vmap_over_clients_matches_per_client_loop(dispatch):
    layer, params, x, tmask = _setup(1, dispatch, 2 if dispatch == "capacity" else None)
    clients = 3
    stacked = jax.tree.map(
        lambda a: jnp.stack([a * (1.0 + 0.1 * c) for c in range(clients)]), params)
    masks = jnp.array([[True, True, True, True], [True, False, True, False], [False, True, True, True]])
    xs = jnp.stack([x + c for c in range(clients)])

    def one(p, xi, m):
        return layer.apply(p, xi, jnp.asarray(tmask), m)

    ys, stats = jax.jit(jax.vmap(one))(stacked, xs, masks)
    for c in range(clients):
        p_c = jax.tree.map(lambda a, c=c: a[c], stacked)
        y_c, s_c = one(p_c, xs[c], masks[c])
        np.testing.assert_allclose(np.asarray(ys[c]), np.asarray(y_c), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(stats.tokens_per_expert[c]),
                                      np.asarray(s_c.tokens_per_expert))


def test_jitter_only_in_training_and_only_on_the_router():
    layer, params, x, tmask = _setup(1, "dropless", None, jitter_noise=0.5)
    y_eval, _ = layer.apply(params, x)
    y_eval2, _ = layer.apply(params, x, deterministic=True)
    np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(y_eval2))
    y_a, s_a = layer.apply(params, x, deterministic=False, rngs={"jitter": jax.random.key(1)})
    y_b, s_b = layer.apply(params, x, deterministic=False, rngs={"jitter": jax.random.key(2)})
    assert not np.allclose(np.asarray(s_a.prob_mass), np.asarray(s_b.prob_mass))
    # Experts see the clean input: with one expert allowed, y = p_e(jittered router) * ffn(x).
    only = jnp.array([False, False, True, False])
    y_j, _ = layer.apply(params, x, expert_mask=only, deterministic=False,
                         rngs={"jitter": jax.random.key(3)})
    y_c, _ = layer.apply(params, x, expert_mask=only)
    np.testing.assert_allclose(np.asarray(y_j), np.asarray(y_c), rtol=1e-5, atol=1e-6)


def test_bad_input_raises_clear_errors():
    layer, params, x, tmask = _setup(2, "capacity", 4)
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        layer.apply(params, x[0])
    with pytest.raises(ValueError, match="token_mask"):
        layer.apply(params, x, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="expected \\(4,\\)"):
        layer.apply(params, x, None, jnp.ones((3,), bool))
    with pytest.raises(ValueError, match="boolean"):
        layer.apply(params, x, None, jnp.ones((4,), jnp.int32))
    with pytest.raises(ValueError, match="allows 1 expert"):
        layer.apply(params, x, None, jnp.array([True, False, False, False]))
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(num_experts=2, d_ff=4, top_k=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="dispatch"):
        MoELayer(num_experts=2, d_ff=4, dispatch="magic").init(jax.random.key(0), x)


@pytest.mark.parametrize("dispatch", ["capacity", "ragged", "blocks"])
def test_clients_sharded_over_devices_match_per_client_loop(dispatch):
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    n_dev = len(jax.devices())
    assert n_dev == 8, "conftest sets 8 host CPU devices"
    mesh = jax.make_mesh((n_dev,), ("clients",), axis_types=(AxisType.Auto,))
    layer, params, x, tmask = _setup(1, dispatch, 2 if dispatch == "capacity" else None, b=2, t=5)
    stacked = jax.tree.map(lambda a: jnp.stack([a * (1.0 + 0.05 * c) for c in range(n_dev)]), params)
    masks = jnp.asarray(np.random.default_rng(0).random((n_dev, E)) < 0.7).at[:, 0].set(True)
    xs = jnp.stack([x * (1.0 + c) for c in range(n_dev)])
    sharded = NamedSharding(mesh, PartitionSpec("clients"))

    def one(p, xi, m):
        return layer.apply(p, xi, jnp.asarray(tmask), m)

    fn = jax.jit(jax.vmap(one, spmd_axis_name="clients"), in_shardings=sharded, out_shardings=sharded)
    ys, stats = fn(*jax.device_put((stacked, xs, masks), sharded))
    assert ys.sharding.spec == PartitionSpec("clients")
    assert len(ys.addressable_shards) == n_dev
    for c in range(n_dev):
        y_c, s_c = one(jax.tree.map(lambda a, c=c: a[c], stacked), xs[c], masks[c])
        np.testing.assert_allclose(np.asarray(ys[c]), np.asarray(y_c), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(stats.tokens_per_expert[c]),
                                      np.asarray(s_c.tokens_per_expert))


@pytest.mark.parametrize("block_rows", [0, 1, 3, 32])  # 0: auto_block_rows
@pytest.mark.parametrize("top_k", [1, 2])
def test_blocks_equal_ragged_in_outputs_and_gradients(block_rows, top_k):
    """Any block size computes the ragged path's function (padding rows never reach an output) and
    the same gradients, with a mask and padding tokens."""
    layer, params, x, tmask = _setup(top_k, "ragged", None, gated=True, activation="silu")
    blocks = layer.clone(dropless_impl="blocks", block_rows=block_rows)
    emask = jnp.array([True, True, False, True])

    def loss(m):
        def f(p, xi):
            y, stats = m.apply(p, xi, jnp.asarray(tmask), emask)
            return jnp.sum(jnp.sin(y)) + stats.lb_loss + stats.z_loss, y
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)

    (l1, y1), (g1, gx1) = loss(layer)
    (l2, y2), (g2, gx2) = loss(blocks)
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), atol=1e-6)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gx2), np.asarray(gx1), atol=1e-5)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_block_layout_by_hand():
    from fedmoe_jax.models.dispatch import block_layout, num_blocks, sort_choices

    # 6 choices over E = 3 experts, the fifth is padding: experts 2, 0, 2, 2, (pad), 0
    order, key, sizes = sort_choices(jnp.array([2, 0, 2, 2, 1, 0]), jnp.array([1, 1, 1, 1, 0, 1], bool), 3)
    np.testing.assert_array_equal(np.asarray(order), [1, 5, 0, 2, 3, 4])
    np.testing.assert_array_equal(np.asarray(sizes), [2, 0, 3])
    # blocks of G = 2 rows: expert 0 rows 0-1, expert 1 none, expert 2 rows 2-4 (+ row 5 padding)
    assert num_blocks(6, 3, 2) == 5  # ceil((6 + 3 * 1) / 2)
    row, block_expert = block_layout(key[order], sizes, 2)
    np.testing.assert_array_equal(np.asarray(row), [0, 1, 2, 3, 4, 10])  # padding -> R = 10 (dropped)
    np.testing.assert_array_equal(np.asarray(block_expert), [0, 2, 2, 2, 2])  # blocks 3, 4 unused


def test_auto_block_rows():
    from fedmoe_jax.models.dispatch import auto_block_rows

    # the largest power of two <= N / E, within [1, 64]
    assert auto_block_rows(1024, 8) == 64  # 128 per expert: capped
    assert auto_block_rows(256, 8) == 32
    assert auto_block_rows(255, 8) == 16  # 31 per expert
    assert auto_block_rows(8, 16) == 1  # a decoding step: one token per sequence
