"""Switch Transformer encoder-decoder (Fedus et al. 2022) as pure Flax (linen) modules.

T5-style: RMS layer norm without bias, bucketed relative position bias computed in the first block
of each stack and shared, no attention-score scaling, tied embeddings with the `d_model ** -0.5`
output scaling, and a sparse MoE FFN in the same blocks as Hugging Face's SwitchTransformers
(`i % sparse_step == 1`, or every block when `sparse_step == 1`).

Shape letters: B batch, S encoder tokens, T decoder tokens, D d_model, H heads, V vocab, E experts,
L MoE layers (encoder layers first, then decoder).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmoe_jax.models.moe import (
    DISPATCH_MODES,
    DROPPED_TOKEN_MODES,
    MASK_VALUE,
    MoELayer,
    RoutingStats,
    get_activation,
    is_concrete,
)
from fedmoe_jax.models.random import Dropout

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Rematerialization of each block in training (`SwitchConfig.remat`): what the backward pass keeps.
#   none: every activation (fastest, most memory); full: only the block inputs, the rest recomputed;
#   dots: the outputs of matmuls without batch dimensions (projections, dense FFNs), elementwise work
#   and the batched attention / expert einsums recomputed (jax.checkpoint_policies).
# Fields that change how a step is computed, not what it computes (up to float rounding): left out
# of `SwitchConfig.identity`, so setting them, or adding such a field, never renames a pretrained
# cache entry or a shipped model and never blocks resuming a run.
COMPUTE_ONLY_FIELDS = ("remat", "capacity_min_experts")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class SwitchConfig:
    """Hyperparameters of a Switch Transformer; field names follow Hugging Face's config."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_heads: int = 12
    num_layers: int = 12
    num_decoder_layers: int = 12
    encoder_sparse_step: int = 2
    decoder_sparse_step: int = 2
    num_experts: int = 8
    top_k: int = 1
    expert_capacity: int | None = 64
    capacity_factor: float | None = None
    # The fewest experts an expert_mask of a call allows (0: top_k): sizes the capacity-factor slot
    # buffer of a restricted layer (MoELayer.capacity); the engine sets it from the cohort's maps.
    capacity_min_experts: int = 0
    dispatch: str = "capacity"
    dropped_token_mode: str = "zero"
    renormalize_gates: bool = False
    router_jitter_noise: float = 0.01
    router_bias: bool = False
    router_z_loss_coef: float = 0.001
    router_aux_loss_coef: float = 0.001
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    gated_ffn: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"  # a key of REMAT_POLICIES; the values do not change, only memory and time

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        positive = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_experts", "top_k",
                    "relative_attention_num_buckets", "relative_attention_max_distance")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SwitchConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_layers", "num_decoder_layers", "encoder_sparse_step",
                     "decoder_sparse_step"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"SwitchConfig.{name} must be >= 0, got {getattr(self, name)}")
        fewest = self.capacity_min_experts
        if not (fewest == 0 or self.top_k <= fewest <= self.num_experts):
            raise ValueError(f"SwitchConfig.capacity_min_experts={self.capacity_min_experts} must be 0 or "
                             f"between top_k={self.top_k} and num_experts={self.num_experts}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"SwitchConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}"
            )
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"SwitchConfig.dispatch={self.dispatch!r}; use one of {DISPATCH_MODES}")
        if self.dropped_token_mode not in DROPPED_TOKEN_MODES:
            raise ValueError(
                f"SwitchConfig.dropped_token_mode={self.dropped_token_mode!r}; "
                f"use one of {DROPPED_TOKEN_MODES}"
            )
        if self.dispatch == "capacity" and self.expert_capacity is None and not (
            self.capacity_factor and self.capacity_factor > 0
        ):
            raise ValueError(
                "SwitchConfig with dispatch='capacity' needs expert_capacity or a positive "
                "capacity_factor"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"SwitchConfig.{name}={getattr(self, name)!r}; use one of "
                                 f"{sorted(DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"SwitchConfig.remat={self.remat!r}; use one of {sorted(REMAT_POLICIES)}")
        get_activation(self.dense_act_fn)
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"SwitchConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")

    def replace(self, **changes: Any) -> SwitchConfig:
        return dataclasses.replace(self, **changes)

    def identity(self) -> dict[str, Any]:
        """The fields as a dict, less `COMPUTE_ONLY_FIELDS`: what names a pretrained model (cache
        key) and what a checkpoint must match to be resumed."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in COMPUTE_ONLY_FIELDS}

    @staticmethod
    def is_sparse(block: int, sparse_step: int) -> bool:
        """Hugging Face's placement rule for the MoE FFN of block `block`."""
        return (block % sparse_step == 1 or sparse_step == 1) if sparse_step > 0 else False

    @property
    def encoder_moe_blocks(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_sparse(i, self.encoder_sparse_step))

    @property
    def decoder_moe_blocks(self) -> tuple[int, ...]:
        return tuple(
            i for i in range(self.num_decoder_layers) if self.is_sparse(i, self.decoder_sparse_step)
        )

    @property
    def num_moe_layers(self) -> int:
        """L: MoE layers of the whole model, encoder first."""
        return len(self.encoder_moe_blocks) + len(self.decoder_moe_blocks)

    @property
    def moe_layer_names(self) -> tuple[tuple[str, int], ...]:
        """`(stack, block)` of each MoE layer in the order of the L axis."""
        return tuple(("encoder", i) for i in self.encoder_moe_blocks) + tuple(
            ("decoder", i) for i in self.decoder_moe_blocks
        )

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]


def _base(num_experts: int) -> SwitchConfig:
    return SwitchConfig(num_experts=num_experts)


NAMED_CONFIGS: dict[str, SwitchConfig] = {
    **{f"switch-base-{e}": _base(e) for e in (8, 16, 32, 64, 128)},
    # The CPU-scale model of the benchmarks and the embedded-data experiments.
    "switch-small-16": SwitchConfig(
        vocab_size=4096, d_model=128, d_kv=32, d_ff=512, num_heads=4, num_layers=4,
        num_decoder_layers=4, num_experts=16, expert_capacity=64,
    ),
    # For tests: a few thousand parameters, 2 encoder + 2 decoder blocks (one MoE layer each; compile
    # time grows with depth and dominates the test suite).
    "switch-tiny-4": SwitchConfig(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
        num_decoder_layers=2, num_experts=4, expert_capacity=8, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dropout_rate=0.0, router_jitter_noise=0.0,
    ),
    "switch-tiny-8": SwitchConfig(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
        num_decoder_layers=2, num_experts=8, expert_capacity=8, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dropout_rate=0.0, router_jitter_noise=0.0,
    ),
}


def get_config(name: str, **overrides: Any) -> SwitchConfig:
    """A named config (`switch-base-8/16/32/64/128`, `switch-small-16`, `switch-tiny-4/8`)."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; use one of {sorted(NAMED_CONFIGS)}")
    return NAMED_CONFIGS[name].replace(**overrides)


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
                capacity_min_experts=cfg.capacity_min_experts, dtype=cfg.jnp_dtype,
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
