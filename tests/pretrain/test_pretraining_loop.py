"""The pretraining loop (`fedmoe_jax.pretrain.train`) on a tiny model with the embedded tokenizer:
the loss falls, the schedule and optimizer are optax's, an interrupted run resumes bit-identically,
and `input_dependence` measures what it claims."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pretraining_helpers import FAST, assert_same, tiny_config

from fedmoe_jax.data import embedded_tokenizer
from fedmoe_jax.data.span_corruption import SpanCorruptionStream, embedded_documents
from fedmoe_jax.federated.optimizers import OPTIMIZERS, make_optimizer
from fedmoe_jax.federated.preemption import RunInterrupted
from fedmoe_jax.federated.run_checkpoint import CheckpointError
from fedmoe_jax.models import SwitchTransformer
from fedmoe_jax.pretrain import train as pt


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def tiny(tok):
    return tiny_config(tok)


def test_interrupted_pretraining_resumes_bit_identical(tmp_path, monkeypatch, tok, tiny):
    """A stop request at step 7 (checkpoints every 5 steps) saves step 7 and raises RunInterrupted;
    the same call resumes there and ends with the uninterrupted params and loss history."""
    docs = embedded_documents(tok)[:400]
    kw = dict(steps=12, progress=False, documents=docs, **FAST)
    params, history = pt.pretrain(tiny, tok, **kw)

    calls = []

    def stop_at_7():
        calls.append(1)
        return signal.SIGTERM if len(calls) == 7 else None

    monkeypatch.setattr(pt, "requested_stop", stop_at_7)
    ckpt = str(tmp_path / "partial")
    with pytest.raises(RunInterrupted, match="after step 7; checkpoint of step 7"):
        pt.pretrain(tiny, tok, checkpoint_dir=ckpt, checkpoint_every=5, **kw)
    assert sorted(os.listdir(ckpt)) == ["5", "7"]
    monkeypatch.setattr(pt, "requested_stop", lambda: None)
    again, again_history = pt.pretrain(tiny, tok, checkpoint_dir=ckpt, checkpoint_every=5, **kw)
    assert again_history == history
    assert_same(again, params)
    with pytest.raises(CheckpointError, match="steps: saved 12, now 13"):  # a different pretraining
        pt.pretrain(tiny, tok, checkpoint_dir=ckpt, checkpoint_every=5, **{**kw, "steps": 13})


def test_learning_rate_schedule_is_optax_warmup_cosine():
    import optax

    for steps, lr, warmup in [(50, 3e-3, 10), (7, 1e-2, 100), (1, 1e-3, 0)]:
        ref = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps // 2), steps)
        np.testing.assert_allclose(pt.learning_rate_schedule(steps, lr, warmup),
                                   [float(ref(i)) for i in range(steps)], rtol=1e-5, atol=1e-9)


def test_pretrain_loss_decreases(tok, tiny):
    stats = {}
    params, history = pt.pretrain(tiny, tok, steps=40, progress=False, stats=stats,
                                  **{**FAST, "learning_rate": 1e-2, "warmup_steps": 4})
    assert len(history) == 40 and all(np.isfinite(history))
    assert history[0] > 7.5  # about ln(4096) = 8.3 at init
    assert np.mean(history[-5:]) < history[0] - 1.5
    assert stats["steps_per_second"] > 0 and stats["compile_seconds"] > 0
    health = stats["input_dependence"]
    assert set(health) == {"own_ce", "other_ce", "gap", "span_corruption_gap"}
    assert np.isfinite(health["gap"]) and np.isfinite(health["span_corruption_gap"])
    ref = SwitchTransformer(tiny).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                                       jnp.ones((1, 4), jnp.int32))["params"]
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, ref)


def test_input_dependence_is_zero_without_cross_attention_and_matches_direct_ce(tok, tiny):
    """own_ce is the plain span-corruption CE; with the cross-attention outputs zeroed the decoder
    cannot see the encoder, so the CE with another example's inputs is the same (gap exactly 0)."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    from fedmoe_jax.models import shift_right, switch_loss

    cfg = pt.train_config(tiny)
    params = SwitchTransformer(cfg).init(jax.random.key(3), jnp.ones((1, 4), jnp.int32),
                                         jnp.ones((1, 4), jnp.int32))["params"]
    docs = embedded_documents(tok)
    stream = SpanCorruptionStream([docs[i] for i in range(200)], 32, 8, sentinel_start=4095)
    batches = [next(stream.batches(6))]
    health = pt.input_dependence(cfg, params, batches)
    b = {k: jnp.asarray(v) for k, v in batches[0].items()}
    out = SwitchTransformer(cfg).apply({"params": params}, b["inputs"], shift_right(b["targets"]),
                                       b["input_mask"], b["target_mask"])
    direct = switch_loss(out, b["targets"], b["target_mask"], label_smoothing=0.0)[1]["ce"]
    np.testing.assert_allclose(health["own_ce"], float(direct), rtol=1e-5)
    assert abs(health["gap"]) > 1e-4  # a random model's predictions do depend on its input

    flat = flatten_dict(params)
    blind = unflatten_dict({k: (jnp.zeros_like(v) if k[0] == "decoder" and "cross_attention" in k
                                and k[-2] == "o" else v) for k, v in flat.items()})
    zero = pt.input_dependence(cfg, blind, batches)
    assert zero["gap"] == 0.0 and zero["own_ce"] == zero["other_ce"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_injected_optimizer_is_make_optimizer_at_the_injected_rate(name):
    params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda x: 0.1 * x - 0.2, params)
    tx = pt.injected_optimizer(name, 0.01)
    state = tx.init(params)
    state = state._replace(hyperparams={**state.hyperparams, "learning_rate": 0.05})
    updates, _ = tx.update(grads, state, params)
    ref = make_optimizer(name, 0.05, 0.01)
    expected, _ = ref.update(grads, ref.init(params), params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5)  # injected rate: a float32 array, not a float
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        pt.injected_optimizer("sgd", 0.0)
