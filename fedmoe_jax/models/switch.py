"""Switch Transformer encoder-decoder (Fedus et al. 2022) as pure Flax (linen) modules.

T5-style: RMS layer norm without bias, bucketed relative position bias computed in the first block
of each stack and shared, no attention-score scaling, tied embeddings with the `d_model ** -0.5`
output scaling, and a sparse MoE FFN in the same blocks as Hugging Face's SwitchTransformers
(`i % sparse_step == 1`, or every block when `sparse_step == 1`).

Shape letters: B batch, S encoder tokens, T decoder tokens, D d_model, H heads, V vocab, E experts,
L MoE layers (encoder layers first, then decoder).
"""

from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmoe_jax.models.moe import (
    MASK_VALUE,
    MoELayer,
    RoutingStats,
    get_activation,
    is_concrete,
)
from fedmoe_jax.models.random import Dropout
from fedmoe_jax.models.switch_config import (  # noqa: F401  (the config's public names, re-exported)
    COMPUTE_ONLY_FIELDS,
    DTYPES,
    NAMED_CONFIGS,
    REMAT_POLICIES,
    SwitchConfig,
    get_config,
)

Array = jax.Array

def relative_position_bucket(
    relative_position: Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """T5 / Mesh TensorFlow bucketing of `memory_position - query_position` (int, any shape)."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    scaled = jnp.log(jnp.maximum(relative_position, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (scaled * (num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, relative_position, large)


class Attention(nn.Module):
    """T5 multi-head attention, no score scaling: `x [B, Tq, D] -> ([B, Tq, D], bias)`.

    With `decode=True` a self-attention keeps a key/value cache (collection 'cache'): the first
    call with a `[B, Tmax, D]` input creates it; later calls take one position at a time. A
    cross-attention caches the encoder's keys/values on that first call and reuses them.
    """

    config: SwitchConfig
    bidirectional: bool
    has_relative_bias: bool = False

    def compute_bias(self, q_pos: Array, k_pos: Array) -> Array:
        """Relative position bias `[1, H, Tq, Tk]` for query / key positions `[Tq]`, `[Tk]`."""
        cfg = self.config
        buckets = relative_position_bucket(
            k_pos[None, :] - q_pos[:, None], self.bidirectional,
            cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
        )
        table = nn.Embed(
            cfg.relative_attention_num_buckets, cfg.num_heads,
            embedding_init=nn.initializers.normal(cfg.d_model**-0.5),
            param_dtype=cfg.jnp_param_dtype, name="relative_attention_bias",
        )
        return jnp.transpose(table(buckets), (2, 0, 1))[None].astype(jnp.float32)

    @nn.compact
    def __call__(
        self,
        x: Array,
        kv: Array | None = None,
        mask: Array | None = None,
        position_bias: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> tuple[Array, Array | None]:
        cfg = self.config
        dt, pdt = cfg.jnp_dtype, cfg.jnp_param_dtype
        inner = cfg.num_heads * cfg.d_kv

        def dense(features, name, std):
            return nn.DenseGeneral(features, use_bias=False, dtype=dt, param_dtype=pdt,
                                   kernel_init=nn.initializers.normal(std), name=name)

        source = x if kv is None else kv
        heads = (cfg.num_heads, cfg.d_kv)
        q = dense(heads, "q", (cfg.d_model * cfg.d_kv) ** -0.5)(x)
        if decode and kv is not None and self.has_variable("cache", "cross_key"):
            # Cross-attention while decoding: the encoder's keys/values were cached on the first call.
            k, v = self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
        else:
            k = dense(heads, "k", cfg.d_model**-0.5)(source)
            v = dense(heads, "v", cfg.d_model**-0.5)(source)
            if decode and kv is not None and self.is_mutable_collection("cache"):
                self.put_variable("cache", "cross_key", k)
                self.put_variable("cache", "cross_value", v)
        tq = x.shape[1]
        q_pos = jnp.arange(tq)
        k_pos = jnp.arange(k.shape[1])

        if decode and kv is None:
            initialized = self.has_variable("cache", "cached_key")
            cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
            cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            if initialized:
                idx = cache_index.value
                k = jax.lax.dynamic_update_slice(cached_key.value, k, (0, idx, 0, 0))
                v = jax.lax.dynamic_update_slice(cached_value.value, v, (0, idx, 0, 0))
                cached_key.value, cached_value.value = k, v
                cache_index.value = idx + tq
                q_pos = idx + q_pos
                k_pos = jnp.arange(k.shape[1])
                written = (k_pos[None, :] <= q_pos[:, None])[None, None]
                mask = written if mask is None else jnp.logical_and(mask, written)

        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if position_bias is None:
            if self.has_relative_bias:
                position_bias = self.compute_bias(q_pos, k_pos)
            else:
                position_bias = jnp.zeros((1, cfg.num_heads, tq, k.shape[1]), jnp.float32)
        scores = scores + position_bias
        if mask is not None:
            scores = jnp.where(mask, scores, MASK_VALUE)
        weights = jax.nn.softmax(scores, axis=-1)
        weights = Dropout(cfg.dropout_rate)(weights, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dt), v)
        out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dt,
                              param_dtype=pdt, kernel_init=nn.initializers.normal(inner**-0.5),
                              name="o")(out)
        return out, position_bias


class DenseFF(nn.Module):
    """Dense T5 feed-forward `wi -> act -> dropout -> wo` (gated: `act(wi_0) * wi_1`)."""

    config: SwitchConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        dt, pdt = cfg.jnp_dtype, cfg.jnp_param_dtype
        act = get_activation(cfg.dense_act_fn)

        def dense(features, name, std):
            return nn.Dense(features, use_bias=False, dtype=dt, param_dtype=pdt,
                            kernel_init=nn.initializers.normal(std), name=name)

        if cfg.gated_ffn:
            h = act(dense(cfg.d_ff, "wi_0", cfg.d_model**-0.5)(x)) * dense(
                cfg.d_ff, "wi_1", cfg.d_model**-0.5)(x)
        else:
            h = act(dense(cfg.d_ff, "wi", cfg.d_model**-0.5)(x))
        h = Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return dense(cfg.d_model, "wo", cfg.d_ff**-0.5)(h)


def _norm(cfg: SwitchConfig, name: str) -> nn.RMSNorm:
    return nn.RMSNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.jnp_dtype,
                      param_dtype=cfg.jnp_param_dtype, name=name)


class Block(nn.Module):
    """One encoder or decoder block: self-attention, (cross-attention), dense or MoE FFN."""

    config: SwitchConfig
    is_decoder: bool
    is_sparse: bool
    has_relative_bias: bool

    @nn.compact
    def __call__(
        self, h, mask, position_bias, token_mask, expert_mask=None, encoder_out=None,
        encoder_mask=None, deterministic=True, decode=False,
    ) -> tuple[Array, Array, RoutingStats | None]:
        cfg = self.config
        drop = Dropout(cfg.dropout_rate)
        attn, position_bias = Attention(
            cfg, bidirectional=not self.is_decoder, has_relative_bias=self.has_relative_bias,
            name="attention",
        )(_norm(cfg, "attention_norm")(h), mask=mask, position_bias=position_bias,
          deterministic=deterministic, decode=decode)
        h = h + drop(attn, deterministic=deterministic)
        if self.is_decoder and encoder_out is not None:
            cross, _ = Attention(cfg, bidirectional=True, name="cross_attention")(
                _norm(cfg, "cross_attention_norm")(h), kv=encoder_out, mask=encoder_mask,
                deterministic=deterministic, decode=decode,
            )
            h = h + drop(cross, deterministic=deterministic)
        normed = _norm(cfg, "mlp_norm")(h)
        stats = None
        if self.is_sparse:
            ff, stats = MoELayer(
                num_experts=cfg.num_experts, d_ff=cfg.d_ff, top_k=cfg.top_k,
                dispatch=cfg.dispatch, expert_capacity=cfg.expert_capacity,
                capacity_factor=cfg.capacity_factor, jitter_noise=cfg.router_jitter_noise,
                router_bias=cfg.router_bias, activation=cfg.dense_act_fn, gated=cfg.gated_ffn,
                dropout_rate=cfg.dropout_rate, dropped_token_mode=cfg.dropped_token_mode,
                renormalize_gates=cfg.renormalize_gates,
                capacity_min_experts=cfg.capacity_min_experts, dropless_impl=cfg.dropless_impl,
                block_rows=cfg.block_rows, dtype=cfg.jnp_dtype,
                param_dtype=cfg.jnp_param_dtype, name="mlp",
            )(normed, token_mask=token_mask, expert_mask=expert_mask, deterministic=deterministic)
        else:
            ff = DenseFF(cfg, name="mlp")(normed, deterministic)
        h = h + drop(ff, deterministic=deterministic)
        return h, position_bias, stats


class Stack(nn.Module):
    """Encoder or decoder stack over embedded inputs `[B, T, D] -> ([B, T, D], stats [L_stack])`."""

    config: SwitchConfig
    is_decoder: bool

    @nn.compact
    def __call__(
        self, x, token_mask, expert_mask=None, encoder_out=None, encoder_token_mask=None,
        deterministic=True, decode=False,
    ) -> tuple[Array, RoutingStats | None]:
        cfg = self.config
        n_blocks = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
        step = cfg.decoder_sparse_step if self.is_decoder else cfg.encoder_sparse_step
        keys = token_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]
        if self.is_decoder:
            t = x.shape[1]
            causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
            mask = None if decode else jnp.logical_and(keys, causal)
        else:
            mask = keys
        encoder_mask = (
            None if encoder_token_mask is None else encoder_token_mask.astype(bool)[:, None, None, :]
        )
        h = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        position_bias = None
        all_stats = []
        block_cls = Block
        if cfg.remat != "none" and not decode:
            # Arguments counted with `self` (Flax's lifted checkpoint): deterministic=8, decode=9.
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(8, 9))
        for i in range(n_blocks):
            sparse = cfg.is_sparse(i, step)
            row = None
            if sparse and expert_mask is not None:
                row = expert_mask[len(all_stats)]
            h, position_bias, stats = block_cls(
                cfg, self.is_decoder, sparse, has_relative_bias=(i == 0), name=f"block_{i}"
            )(h, mask, position_bias, token_mask, row, encoder_out, encoder_mask,
              deterministic, decode)
            if stats is not None:
                all_stats.append(stats)
        h = _norm(cfg, "final_norm")(h)
        h = Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *all_stats) if all_stats else None
        return h, stacked


def check_model_expert_mask(config: SwitchConfig, expert_mask: Array) -> None:
    """ValueError unless `expert_mask` is bool `[L, E]` allowing >= top_k experts in every layer.

    The count is checked when the mask is concrete (outside `jit`).
    """
    expected = (config.num_moe_layers, config.num_experts)
    if expert_mask.shape != expected:
        raise ValueError(
            f"expert_mask has shape {tuple(expert_mask.shape)}; expected {expected} = (MoE layers, experts)"
        )
    if expert_mask.dtype != jnp.bool_:
        raise ValueError(f"expert_mask must be boolean, got dtype {expert_mask.dtype}")
    if is_concrete(expert_mask):
        allowed = np.asarray(expert_mask).sum(-1)
        if allowed.size and allowed.min() < config.top_k:
            raise ValueError(
                f"expert_mask allows {allowed.tolist()} experts per MoE layer; every layer needs "
                f"at least top_k={config.top_k}"
            )


@flax.struct.dataclass
class SwitchOutput:
    """Logits `[B, T, V]` and routing statistics stacked over the L MoE layers (encoder first)."""

    logits: Array
    routing: RoutingStats | None
    num_encoder_moe_layers: int = flax.struct.field(pytree_node=False, default=0)


def _concat_stats(a: RoutingStats | None, b: RoutingStats | None) -> RoutingStats | None:
    if a is None or b is None:
        return a if b is None else b
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


class SwitchTransformer(nn.Module):
    """Switch Transformer encoder-decoder with an LM head.

    `apply({'params': p}, input_ids [B, S], decoder_input_ids [B, T], attention_mask=None,
    decoder_attention_mask=None, expert_mask=None [L, E] bool, deterministic=True)` ->
    `SwitchOutput`. Masks are 1 for real tokens. Dropout uses the 'dropout' RNG stream and router
    jitter the 'jitter' stream when `deterministic=False`.
    """

    config: SwitchConfig

    def setup(self):
        cfg = self.config
        self.shared = nn.Embed(cfg.vocab_size, cfg.d_model,
                               embedding_init=nn.initializers.normal(1.0),
                               dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype)
        self.encoder = Stack(cfg, is_decoder=False)
        self.decoder = Stack(cfg, is_decoder=True)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.jnp_dtype,
                                    param_dtype=cfg.jnp_param_dtype,
                                    kernel_init=nn.initializers.normal(1.0))

    def _check(self, ids: Array, mask: Array | None, what: str) -> Array:
        if ids.ndim != 2:
            raise ValueError(f"{what} must have shape [B, T], got {tuple(ids.shape)}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{what} must be integer token ids, got dtype {ids.dtype}")
        if mask is None:
            return jnp.ones(ids.shape, jnp.float32)
        if mask.shape != ids.shape:
            raise ValueError(
                f"the mask for {what} has shape {tuple(mask.shape)}; expected {tuple(ids.shape)}"
            )
        return mask.astype(jnp.float32)

    def _expert_rows(self, expert_mask: Array | None, stack: str) -> Array | None:
        cfg = self.config
        if expert_mask is None:
            return None
        check_model_expert_mask(cfg, expert_mask)
        n_enc = len(cfg.encoder_moe_blocks)
        return expert_mask[:n_enc] if stack == "encoder" else expert_mask[n_enc:]

    def encode(self, input_ids, attention_mask=None, expert_mask=None, deterministic=True):
        """`input_ids [B, S] -> (encoder states [B, S, D], stats over encoder MoE layers)`."""
        mask = self._check(input_ids, attention_mask, "input_ids")
        return self.encoder(self.shared(input_ids), mask, self._expert_rows(expert_mask, "encoder"),
                            deterministic=deterministic)

    def decode(self, decoder_input_ids, encoder_out, attention_mask=None,
               decoder_attention_mask=None, expert_mask=None, deterministic=True, decode=False):
        """`decoder_input_ids [B, T]` + encoder states -> (logits [B, T, V], decoder stats)."""
        dec_mask = self._check(decoder_input_ids, decoder_attention_mask, "decoder_input_ids")
        enc_mask = (jnp.ones(encoder_out.shape[:2], jnp.float32) if attention_mask is None
                    else attention_mask.astype(jnp.float32))
        h, stats = self.decoder(
            self.shared(decoder_input_ids), dec_mask, self._expert_rows(expert_mask, "decoder"),
            encoder_out, enc_mask, deterministic=deterministic, decode=decode,
        )
        if self.config.tie_word_embeddings:
            logits = self.shared.attend(h * (self.config.d_model**-0.5))
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32), stats

    def __call__(self, input_ids, decoder_input_ids, attention_mask=None,
                 decoder_attention_mask=None, expert_mask=None, deterministic=True) -> SwitchOutput:
        enc, enc_stats = self.encode(input_ids, attention_mask, expert_mask, deterministic)
        logits, dec_stats = self.decode(decoder_input_ids, enc, attention_mask,
                                        decoder_attention_mask, expert_mask, deterministic)
        return SwitchOutput(logits, _concat_stats(enc_stats, dec_stats),
                            len(self.config.encoder_moe_blocks))


def shift_right(labels: Array, decoder_start_token_id: int = 0, pad_token_id: int = 0) -> Array:
    """Teacher-forcing decoder inputs from labels `[B, T]` (HF `_shift_right`; -100 -> pad)."""
    shifted = jnp.concatenate(
        [jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype), labels[..., :-1]],
        axis=-1,
    )
    return jnp.where(shifted == -100, pad_token_id, shifted)


def cross_entropy(logits: Array, labels: Array, label_mask: Array,
                  label_smoothing: float = 0.0) -> Array:
    """Label-smoothed token cross-entropy, mean over `label_mask` tokens.

    Smoothed targets are `(1 - s) * onehot + s / V` (optax.smooth_labels).
    """
    vocab = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, vocab, dtype=jnp.float32), label_smoothing)
    per_token = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    m = label_mask.astype(jnp.float32)
    return jnp.sum(per_token * m) / jnp.maximum(m.sum(), 1.0)


def stack_mean(values: Array, num_encoder_layers: int) -> Array:
    """Mean over the encoder's MoE layers plus mean over the decoder's (`values [L]`)."""
    enc, dec = values[:num_encoder_layers], values[num_encoder_layers:]
    total = jnp.zeros((), jnp.float32)
    if enc.shape[0]:
        total = total + enc.mean()
    if dec.shape[0]:
        total = total + dec.mean()
    return total


def switch_loss(
    output: SwitchOutput,
    labels: Array,
    label_mask: Array,
    label_smoothing: float = 0.1,
    lb_loss_weight: float = 0.001,
    z_loss_weight: float = 0.001,
) -> tuple[Array, dict[str, Array]]:
    """Eq. (1): label-smoothed CE + lb_loss_weight * L_LB (+ z_loss_weight * L_z).

    L_LB and L_z are computed per MoE layer over real tokens (allowed experts only), averaged
    over the layers of each stack and summed over the two stacks.
    """
    ce = cross_entropy(output.logits, labels, label_mask, label_smoothing)
    if output.routing is None:
        lb = z = jnp.zeros((), jnp.float32)
    else:
        lb = stack_mean(output.routing.lb_loss, output.num_encoder_moe_layers)
        z = stack_mean(output.routing.z_loss, output.num_encoder_moe_layers)
    loss = ce + lb_loss_weight * lb + z_loss_weight * z
    return loss, {"loss": loss, "ce": ce, "lb_loss": lb, "z_loss": z}


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
