"""The linen MoE layer used inside a Flax NNX model through `flax.nnx.bridge` (how NNX users wrap ours)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedmoe_jax.models.moe import MoELayer, RoutingStats

B, T, D, E, F, V = 4, 8, 16, 4, 32, 32


def _layer(**kw) -> MoELayer:
    return MoELayer(num_experts=E, d_ff=F, top_k=2, expert_capacity=None, capacity_factor=2.0, **kw)


class TinyMoEModel(nnx.Module):
    """Embedding `[B, T] -> [B, T, D]`, bridged MoE layer (residual), linear head `-> [B, T, V]`."""

    def __init__(self, rngs: nnx.Rngs, **moe_kw):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.moe = nnx.bridge.ToNNX(_layer(**moe_kw), rngs=rngs)
        nnx.bridge.lazy_init(self.moe, jnp.ones((1, T, D), jnp.float32))
        self.head = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, ids, token_mask=None, expert_mask=None, deterministic=True):
        h = self.embed(ids)
        y, stats = self.moe(h, token_mask=token_mask, expert_mask=expert_mask, deterministic=deterministic)
        return self.head(h + y), stats


def _data():
    k1, k2 = jax.random.split(jax.random.key(1))
    ids = jax.random.randint(k1, (B, T), 0, V)
    targets = (ids * 7 + 3) % V  # a learnable token-wise map
    token_mask = jnp.ones((B, T), jnp.float32).at[:, -2:].set(0.0)
    return ids, targets, token_mask


def test_bridged_layer_matches_linen_apply():
    model = TinyMoEModel(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model.moe, nnx.Param))
    assert set(params) == {"router", "experts"}
    assert params["experts"]["wi"].shape == (E, D, F) and params["router"]["kernel"].shape == (D, E)

    x = jax.random.normal(jax.random.key(2), (B, T, D))
    token_mask = jnp.ones((B, T)).at[0, -3:].set(0.0)
    expert_mask = jnp.array([True, False, True, True])
    y, stats = model.moe(x, token_mask=token_mask, expert_mask=expert_mask)
    y_ref, stats_ref = _layer().apply({"params": params}, x, token_mask, expert_mask)
    assert isinstance(stats, RoutingStats)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(stats.tokens_per_expert[1]) == 0.0  # the masked expert gets no token

    # Gradients through the bridge equal linen gradients of the same loss.
    def nnx_loss(moe):
        return jnp.sum(moe(x, token_mask=token_mask, expert_mask=expert_mask)[0] ** 2)

    def linen_loss(p):
        return jnp.sum(_layer().apply({"params": p}, x, token_mask, expert_mask)[0] ** 2)

    g_nnx = nnx.to_pure_dict(nnx.grad(nnx_loss)(model.moe))
    g_ref = jax.grad(linen_loss)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_nnx, g_ref)
    assert float(jnp.abs(g_nnx["experts"]["wi"][1]).max()) == 0.0  # absent expert: zero update


def test_nnx_optimizer_trains_bridged_moe():
    # Router jitter needs the 'jitter' RNG stream; ToNNX draws it from the Rngs it was given.
    model = TinyMoEModel(nnx.Rngs(params=0, jitter=1), jitter_noise=0.01)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    ids, targets, token_mask = _data()

    def loss_fn(model):
        logits, stats = model(ids, token_mask=token_mask, deterministic=False)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * token_mask) / token_mask.sum() + 0.01 * stats.lb_loss

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    before = nnx.to_pure_dict(nnx.state(model.moe, nnx.Param))
    jitter_count = int(model.moe.to_nnx__rngs.jitter.count[...])
    losses = [float(train_step(model, optimizer)) for _ in range(8)]
    after = nnx.to_pure_dict(nnx.state(model.moe, nnx.Param))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, losses
    # The optimizer updated the bridged linen parameters in place (router and experts).
    for path in (("router", "kernel"), ("experts", "wi"), ("experts", "wo")):
        a, b = before[path[0]][path[1]], after[path[0]][path[1]]
        assert not np.allclose(a, b), path
    assert int(optimizer.step[...]) == 8
    assert int(model.moe.to_nnx__rngs.jitter.count[...]) == jitter_count + 8  # fresh jitter each step
