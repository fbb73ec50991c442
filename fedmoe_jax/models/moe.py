"""Mixture-of-experts layers as pure Flax (linen) modules.

A token-choice top-k router (float32, optional input jitter and bias), stacked experts
(`wi: [E, D, F]`, `wo: [E, F, D]`, optionally gated), two dispatch paths with the same semantics
where they overlap (capacity-based, as Switch / Hugging Face; and dropless, sorted tokens with
`jax.lax.ragged_dot`), the Switch load-balance and router z-losses, and explicit routing statistics.

Shape letters: B batch, T tokens, D d_model, F d_ff, E experts, K top-k, C expert capacity.

Expert restriction: every call may pass `expert_mask` (bool `[E]`). Absent experts get a large
finite negative router logit before softmax and top-k, so they receive no token, their router
column and weights receive exactly zero gradient, and a row whose allowed experts number exactly K
still gives finite probabilities (no NaN). A client's sub-MoE can also be materialized as a
gathered subset (`take_experts`) and written back (`put_experts`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedmoe_jax.models.dispatch import auto_block_rows, block_layout, resolve_impl, sort_choices
from fedmoe_jax.models.random import Dropout, hash_uniform

Array = jax.Array

# Large finite negative (not -inf): a fully masked row gives a finite softmax instead of NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

DISPATCH_MODES = ("capacity", "dropless")
DROPPED_TOKEN_MODES = ("zero", "hf_legacy")

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
    "swish": nn.silu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Activation function by its Hugging Face / T5 name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@flax.struct.dataclass
class RoutingStats:
    """Routing statistics of one MoE layer (or stacked over layers / clients in leading axes).

    Counts, not fractions, so that they add up over batches. Only real (non-padding) tokens count;
    a token's choice counts for the expert it chose even if capacity then dropped it.
    """

    tokens_per_expert: Array  # [..., E] real token-choices routed to each expert
    prob_mass: Array  # [..., E] summed router probability over real tokens
    dropped: Array  # [...] real token-choices dropped by capacity
    num_tokens: Array  # [...] real tokens
    lb_loss: Array  # [...] load-balance loss over the allowed experts (1 at uniform routing)
    z_loss: Array  # [...] router z-loss

    @property
    def activation_probs(self) -> Array:
        """p_{i,j} (the importance criterion): share of routed token-choices per expert, `[..., E]`."""
        total = self.tokens_per_expert.sum(-1, keepdims=True)
        return self.tokens_per_expert / jnp.where(total > 0, total, 1.0)

    @property
    def dropped_fraction(self) -> Array:
        """Fraction of real token-choices dropped by capacity, `[...]`."""
        total = self.tokens_per_expert.sum(-1)
        return self.dropped / jnp.where(total > 0, total, 1.0)

    def total(self, axis: int = 0) -> RoutingStats:
        """Merge the statistics stacked along `axis` (e.g. local steps) into one."""
        n = self.num_tokens.sum(axis)
        safe = jnp.where(n > 0, n, 1.0)
        return RoutingStats(
            tokens_per_expert=self.tokens_per_expert.sum(axis),
            prob_mass=self.prob_mass.sum(axis),
            dropped=self.dropped.sum(axis),
            num_tokens=n,
            lb_loss=(self.lb_loss * self.num_tokens).sum(axis) / safe,
            z_loss=(self.z_loss * self.num_tokens).sum(axis) / safe,
        )

    def __add__(self, other: RoutingStats) -> RoutingStats:
        """Merge statistics of two batches (loss values are token-weighted means)."""
        n = self.num_tokens + other.num_tokens
        safe = jnp.where(n > 0, n, 1.0)

        def mean(a, b):
            return (a * self.num_tokens + b * other.num_tokens) / safe

        return RoutingStats(
            tokens_per_expert=self.tokens_per_expert + other.tokens_per_expert,
            prob_mass=self.prob_mass + other.prob_mass,
            dropped=self.dropped + other.dropped,
            num_tokens=n,
            lb_loss=mean(self.lb_loss, other.lb_loss),
            z_loss=mean(self.z_loss, other.z_loss),
        )


def is_concrete(x: Any) -> bool:
    """True outside tracing (value checks are possible), False for a jit/vmap tracer."""
    return not isinstance(x, jax.core.Tracer)


def check_expert_mask(expert_mask: Array | None, num_experts: int, top_k: int) -> None:
    """Raise ValueError for a mask of the wrong shape/dtype or one allowing fewer than K experts.

    The count check runs when the mask is concrete (outside `jit`); under tracing only the shape
    and dtype can be checked.
    """
    if top_k < 1 or top_k > num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({num_experts})")
    if expert_mask is None:
        return
    if expert_mask.shape != (num_experts,):
        raise ValueError(
            f"expert_mask has shape {tuple(expert_mask.shape)}; expected ({num_experts},), "
            "one boolean per expert of the layer"
        )
    if expert_mask.dtype != jnp.bool_:
        raise ValueError(f"expert_mask must be boolean, got dtype {expert_mask.dtype}")
    if is_concrete(expert_mask):
        allowed = int(np.asarray(expert_mask).sum())
        if allowed < top_k:
            raise ValueError(
                f"expert_mask allows {allowed} expert(s) but top_k={top_k}; "
                f"keep at least {top_k} expert(s) in every MoE layer"
            )


def compute_capacity(
    tokens_per_group: int,
    num_experts: int,
    top_k: int = 1,
    expert_capacity: int | None = None,
    capacity_factor: float | None = None,
    min_capacity: int = 1,
) -> int:
    """Slots per expert per group (sequence): absolute, or `ceil(cf * T * K / E)`.

    An absolute `expert_capacity` (Hugging Face's `expert_capacity`, 64 for switch-base-*) wins;
    it is clipped to the group size since no expert can receive more tokens than that.
    """
    if expert_capacity is not None:
        if expert_capacity < 1:
            raise ValueError(f"expert_capacity must be >= 1, got {expert_capacity}")
        return int(min(expert_capacity, tokens_per_group))
    if capacity_factor is None or capacity_factor <= 0:
        raise ValueError("set expert_capacity (absolute) or a positive capacity_factor")
    cap = math.ceil(capacity_factor * tokens_per_group * top_k / num_experts)
    return int(min(max(cap, min_capacity), tokens_per_group))


def capacity_table(tokens_per_group: int, num_experts: int, top_k: int = 1,
                   expert_capacity: int | None = None, capacity_factor: float | None = None) -> np.ndarray:
    """`compute_capacity` for every allowed-expert count `a = 0..E`: `<int32>[E + 1]` (entry 0 unused).

    With a capacity factor the capacity of a restricted layer follows the experts its mask allows,
    `ceil(cf * T * K / a)`, so that a sub-MoE computes the same function whether it is applied as
    the full layer with a mask or gathered into any number of slots. A lookup (not float division
    under `jit`) keeps the traced value equal to the Python formula.
    """
    return np.asarray([compute_capacity(tokens_per_group, max(a, 1), top_k, expert_capacity,
                                        capacity_factor) for a in range(num_experts + 1)], np.int32)


def route(
    logits: Array, expert_mask: Array | None, top_k: int
) -> tuple[Array, Array, Array, Array]:
    """Mask, softmax and top-k.

    Args:
      logits: `<f32>[..., E]` raw router logits.
      expert_mask: `<bool>[E]` allowed experts, or None for all.
      top_k: K.
    Returns:
      masked logits `[..., E]`, probs `[..., E]`, top-k probs `[..., K]`, top-k indices `[..., K]`.
    """
    logits = logits.astype(jnp.float32)
    if expert_mask is not None:
        logits = jnp.where(expert_mask, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    top_probs, top_idx = jax.lax.top_k(probs, top_k)
    return logits, probs, top_probs, top_idx


def routing_stats(
    logits: Array,
    probs: Array,
    top_idx: Array,
    kept: Array,
    token_mask: Array,
    expert_mask: Array | None,
) -> RoutingStats:
    """Statistics and auxiliary losses of one layer over its real tokens.

    Args:
      logits: `<f32>[B, T, E]` masked logits. probs: `<f32>[B, T, E]`.
      top_idx: `<int>[B, T, K]`. kept: `<bool>[B, T, K]` choice not dropped by capacity.
      token_mask: `<f32>[B, T]` 1 for real tokens. expert_mask: `<bool>[E]` or None.
    """
    num_experts = probs.shape[-1]
    top_k = top_idx.shape[-1]
    real = token_mask.astype(jnp.float32)
    choice = jax.nn.one_hot(top_idx, num_experts, dtype=jnp.float32)  # [B, T, K, E]
    tokens_per_expert = jnp.einsum("btke,bt->e", choice, real)
    prob_mass = jnp.einsum("bte,bt->e", probs, real)
    num_tokens = real.sum()
    dropped = jnp.einsum("btk,bt->", 1.0 - kept.astype(jnp.float32), real)
    safe_n = jnp.where(num_tokens > 0, num_tokens, 1.0)
    frac_tokens = tokens_per_expert / (safe_n * top_k)
    frac_probs = prob_mass / safe_n
    allowed = num_experts if expert_mask is None else expert_mask.astype(jnp.float32).sum()
    lb_loss = allowed * jnp.sum(frac_tokens * frac_probs)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    z_loss = jnp.sum(real * log_z**2) / safe_n
    return RoutingStats(
        tokens_per_expert=tokens_per_expert,
        prob_mass=prob_mass,
        dropped=dropped,
        num_tokens=num_tokens,
        lb_loss=lb_loss,
        z_loss=z_loss,
    )


class Router(nn.Module):
    """Token-choice router: `x [B, T, D] -> logits [B, T, E]` in float32.

    Jitter (training only) multiplies the router input by U(1 - eps, 1 + eps), drawn from the
    'jitter' RNG stream; the experts still see the clean input.
    """

    num_experts: int
    jitter_noise: float = 0.0
    use_bias: bool = False
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(1.0)

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        x = x.astype(jnp.float32)
        if not deterministic and self.jitter_noise > 0:
            noise = hash_uniform(self.make_rng("jitter"), x.shape, 1.0 - self.jitter_noise,
                                 1.0 + self.jitter_noise)
            x = x * noise
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.num_experts),
                            self.param_dtype)
        logits = jnp.einsum("btd,de->bte", x, kernel.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.num_experts,), self.param_dtype)
            logits = logits + bias.astype(jnp.float32)
        return logits


class Experts(nn.Module):
    """E stacked feed-forward experts: `wi [E, D, F]` (or `wi_0`, `wi_1` when gated), `wo [E, F, D]`.

    `grouped` applies expert e to slot group e of a `[..., E, C, D]` tensor (capacity path);
    `ragged` applies them to expert-sorted rows with `jax.lax.ragged_dot` and `blocked` to blocks of
    expert-sorted rows with batched matmuls (dropless paths, `fedmoe_jax.models.dispatch`).
    """

    num_experts: int
    d_model: int
    d_ff: int
    activation: str = "relu"
    gated: bool = False
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        e, d, f = self.num_experts, self.d_model, self.d_ff
        wi_init = nn.initializers.normal(d**-0.5)
        wo_init = nn.initializers.normal(d**-0.5)  # as HF's SwitchTransformersSparseMLP init
        if self.gated:
            self.wi_0 = self.param("wi_0", wi_init, (e, d, f), self.param_dtype)
            self.wi_1 = self.param("wi_1", wi_init, (e, d, f), self.param_dtype)
        else:
            self.wi = self.param("wi", wi_init, (e, d, f), self.param_dtype)
        self.wo = self.param("wo", wo_init, (e, f, d), self.param_dtype)
        self.act = get_activation(self.activation)
        self.dropout = Dropout(self.dropout_rate)

    def _hidden(self, project: Callable[[Array], Array], deterministic: bool) -> Array:
        if self.gated:
            h = self.act(project(self.wi_0)) * project(self.wi_1)
        else:
            h = self.act(project(self.wi))
        return self.dropout(h, deterministic=deterministic)

    def grouped(self, x: Array, deterministic: bool = True) -> Array:
        """`x [..., E, C, D] -> [..., E, C, D]`."""
        x = x.astype(self.dtype)
        h = self._hidden(
            lambda w: jnp.einsum("...ecd,edf->...ecf", x, w.astype(self.dtype)), deterministic
        )
        return jnp.einsum("...ecf,efd->...ecd", h, self.wo.astype(self.dtype))

    def ragged(self, x: Array, group_sizes: Array, deterministic: bool = True) -> Array:
        """`x [N, D]` sorted by expert, `group_sizes [E]` -> `[N, D]` (rows past the groups: 0)."""
        x = x.astype(self.dtype)
        group_sizes = group_sizes.astype(jnp.int32)
        h = self._hidden(
            lambda w: jax.lax.ragged_dot(x, w.astype(self.dtype), group_sizes), deterministic
        )
        y = jax.lax.ragged_dot(h, self.wo.astype(self.dtype), group_sizes)
        valid = jnp.arange(x.shape[0]) < group_sizes.sum()
        return jnp.where(valid[:, None], y, 0.0)

    def blocked(self, x: Array, block_expert: Array, deterministic: bool = True) -> Array:
        """`x [NB, G, D]` blocks of rows of one expert each, `block_expert [NB]` -> `[NB, G, D]`:
        batched matmuls, each block with its expert's weights (gathered `[NB, D, F]`)."""
        x = x.astype(self.dtype)
        take = lambda w: jnp.take(w, block_expert, axis=0).astype(self.dtype)  # noqa: E731
        h = self._hidden(lambda w: jnp.einsum("ngd,ndf->ngf", x, take(w)), deterministic)
        return jnp.einsum("ngf,nfd->ngd", h, take(self.wo))


class MoELayer(nn.Module):
    """Sparse MoE feed-forward layer: `x [B, T, D] -> (y [B, T, D], RoutingStats)`.

    Gate of a chosen expert = its router probability (Switch: no renormalisation for K = 1, which is
    how the router gets gradients); `renormalize_gates` divides by the top-k sum instead.

    Capacity path: each sequence is a group; token-choices claim slots by a cumsum in token order,
    all top-1 choices before any top-2 choice; choices past the capacity are dropped (with a
    capacity factor, the capacity of the experts the mask allows: `MoELayer.capacity`). A dropped token's
    output is 0 (`dropped_token_mode="zero"`, HF >= #37123) or `gate * x`
    (`"hf_legacy"`, HF before 2025). Padding tokens (`token_mask == 0`) are not dispatched, take no
    capacity and output 0. Dropless path: every real token-choice is computed (`dropless_impl`).
    """

    num_experts: int
    d_ff: int
    top_k: int = 1
    dispatch: str = "capacity"
    expert_capacity: int | None = 64
    capacity_factor: float | None = None
    jitter_noise: float = 0.0
    router_bias: bool = False
    activation: str = "relu"
    gated: bool = False
    dropout_rate: float = 0.0
    dropped_token_mode: str = "zero"
    renormalize_gates: bool = False
    # With capacity_factor and an expert_mask: the fewest experts any mask of a call allows (0: top_k).
    # It sizes the static slot buffer; the capacity itself follows the mask (see `capacity_table`).
    capacity_min_experts: int = 0
    # Dropless path: "blocks" (batched matmuls over blocks of `block_rows` expert-sorted rows; 0:
    # `auto_block_rows`), "ragged" (`jax.lax.ragged_dot`) or "auto" (blocks on CPU): the same function.
    dropless_impl: str = "auto"
    block_rows: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,
        token_mask: Array | None = None,
        expert_mask: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, RoutingStats]:
        if x.ndim != 3:
            raise ValueError(f"MoELayer expects x of shape [B, T, D], got {tuple(x.shape)}")
        b, t, d = x.shape
        if token_mask is None:
            token_mask = jnp.ones((b, t), jnp.float32)
        elif token_mask.shape != (b, t):
            raise ValueError(
                f"token_mask has shape {tuple(token_mask.shape)}; expected {(b, t)} to match x"
            )
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch={self.dispatch!r}; use one of {DISPATCH_MODES}")
        if self.dropped_token_mode not in DROPPED_TOKEN_MODES:
            raise ValueError(
                f"dropped_token_mode={self.dropped_token_mode!r}; use one of {DROPPED_TOKEN_MODES}"
            )
        check_expert_mask(expert_mask, self.num_experts, self.top_k)
        real = token_mask.astype(jnp.float32)

        raw_logits = Router(
            self.num_experts, self.jitter_noise, self.router_bias, self.param_dtype, name="router"
        )(x, deterministic)
        logits, probs, gates, top_idx = route(raw_logits, expert_mask, self.top_k)
        # Per-token decisions for inspection: apply(..., mutable=["intermediates"]) returns them.
        self.sow("intermediates", "router_logits", logits)
        self.sow("intermediates", "expert_index", top_idx)
        if self.renormalize_gates:
            gates = gates / jnp.maximum(gates.sum(-1, keepdims=True), 1e-9)
        gates = gates * real[..., None]
        experts = Experts(
            self.num_experts, d, self.d_ff, self.activation, self.gated, self.dropout_rate,
            self.dtype, self.param_dtype, name="experts",
        )
        if self.dispatch == "capacity":
            y, kept = self._capacity(x, experts, gates, top_idx, real, expert_mask, deterministic)
        else:
            y, kept = self._dropless(x, experts, gates, top_idx, real, deterministic)
        if self.dropped_token_mode == "hf_legacy":
            unused_gate = jnp.sum(gates * (1.0 - kept.astype(jnp.float32)), axis=-1)
            y = y + unused_gate[..., None].astype(y.dtype) * x.astype(y.dtype)
        stats = routing_stats(logits, probs, top_idx, kept, real, expert_mask)
        return y.astype(self.dtype), stats

    def capacity(self, tokens_per_group: int, expert_mask: Array | None) -> tuple[int, Array | int]:
        """(static slots per expert C, capacity in force): equal unless a mask restricts the layer.

        Absolute `expert_capacity`: both are it (clipped to T). Capacity factor: the capacity is
        `ceil(cf * T * K / a)` for the `a` experts the mask allows (all E without a mask); the slot
        buffer is sized for `capacity_min_experts` allowed experts (default K), the fewest any call
        may allow. A mask allowing fewer has its capacity cut to the buffer (a concrete mask raises).
        """
        t, e, k = tokens_per_group, self.num_experts, self.top_k
        if self.expert_capacity is not None or expert_mask is None:
            cap = compute_capacity(t, e, k, self.expert_capacity, self.capacity_factor)
            return cap, cap
        fewest = self.capacity_min_experts or k
        if not k <= fewest <= e:
            raise ValueError(f"capacity_min_experts={self.capacity_min_experts} must be between top_k={k} "
                             f"and num_experts={e} (0: top_k)")
        allowed = expert_mask.astype(jnp.int32).sum()
        if is_concrete(expert_mask) and int(allowed) < fewest:
            raise ValueError(f"expert_mask allows {int(allowed)} experts but capacity_min_experts={fewest}; "
                             "lower capacity_min_experts to the fewest experts a mask allows")
        buffer = compute_capacity(t, fewest, k, None, self.capacity_factor)
        table = jnp.asarray(capacity_table(t, e, k, None, self.capacity_factor))
        return buffer, jnp.minimum(table[allowed], buffer)

    def _capacity(self, x, experts, gates, top_idx, real, expert_mask, deterministic):
        b, t, _ = x.shape
        e, k = self.num_experts, self.top_k
        cap, in_force = self.capacity(t, expert_mask)
        choice = jax.nn.one_hot(top_idx, e, dtype=jnp.int32) * (real[..., None, None] > 0)
        # Priority: K-major so that every top-1 choice outranks any top-2 choice; token order within.
        by_k = jnp.swapaxes(choice, 1, 2).reshape(b, k * t, e)
        position = (jnp.cumsum(by_k, axis=1) - 1).reshape(b, k, t, e).swapaxes(1, 2)
        fits = (position < in_force) & (choice > 0)  # [B, T, K, E]
        kept = fits.any(-1)
        slot = jax.nn.one_hot(jnp.where(fits, position, cap), cap, dtype=jnp.float32)
        dispatch_k = slot * fits[..., None]  # [B, T, K, E, C]
        dispatch = dispatch_k.sum(2)
        combine = jnp.einsum("btkec,btk->btec", dispatch_k, gates)
        expert_in = jnp.einsum("btec,btd->becd", dispatch.astype(self.dtype), x.astype(self.dtype))
        expert_out = experts.grouped(expert_in, deterministic)
        y = jnp.einsum("btec,becd->btd", combine.astype(self.dtype), expert_out)
        return y, kept

    def _dropless(self, x, experts, gates, top_idx, real, deterministic):
        b, t, d = x.shape
        e, k = self.num_experts, self.top_k
        n = b * t * k
        flat_real = jnp.repeat(real.reshape(b * t), k) > 0
        # Padding choices sort after the real ones (key E) and are never computed.
        order, sort_key, group_sizes = sort_choices(top_idx.reshape(n), flat_real, e)
        xs = x.reshape(b * t, d)[order // k]
        if resolve_impl(self.dropless_impl) == "ragged":
            ys = experts.ragged(xs, group_sizes, deterministic)
            per_choice = jnp.zeros_like(ys).at[order].set(ys)
        else:
            g = self.block_rows or auto_block_rows(n, e)
            row, block_expert = block_layout(sort_key[order], group_sizes, g)
            nb = block_expert.shape[0]
            rows = jnp.zeros((nb * g, d), xs.dtype).at[row].set(xs, mode="drop")
            out = experts.blocked(rows.reshape(nb, g, d), block_expert, deterministic).reshape(nb * g, d)
            # each choice reads its own row (an [N] index permutation, not a second [N, D] scatter)
            row_of_choice = jnp.zeros_like(row).at[order].set(row)
            per_choice = out.at[row_of_choice].get(mode="fill", fill_value=0)
        per_choice = per_choice.reshape(b, t, k, d)
        y = jnp.einsum("btkd,btk->btd", per_choice, gates.astype(per_choice.dtype))
        kept = jnp.ones((b, t, k), bool)
        return y, kept


EXPERT_PARAM_NAMES = ("wi", "wi_0", "wi_1", "wo")


def take_experts(layer_params: Mapping[str, Any], indices: Array) -> dict[str, Any]:
    """Gather a sub-MoE of one layer: experts `indices [S]` of `{'router': ..., 'experts': ...}`.

    The result has the same structure with an expert axis of width S (router kernel `[D, S]`), and
    is applied by a `MoELayer(num_experts=S)`; pair it with a validity mask `[S]` for padded slots.
    """
    router = {"kernel": jnp.take(layer_params["router"]["kernel"], indices, axis=1)}
    if "bias" in layer_params["router"]:
        router["bias"] = jnp.take(layer_params["router"]["bias"], indices, axis=0)
    experts = {
        name: jnp.take(w, indices, axis=0) for name, w in layer_params["experts"].items()
    }
    return {"router": router, "experts": experts}


def put_experts(
    layer_params: Mapping[str, Any], sub_params: Mapping[str, Any], indices: Array,
    valid: Array | None = None,
) -> dict[str, Any]:
    """Inverse of `take_experts`: write the S gathered experts back at `indices` where `valid`."""
    if valid is None:
        valid = jnp.ones(indices.shape, bool)

    def put(full, sub, axis):
        # Invalid (padding) slots point past the end and are dropped by the scatter.
        target = jnp.where(valid, indices, full.shape[axis])
        idx = [slice(None)] * full.ndim
        idx[axis] = target
        return full.at[tuple(idx)].set(sub.astype(full.dtype), mode="drop")

    router = {"kernel": put(layer_params["router"]["kernel"], sub_params["router"]["kernel"], 1)}
    if "bias" in layer_params["router"]:
        router["bias"] = put(layer_params["router"]["bias"], sub_params["router"]["bias"], 0)
    experts = {
        name: put(w, sub_params["experts"][name], 0)
        for name, w in layer_params["experts"].items()
    }
    return {"router": router, "experts": experts}
