"""Local training: vmapped cohort == per-client calls == an obvious Python training loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from fedmoe_jax.federated import bucket_width, expert_slots, gather_submodel
from fedmoe_jax.federated.algorithm import LocalHooks
from fedmoe_jax.federated.client import LossConfig, make_local_train
from fedmoe_jax.models import SwitchTransformer, get_config, shift_right, switch_loss

K, B, S, T = 3, 2, 6, 4


def make_batches(rng, k=K, pad_last_example=True):
    vocab = 128
    inputs = rng.integers(2, vocab, (k, B, S))
    input_mask = np.ones((k, B, S), np.int32)
    input_mask[:, :, -2:] = 0
    inputs = inputs * input_mask
    targets = rng.integers(2, vocab, (k, B, T))
    target_mask = np.ones((k, B, T), np.int32)
    target_mask[:, 0, -1] = 0
    targets = targets * target_mask
    example_mask = np.ones((k, B), bool)
    if pad_last_example:
        example_mask[-1, -1] = False
    return {"inputs": jnp.asarray(inputs), "input_mask": jnp.asarray(input_mask),
            "targets": jnp.asarray(targets), "target_mask": jnp.asarray(target_mask),
            "example_mask": jnp.asarray(example_mask)}


@pytest.fixture(scope="module")
def setup():
    config = get_config("switch-tiny-8", dropout_rate=0.0, router_jitter_noise=0.0)
    rng = np.random.default_rng(0)
    params = SwitchTransformer(config).init(jax.random.key(0), jnp.ones((1, S), jnp.int32),
                                            jnp.ones((1, T), jnp.int32))["params"]
    maps = np.zeros((3, config.num_moe_layers, config.num_experts), bool)
    for c in range(3):
        for layer in range(config.num_moe_layers):
            maps[c, layer, rng.choice(8, rng.integers(1, 4), replace=False)] = True
    width = bucket_width(int(maps.sum(-1).max()), config.num_experts)
    idx, valid = expert_slots(jnp.asarray(maps), width)
    narrow_cfg = config.replace(num_experts=width)
    subs = [gather_submodel(params, config, idx[c]) for c in range(3)]
    batches = [make_batches(rng) for _ in range(3)]
    return narrow_cfg, subs, valid, batches


def obvious_loop(config, params, batches, step_mask, valid, rng, tx, loss_config, correct_update=None):
    """Python loop over the real steps; after each update, absent experts are put back.
    `correct_update(updates) -> updates`: applied to each optimizer step (SCAFFOLD's correction)."""
    model = SwitchTransformer(config)
    original = params
    opt_state = tx.init(params)
    keep_mask = None
    for k in range(len(step_mask)):
        if not step_mask[k]:
            continue
        batch = jax.tree.map(lambda a, k=k: a[k], batches)
        ex = batch["example_mask"].astype(jnp.float32)

        def loss_fn(p, batch=batch, ex=ex, k=k):
            enc, dec = batch["input_mask"] * ex[:, None], batch["target_mask"] * ex[:, None]
            d_rng, j_rng = jax.random.split(jax.random.fold_in(rng, k))
            out = model.apply({"params": p}, batch["inputs"], shift_right(batch["targets"]), enc, dec,
                              expert_mask=valid, deterministic=False,
                              rngs={"dropout": d_rng, "jitter": j_rng})
            return switch_loss(out, batch["targets"], dec, loss_config.label_smoothing,
                               loss_config.lb_loss_weight, loss_config.z_loss_weight)[0]

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        if correct_update is not None:
            updates = correct_update(updates)
        params = optax.apply_updates(params, updates)
        if keep_mask is None:
            from fedmoe_jax.federated.client import expert_update_mask

            keep_mask = expert_update_mask(params, config, valid)
        params = jax.tree.map(lambda p, o, m: jnp.where(m > 0, p, o), params, original, keep_mask)
    return params


def test_local_train_matches_obvious_loop(setup):
    config, subs, valid, batches = setup
    # eps well above the float noise of tiny gradients (Adam divides by sqrt(v) + eps)
    tx = optax.adamw(1e-2, eps=1e-3, weight_decay=0.1)
    loss_config = LossConfig(0.1, 0.01, 0.001)
    local_train = jax.jit(make_local_train(config, tx, loss_config))
    step_mask = jnp.array([True, False, True])  # a padded step in the middle
    rng = jax.random.key(5)
    got, metrics, stats = local_train(subs[0], batches[0], step_mask, valid[0], rng)
    ref = obvious_loop(config, subs[0], batches[0], np.asarray(step_mask), valid[0], rng, tx, loss_config)
    for (key, a), (_, b) in zip(sorted(flatten_dict(got).items()), sorted(flatten_dict(ref).items())):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6, err_msg=str(key))
    assert float(metrics["num_steps"]) == 2.0
    assert np.isfinite(float(metrics["loss"]))
    assert float(stats.num_tokens.sum()) > 0


def test_absent_slots_bitwise_unchanged(setup):
    config, subs, valid, batches = setup
    local_train = jax.jit(make_local_train(config, optax.adamw(1e-2, weight_decay=0.1)))
    got, _, _ = local_train(subs[1], batches[1], jnp.ones(K, bool), valid[1], jax.random.key(0))
    for layer, (stack, i) in enumerate(config.moe_layer_names):
        mlp_new, mlp_old = got[stack][f"block_{i}"]["mlp"], subs[1][stack][f"block_{i}"]["mlp"]
        absent = ~np.asarray(valid[1, layer])
        for name in ("wi", "wo"):
            new, old = np.asarray(mlp_new["experts"][name]), np.asarray(mlp_old["experts"][name])
            np.testing.assert_array_equal(new[absent], old[absent])
            assert not np.allclose(new[~absent], old[~absent])
        np.testing.assert_array_equal(np.asarray(mlp_new["router"]["kernel"])[:, absent],
                                      np.asarray(mlp_old["router"]["kernel"])[:, absent])


def test_vmapped_cohort_matches_per_client_calls(setup):
    config, subs, valid, batches = setup
    local_train = make_local_train(config, optax.sgd(0.1, momentum=0.9))
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *subs)
    stacked_batches = jax.tree.map(lambda *a: jnp.stack(a), *batches)
    step_masks = jnp.array([[True, True, True], [True, True, False], [True, False, False]])
    rngs = jnp.stack([jax.random.fold_in(jax.random.key(1), c) for c in range(3)])
    out, metrics, _ = jax.jit(jax.vmap(local_train))(stacked, stacked_batches, step_masks, valid, rngs)
    for c in range(3):
        one, m1, _ = jax.jit(local_train)(subs[c], batches[c], step_masks[c], valid[c], rngs[c])
        pairs = zip(sorted(flatten_dict(out).items()), sorted(flatten_dict(one).items()))
        for (key, a), (_, b) in pairs:
            np.testing.assert_allclose(np.asarray(a[c]), np.asarray(b), rtol=1e-5, atol=1e-6,
                                       err_msg=str(key))
        np.testing.assert_allclose(float(metrics["loss"][c]), float(m1["loss"]), rtol=1e-5)


def test_hooks_change_training(setup):
    config, subs, valid, batches = setup

    def prox(params, anchor, extra):
        sq = jax.tree.map(lambda p, a: jnp.sum((p - a) ** 2), params, anchor)
        return 0.5 * extra * sum(jax.tree.leaves(sq))

    plain = jax.jit(make_local_train(config, optax.sgd(0.5)))
    proximal = jax.jit(make_local_train(config, optax.sgd(0.5), hooks=LocalHooks(loss_term=prox)))
    args = (subs[2], batches[2], jnp.ones(K, bool), valid[2], jax.random.key(0))
    p0, _, _ = plain(*args)
    p_zero, m_zero, _ = proximal(*args, jnp.float32(0.0))
    p_big, _, _ = proximal(*args, jnp.float32(1.0))
    def dist(tree):
        return sum(float(jnp.sum((x - y) ** 2))
                   for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(subs[2])))

    np.testing.assert_allclose(dist(p_zero), dist(p0), rtol=1e-5)  # mu = 0 is plain training
    assert dist(p_big) < dist(p0)  # the proximal term keeps the client near the global model
    assert "hook_loss" in m_zero


def test_scaffold_update_correction(setup):
    """SCAFFOLD's step u - lr (c - c_i): under SGD the same as the paper's gradient g - c_i + c; under
    AdamW the optimizer's step corrected in its own units, as an obvious loop does it."""
    from fedmoe_jax.algorithms.baselines import scaffold_update_correction

    config, subs, valid, batches = setup
    lr = 0.05
    rng = np.random.default_rng(3)
    extra = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), subs[0])  # c - c_i
    args = (subs[0], batches[0], jnp.array([True, True, False]), valid[0], jax.random.key(2), extra)
    hooks = LocalHooks(update_correction=scaffold_update_correction(lr))
    on_update, _, _ = jax.jit(make_local_train(config, optax.sgd(lr), hooks=hooks))(*args)
    on_grad, _, _ = jax.jit(make_local_train(config, optax.sgd(lr), hooks=LocalHooks(
        grad_correction=lambda g, e: jax.tree.map(lambda a, b: a + b, g, e))))(*args)
    plain, _, _ = jax.jit(make_local_train(config, optax.sgd(lr)))(*args[:-1])
    pairs = zip(sorted(flatten_dict(on_update).items()), sorted(flatten_dict(on_grad).items()))
    for (key, a), (_, b) in pairs:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=str(key))
    assert any(not np.allclose(a, c) for a, c in zip(jax.tree.leaves(on_update), jax.tree.leaves(plain)))

    tx = optax.adamw(1e-2, eps=1e-3, weight_decay=0.1)
    loss_config = LossConfig()
    hooks = LocalHooks(update_correction=scaffold_update_correction(1e-2))
    got, _, _ = jax.jit(make_local_train(config, tx, loss_config, hooks))(*args)
    ref = obvious_loop(config, subs[0], batches[0], np.asarray(args[2]), valid[0], args[4], tx, loss_config,
                       correct_update=lambda u: jax.tree.map(lambda a, e: a - 1e-2 * e, u, extra))
    for (key, a), (_, b) in zip(sorted(flatten_dict(got).items()), sorted(flatten_dict(ref).items())):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6, err_msg=str(key))


def test_local_train_flags_a_nonfinite_client(setup):
    """`metrics["finite"]`: 1 while every parameter and every real step's loss stayed finite; a NaN
    gradient at any real step makes it 0, an all-padding step (masked, its loss undefined) does not."""
    config, subs, valid, batches = setup
    hooks = LocalHooks(grad_correction=lambda g, scale: jax.tree.map(lambda x: x * scale, g))
    local_train = jax.jit(make_local_train(config, optax.sgd(0.1), hooks=hooks))
    empty = dict(batches[0], example_mask=batches[0]["example_mask"].at[2].set(False))  # step 2: padding
    step_mask = jnp.array([True, True, False])
    _, healthy, _ = local_train(subs[0], empty, step_mask, valid[0], jax.random.key(0), jnp.float32(1.0))
    _, poisoned, _ = local_train(subs[0], empty, step_mask, valid[0], jax.random.key(0), jnp.float32(np.nan))
    assert float(healthy["finite"]) == 1.0 and float(poisoned["finite"]) == 0.0
