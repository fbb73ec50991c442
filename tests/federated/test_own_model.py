"""The engine trains a MoE model it has never seen: a decoder-only language model defined here, through
a vmapped sub-MoE round with modular aggregation, checked against a client-by-client loop."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from fedmoe_jax.federated import expert_slots, gather_submodel
from fedmoe_jax.federated.client import make_local_train
from fedmoe_jax.federated.loop import make_round_step
from fedmoe_jax.federated.model import FederatedModel, as_federated_model
from fedmoe_jax.models import Decoding, MoELayer
from fedmoe_jax.models.moe import RoutingStats
from fedmoe_jax.models.objective import LossConfig

VOCAB, D, LAYERS, EXPERTS = 32, 16, 2, 4


class DecoderMoE(nn.Module):
    """A tiny causal LM: embedding, then per block causal attention and a MoE FFN (`moe_{i}`)."""

    num_experts: int

    @nn.compact
    def __call__(self, tokens, mask, expert_mask):
        x = nn.Embed(VOCAB, D)(tokens)
        causal = nn.make_attention_mask(mask, mask) * nn.make_causal_mask(tokens)
        stats = []
        for i in range(LAYERS):
            x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=D, name=f"attn_{i}")(
                nn.LayerNorm()(x), mask=causal)
            y, s = MoELayer(num_experts=self.num_experts, d_ff=32, dispatch="dropless",
                            name=f"moe_{i}")(nn.LayerNorm()(x), token_mask=mask, expert_mask=expert_mask[i])
            x = x + y
            stats.append(s)
        return nn.Dense(VOCAB)(x), jax.tree.map(lambda *a: jnp.stack(a), *stats)


@dataclasses.dataclass(frozen=True)
class DecoderLM:
    """The engine's view of `DecoderMoE`: where its MoE layers are, how to narrow it, its loss."""

    num_experts: int = EXPERTS
    num_moe_layers: int = LAYERS
    moe_layer_paths: tuple = tuple((f"moe_{i}",) for i in range(LAYERS))

    def narrow(self, valid):
        return dataclasses.replace(self, num_experts=int(np.shape(valid)[-1]))

    def loss(self, params, batch, expert_mask, rng):
        tokens, mask = batch["tokens"], batch["mask"]
        logits, stats = DecoderMoE(self.num_experts).apply({"params": params}, tokens, mask, expert_mask)
        target_mask = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
        loss = jnp.sum(ce * target_mask) / jnp.maximum(target_mask.sum(), 1.0)
        return loss, ({"loss": loss}, stats)


def _batches(rng, clients, steps, batch=4, length=8):
    """Each client's own token distribution (a shifted arithmetic pattern), `[C, K, B, T]`."""
    start = rng.integers(0, VOCAB, (clients, steps, batch, 1))
    stride = np.arange(1, clients + 1).reshape(clients, 1, 1, 1)
    tokens = (start + stride * np.arange(length)) % VOCAB
    return {"tokens": jnp.asarray(tokens, jnp.int32), "mask": jnp.ones(tokens.shape, jnp.int32)}


@pytest.fixture(scope="module")
def setup():
    model = DecoderLM()
    tokens, mask = jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)
    everything = jnp.ones((LAYERS, EXPERTS), bool)
    params = DecoderMoE(EXPERTS).init(jax.random.key(0), tokens, mask, everything)["params"]
    maps = np.zeros((3, LAYERS, EXPERTS), bool)
    maps[0, :, [0, 1]] = True
    maps[1, :, [1, 2]] = True
    maps[2, 0, [0, 1, 2]] = True
    maps[2, 1, 1] = True  # expert 3 is held by nobody
    indices, valid = expert_slots(maps, 4)
    batches = _batches(np.random.default_rng(0), 3, 2)
    weights = jnp.asarray([1.0, 2.0, 3.0])
    rngs = jax.random.split(jax.random.key(1), 3)
    return model, params, maps, indices, valid, batches, weights, rngs


def test_own_model_is_a_federated_model():
    assert isinstance(DecoderLM(), FederatedModel) and as_federated_model(DecoderLM()) == DecoderLM()
    with pytest.raises(TypeError, match="not a FederatedModel"):
        as_federated_model(object())
    # loss and decoding settings belong to a SwitchConfig: a model of one's own brings its own
    with pytest.raises(ValueError, match="its own loss"):
        as_federated_model(DecoderLM(), LossConfig(label_smoothing=0.0))
    with pytest.raises(ValueError, match="its own evaluate"):
        as_federated_model(DecoderLM(), decoding=Decoding(num_beams=2))
    assert as_federated_model(DecoderLM(), LossConfig(), Decoding()) == DecoderLM()


def test_vmapped_sub_moe_round_matches_a_client_by_client_loop(setup):
    model, params, maps, indices, valid, batches, weights, rngs = setup
    optimizer = optax.sgd(0.5)
    round_step = make_round_step(model, optimizer, chunk_size=None)
    out = round_step(params, indices, valid, batches, jnp.ones((3, 2), bool), weights, rngs)

    # the slow obvious reference: each client gathered, trained and summed on its own
    local_train = make_local_train(model.narrow(valid), optimizer)
    trained = []
    for c in range(3):
        sub = gather_submodel(params, model, indices[c])
        batch_c = {k: v[c] for k, v in batches.items()}
        trained.append(local_train(sub, batch_c, jnp.ones(2, bool), valid[c], rngs[c])[0])
    flat_global, flat_new = flatten_dict(params), flatten_dict(out.params)
    flat_clients = [flatten_dict(t) for t in trained]
    w = np.asarray(weights)
    for key, value in flat_global.items():
        if key[0].startswith("moe_"):
            layer = int(key[0].split("_")[1])
            for e in range(EXPERTS):
                holders = [c for c in range(3) if maps[c, layer, e]]
                want = np.asarray(value[:, e] if key[-2:] == ("router", "kernel") else value[e])
                if holders:
                    slots = [int(np.flatnonzero(np.asarray(indices[c, layer]) == e)[0]) for c in holders]
                    got = [np.asarray(flat_clients[c][key][:, s] if key[-2:] == ("router", "kernel")
                                      else flat_clients[c][key][s]) for c, s in zip(holders, slots)]
                    want = sum(w[c] * g for c, g in zip(holders, got)) / w[holders].sum()
                new = flat_new[key][:, e] if key[-2:] == ("router", "kernel") else flat_new[key][e]
                np.testing.assert_allclose(np.asarray(new), want, rtol=2e-5, atol=2e-6, err_msg=str(key))
        else:  # dense: FedAvg over the cohort
            want = sum(w[c] * np.asarray(flat_clients[c][key]) for c in range(3)) / w.sum()
            np.testing.assert_allclose(np.asarray(flat_new[key]), want, rtol=2e-5, atol=2e-6,
                                       err_msg=str(key))
    # expert 3 of layer 1 is held by nobody and does not move; the routing statistics are per expert
    unheld = out.params["moe_1"]["experts"]["wi"][3]
    np.testing.assert_array_equal(np.asarray(unheld), np.asarray(params["moe_1"]["experts"]["wi"][3]))
    assert not bool(out.held[1, 3]) and bool(out.held[0, 2])
    assert isinstance(out.routing, RoutingStats)
    assert out.routing.tokens_per_expert.shape == (3, LAYERS, EXPERTS)
    # client 0 holds experts 0 and 1: no token of it reaches another
    np.testing.assert_array_equal(np.asarray(out.routing.tokens_per_expert[0, :, 2:]), 0)


def test_rounds_of_the_own_model_learn(setup):
    model, params, maps, indices, valid, batches, weights, rngs = setup
    round_step = make_round_step(model, optax.adam(1e-2))
    losses = []
    for _ in range(6):
        out = round_step(params, indices, valid, batches, jnp.ones((3, 2), bool), weights, rngs)
        params = out.params
        losses.append(float(np.average(np.asarray(out.metrics["loss"]), weights=np.asarray(weights))))
    assert losses[-1] < 0.8 * losses[0], losses
