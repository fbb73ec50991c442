"""Switch Transformer: configs, placement, masks, losses with hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersAttention,
)

from fedmoe_jax.models import (
    RoutingStats,
    SwitchConfig,
    SwitchOutput,
    SwitchTransformer,
    cross_entropy,
    get_config,
    shift_right,
    switch_loss,
)
from fedmoe_jax.models.switch import count_params, relative_position_bucket, stack_mean

EXPERT_PARAMS = 2 * 768 * 3072


def _param_count(config):
    shapes = jax.eval_shape(lambda: SwitchTransformer(config).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)))
    return count_params(shapes)


def test_switch_base_parameter_counts_match_the_paper():
    # the paper's models: dense part ~166.3 M; each expert 4,718,592; 12 MoE layers.
    n8, n32 = _param_count(get_config("switch-base-8")), _param_count(get_config("switch-base-32"))
    assert n32 - n8 == 12 * 24 * (EXPERT_PARAMS + 768)  # experts and their router columns
    dense = n8 - 12 * 8 * EXPERT_PARAMS - 12 * 8 * 768  # minus experts and router columns
    assert abs(dense - 166.3e6) < 0.2e6
    assert abs(n32 - 1.978e9) < 0.002e9


def test_moe_placement_follows_hugging_face():
    base = get_config("switch-base-32")
    assert base.encoder_moe_blocks == (1, 3, 5, 7, 9, 11) == base.decoder_moe_blocks
    assert base.num_moe_layers == 12
    assert base.moe_layer_names[0] == ("encoder", 1) and base.moe_layer_names[6] == ("decoder", 1)
    every = base.replace(encoder_sparse_step=1, decoder_sparse_step=4)
    assert every.encoder_moe_blocks == tuple(range(12))
    assert every.decoder_moe_blocks == (1, 5, 9)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_hugging_face(bidirectional):
    rel = np.arange(-300, 300)
    ours = relative_position_bucket(jnp.asarray(rel), bidirectional, 32, 128)
    theirs = SwitchTransformersAttention._relative_position_bucket(
        torch.tensor(rel), bidirectional=bidirectional, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


@pytest.fixture(scope="module")
def tiny():  # 4 + 4 blocks: two MoE layers on each side (the suite's switch-tiny-8 has one)
    config = get_config("switch-tiny-8", num_layers=4, num_decoder_layers=4)
    model = SwitchTransformer(config)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(2, config.vocab_size, (2, 10)))
    dec = jnp.asarray(rng.integers(2, config.vocab_size, (2, 6)))
    params = model.init(jax.random.key(0), ids, dec)
    return config, model, params, ids, dec


def test_forward_shapes_and_stats(tiny):
    config, model, params, ids, dec = tiny
    out = model.apply(params, ids, dec)
    assert isinstance(out, SwitchOutput)
    assert out.logits.shape == (2, 6, config.vocab_size) and out.logits.dtype == jnp.float32
    assert out.routing.tokens_per_expert.shape == (config.num_moe_layers, config.num_experts)
    assert out.num_encoder_moe_layers == 2
    n_tokens = np.asarray(out.routing.num_tokens)
    np.testing.assert_array_equal(n_tokens, [20, 20, 12, 12])  # encoder 2x10, decoder 2x6


def test_expert_mask_restricts_every_layer(tiny):
    config, model, params, ids, dec = tiny
    mask = np.ones((config.num_moe_layers, config.num_experts), bool)
    mask[0, :6] = False
    mask[3, ::2] = False
    out = model.apply(params, ids, dec, expert_mask=jnp.asarray(mask))
    tpe = np.asarray(out.routing.tokens_per_expert)
    assert np.all(tpe[~mask] == 0)
    assert tpe[0, 6:].sum() == 20
    with pytest.raises(ValueError, match=r"expected \(4, 8\)"):
        model.apply(params, ids, dec, expert_mask=jnp.ones((2, 8), bool))


def test_padding_does_not_change_real_positions(tiny):
    config, model, params, ids, dec = tiny
    out = model.apply(params, ids, dec)
    # Append encoder padding and decoder padding: logits at real positions must not move.
    ids_p = jnp.concatenate([ids, jnp.zeros((2, 5), ids.dtype)], axis=1)
    dec_p = jnp.concatenate([dec, jnp.zeros((2, 3), dec.dtype)], axis=1)
    enc_mask = jnp.concatenate([jnp.ones_like(ids), jnp.zeros((2, 5), ids.dtype)], axis=1)
    dec_mask = jnp.concatenate([jnp.ones_like(dec), jnp.zeros((2, 3), dec.dtype)], axis=1)
    out_p = model.apply(params, ids_p, dec_p, enc_mask, dec_mask)
    np.testing.assert_allclose(np.asarray(out_p.logits[:, :6]), np.asarray(out.logits), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out_p.routing.tokens_per_expert),
                                  np.asarray(out.routing.tokens_per_expert))


def test_dropout_and_jitter_need_rngs_and_vary(tiny):
    config, _, params, ids, dec = tiny
    model = SwitchTransformer(config.replace(dropout_rate=0.3, router_jitter_noise=0.1))
    rngs = lambda s: {"dropout": jax.random.key(s), "jitter": jax.random.key(s + 100)}  # noqa: E731
    a = model.apply(params, ids, dec, deterministic=False, rngs=rngs(1)).logits
    b = model.apply(params, ids, dec, deterministic=False, rngs=rngs(1)).logits
    c = model.apply(params, ids, dec, deterministic=False, rngs=rngs(2)).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_grad_step_finite_and_masked_experts_untouched(tiny, dispatch):
    config, _, params, ids, dec = tiny
    model = SwitchTransformer(config.replace(dispatch=dispatch))
    mask = np.ones((config.num_moe_layers, config.num_experts), bool)
    mask[:, 5] = False

    def loss_fn(p):
        out = model.apply(p, ids, dec, expert_mask=jnp.asarray(mask))
        return switch_loss(out, dec, jnp.ones(dec.shape))[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert np.isfinite(float(loss))
    layer = grads["params"]["encoder"]["block_1"]["mlp"]
    assert np.all(np.asarray(layer["experts"]["wi"])[5] == 0.0)
    assert np.all(np.asarray(layer["router"]["kernel"])[:, 5] == 0.0)
    assert np.any(np.asarray(layer["experts"]["wi"]) != 0.0)


def test_remat_keeps_loss_and_gradients_and_saves_fewer_residuals(tiny):
    config, _, params, ids, dec = tiny
    noisy = config.replace(dropout_rate=0.3, router_jitter_noise=0.1)
    rngs = {"dropout": jax.random.key(1), "jitter": jax.random.key(2)}

    def loss_fn(remat):
        model = SwitchTransformer(noisy.replace(remat=remat))

        def loss(p):
            out = model.apply(p, ids, dec, deterministic=False, rngs=rngs)
            return switch_loss(out, dec, jnp.ones(dec.shape))[0]

        return loss

    results = {r: jax.jit(jax.value_and_grad(loss_fn(r)))(params) for r in ("none", "full", "dots")}
    loss, grads = results["none"]
    for remat in ("full", "dots"):  # same dropout masks and jitter inside the recomputed blocks
        np.testing.assert_allclose(float(results[remat][0]), float(loss), rtol=1e-6)
        for g, ref in zip(jax.tree.leaves(results[remat][1]), jax.tree.leaves(grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-4, atol=1e-6)

    def residual_bytes(remat):  # what the backward pass keeps: the leaves of the vjp closure (traced
        # with abstract values: shapes are all that is counted, and nothing runs op by op)
        vjp = jax.eval_shape(lambda p: jax.vjp(loss_fn(remat), p)[1], params)
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(vjp))

    kept = {r: residual_bytes(r) for r in ("none", "full", "dots")}
    assert kept["full"] < kept["dots"] < kept["none"], kept
    # Cached decoding (decode=True) never rematerializes (no backward pass): same tokens as without.
    from fedmoe_jax.models.decoding import greedy_decode

    tokens = {r: np.asarray(greedy_decode(SwitchTransformer(config.replace(remat=r)), params["params"], ids,
                                          max_length=5).tokens) for r in ("none", "full")}
    np.testing.assert_array_equal(tokens["full"], tokens["none"])


def test_bfloat16_activations_keep_float32_router(tiny):
    config, _, params, ids, dec = tiny
    model = SwitchTransformer(config.replace(dtype="bfloat16"))
    out, state = model.apply(params, ids, dec, mutable=["intermediates"])
    assert np.all(np.isfinite(np.asarray(out.logits)))
    logits = jax.tree.leaves(state["intermediates"]["encoder"]["block_1"]["mlp"]["router_logits"])[0]
    assert logits.dtype == jnp.float32


def test_cross_entropy_hand_computed():
    # probs [1/4, 1/2, 1/4], label 1, smoothing 0.3 -> targets [.1, .8, .1]
    # CE = -(.1 ln .25 + .8 ln .5 + .1 ln .25) = 1.2 ln 2
    logits = jnp.array([[[0.0, math.log(2.0), 0.0], [9.0, -3.0, 1.0]]])
    labels = jnp.array([[1, 0]])
    got = cross_entropy(logits, labels, jnp.array([[1.0, 0.0]]), label_smoothing=0.3)
    np.testing.assert_allclose(float(got), 1.2 * math.log(2.0), rtol=1e-6)
    plain = cross_entropy(logits, labels, jnp.array([[1.0, 0.0]]))
    np.testing.assert_allclose(float(plain), math.log(2.0), rtol=1e-6)


def test_switch_loss_combines_terms_per_stack():
    routing = RoutingStats(
        tokens_per_expert=jnp.zeros((4, 2)), prob_mass=jnp.zeros((4, 2)), dropped=jnp.zeros(4),
        num_tokens=jnp.ones(4), lb_loss=jnp.array([1.0, 3.0, 2.0, 6.0]),
        z_loss=jnp.array([10.0, 10.0, 20.0, 40.0]),
    )
    logits = jnp.array([[[0.0, math.log(2.0), 0.0]]])
    out = SwitchOutput(logits, routing, num_encoder_moe_layers=2)
    loss, metrics = switch_loss(out, jnp.array([[1]]), jnp.ones((1, 1)), 0.3, 0.01, 0.001)
    # lb = mean(1, 3) + mean(2, 6) = 6; z = 10 + 30 = 40
    np.testing.assert_allclose(float(metrics["lb_loss"]), 6.0)
    np.testing.assert_allclose(float(metrics["z_loss"]), 40.0)
    np.testing.assert_allclose(float(loss), 1.2 * math.log(2.0) + 0.06 + 0.04, rtol=1e-6)
    assert float(stack_mean(jnp.array([4.0]), 0)) == 4.0  # a stack without MoE layers adds nothing


def test_shift_right():
    labels = jnp.array([[5, 6, 7], [8, -100, -100]])
    np.testing.assert_array_equal(np.asarray(shift_right(labels)), [[0, 5, 6], [0, 8, 0]])


def test_bad_inputs_and_configs(tiny):
    config, model, params, ids, dec = tiny
    with pytest.raises(ValueError, match="integer token ids"):
        model.apply(params, ids.astype(jnp.float32), dec)
    with pytest.raises(ValueError, match=r"shape \[B, T\]"):
        model.apply(params, ids[0], dec)
    with pytest.raises(ValueError, match="mask for input_ids"):
        model.apply(params, ids, dec, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="top_k=9 exceeds"):
        SwitchConfig(num_experts=8, top_k=9)
    with pytest.raises(ValueError, match="dispatch"):
        SwitchConfig(dispatch="nope")
    with pytest.raises(ValueError, match="capacity"):
        SwitchConfig(expert_capacity=None)
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("switch-huge")
    with pytest.raises(ValueError, match="activation"):
        SwitchConfig(dense_act_fn="tanhh")
    with pytest.raises(ValueError, match="remat='all'"):
        SwitchConfig(remat="all")
