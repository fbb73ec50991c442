"""Span corruption (hand-checked), the packed stream, pretraining, the pretrained-model cache and the
CLI entry `run_pretrain`, on a tiny model with the embedded tokenizer."""

import json
import logging
import os
import shutil
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmoe_jax import pretrain as pt
from fedmoe_jax.checkpoints.hf_switch import WEIGHTS_FILE
from fedmoe_jax.data import embedded_tokenizer
from fedmoe_jax.federated.optimizers import make_optimizer
from fedmoe_jax.federated.preemption import RunInterrupted
from fedmoe_jax.federated.run_checkpoint import CheckpointError
from fedmoe_jax.models import SwitchTransformer, get_config

EOS = 1
S = 99  # sentinel_start in the hand-made cases
# Small, fast pretraining hyperparameters shared by the cache tests (one compiled program).
# Every pretraining here has these shapes, so the tests share one compiled step per model config.
FAST = dict(batch_size=8, input_len=32, target_len=8, warmup_steps=2, learning_rate=3e-3)


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def tiny(tok):
    # The config a caller would fine-tune: dropout on, its own capacity. Pretraining overrides both.
    return get_config("switch-tiny-4", vocab_size=tok.vocab_size, dropout_rate=0.1, expert_capacity=4)


class FixedChoice:
    """An rng whose `choice` returns the given cut positions (0-based, before the +1) in call order."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def choice(self, n, k, replace=False):
        out = np.asarray(self.draws.pop(0))
        assert out.shape == (k,) and not replace and (out < n).all()
        return out


def reconstruct(inputs, targets, floor):
    """Merge targets back into inputs: every sentinel (id >= floor) of the inputs -> its span."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans, current = {}, None
    for t in targets[:-1].tolist():
        if t >= floor:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1].tolist():
        out.extend(spans.pop(t) if t >= floor else [t])
    assert not spans  # every target span was used
    return np.array(out)


def test_span_corruption_hand_computed_two_spans():
    # 10 tokens, density 0.4 -> 4 noise tokens; mean span 2 -> 2 spans. Noise 4 = 1 + 3 (cut after 1),
    # kept 6 = 2 + 4 (cut after 2), interleaved kept first: K K N K K K K N N N.
    tokens = np.arange(5, 15)
    inputs, targets = pt.span_corruption(tokens, 0.4, 2.0, rng=FixedChoice([0], [1]), sentinel_start=S)
    assert inputs.tolist() == [5, 6, S, 8, 9, 10, 11, S - 1, EOS]
    assert targets.tolist() == [S, 7, S - 1, 12, 13, 14, EOS]
    assert inputs.dtype == targets.dtype == np.int32


def test_span_corruption_hand_computed_one_span():
    # 20 tokens at T5's 0.15 / 3: round(3.0) = 3 noise tokens in round(1.0) = 1 span, which T5's recipe
    # places at the end (kept span first): whatever the rng.
    for seed in range(3):
        inputs, targets = pt.span_corruption(np.arange(10, 30), rng=np.random.default_rng(seed),
                                             sentinel_start=S)
        assert inputs.tolist() == list(range(10, 27)) + [S, EOS]
        assert targets.tolist() == [S, 27, 28, 29, EOS]


def test_noise_span_counts_follow_t5_rounding():
    assert pt.noise_span_counts(70) == (10, 3)  # round(10.5) = 10 (half to even, like tf.round)
    assert pt.noise_span_counts(71) == (11, 4)
    assert pt.noise_span_counts(3) == (1, 1)  # at least one noise token and one span
    assert pt.noise_span_counts(2, 0.9) == (1, 1)  # at most length - 1 noise tokens
    assert pt.noise_span_counts(1) == (0, 0) and pt.noise_span_counts(50, 0.0) == (0, 0)
    assert pt.chunk_length(64, 16) == 70 and pt.corrupted_lengths(70) == (64, 14)
    assert pt.corrupted_lengths(71)[0] == 65  # one more token would not fit


@pytest.mark.parametrize("density,mean", [(0.15, 3.0), (0.3, 2.0), (0.5, 1.0), (0.15, 8.0)])
def test_span_corruption_properties(density, mean):
    rng = np.random.default_rng(0)
    floor = 1000
    for length in list(range(0, 40)) + [64, 70, 129, 500]:
        tokens = rng.integers(3, floor, length)
        noise, spans = pt.noise_span_counts(length, density, mean)
        inputs, targets = pt.span_corruption(tokens, density, mean, rng=np.random.default_rng(length),
                                             sentinel_start=2000)
        assert (inputs.size, targets.size) == pt.corrupted_lengths(length, density, mean)
        in_sent, tgt_sent = inputs[inputs >= floor], targets[targets >= floor]
        assert in_sent.size == tgt_sent.size == spans
        assert in_sent.tolist() == tgt_sent.tolist() == list(range(2000, 2000 - spans, -1))
        assert targets.size - 1 - spans == noise  # noise fraction = round(length * density)
        assert inputs[-1] == targets[-1] == EOS and (inputs == EOS).sum() == (targets == EOS).sum() == 1
        np.testing.assert_array_equal(reconstruct(inputs, targets, floor), tokens)
        if spans:
            assert inputs[0] < floor  # T5 starts with a kept span and ends with a noise span
            assert inputs[-2] >= floor
        again = pt.span_corruption(tokens, density, mean, rng=np.random.default_rng(length),
                                   sentinel_start=2000)
        np.testing.assert_array_equal(again[0], inputs)
        np.testing.assert_array_equal(again[1], targets)


def test_span_corruption_depends_on_rng():
    tokens = np.arange(3, 203)
    outs = {tuple(pt.span_corruption(tokens, rng=np.random.default_rng(s), sentinel_start=999)[0])
            for s in range(5)}
    assert len(outs) == 5


def test_span_lengths_are_random_partitions():
    # Mean span length and noise fraction over many draws: noise 30 of 200 in 10 spans (mean 3).
    rng = np.random.default_rng(1)
    lengths = []
    for _ in range(300):
        mask = pt.random_spans_noise_mask(200, rng=rng)
        assert mask.sum() == 30 and not mask[0] and mask[-1]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        runs = edges[1::2] - edges[::2]
        assert runs.size == 10
        lengths.extend(runs.tolist())
    assert np.mean(lengths) == 3.0 and max(lengths) > 6  # not all equal: random compositions


def test_stream_packs_deterministically_and_reserves_sentinels():
    docs = [np.arange(3, 3 + n, dtype=np.int32) for n in range(5, 60)]
    docs[3] = np.array([4095, 4094, 7, 8, 4093, 4092], np.int32)  # ids in / next to the sentinel range
    stream = pt.SpanCorruptionStream(docs, input_len=64, target_len=16, seed=3)
    assert stream.length == 70 and stream.num_sentinels == 3
    a = [next(it) for it in [stream.batches(8)] for _ in range(30)]
    b = [next(it) for it in [stream.batches(8)] for _ in range(30)]
    c = next(pt.SpanCorruptionStream(docs, seed=4).batches(8))
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(a[0]["inputs"], c["inputs"])
    batch = a[0]
    assert batch["inputs"].shape == (8, 64) and batch["targets"].shape == (8, 16)
    assert (batch["input_mask"].sum(1) == 64).all() and (batch["target_mask"].sum(1) == 14).all()
    assert (batch["targets"][:, 14:] == 0).all()
    seen = []
    for batch in a:
        for inp, tgt in zip(batch["inputs"], batch["targets"][:, :14]):
            assert (inp >= 4093).sum() == 3 and (tgt >= 4093).sum() == 3  # only sentinels up there
            seen.append(reconstruct(inp, tgt, 4093))
    flat = np.concatenate(seen)
    assert 4092 in flat and 2 in flat  # 4092 is not reserved; 4095..4093 became <unk> (2)
    # The first epoch is the documents in one seeded order, cut into 70-token chunks.
    total = sum(d.size for d in docs)
    order = np.random.default_rng([3, 0]).permutation(len(docs))
    expected = np.concatenate([docs[i] for i in order])[: 70 * (total // 70)].reshape(-1, 70)
    expected = np.where(expected >= 4093, 2, expected)
    np.testing.assert_array_equal(np.stack(seen[: len(expected)]), expected)


def test_reconstruction_targets_are_the_chunk_start_uncorrupted():
    """reconstruct_fraction=1: inputs span-corrupted as before, every target the chunk's first 15
    tokens + EOS; 0.5: about half of them, the rest span-corruption targets (with sentinels)."""
    docs = [np.arange(3, 3 + n, dtype=np.int32) for n in range(5, 60)]
    plain = next(pt.SpanCorruptionStream(docs, seed=3).batches(8))
    it = pt.SpanCorruptionStream(docs, seed=3, reconstruct_fraction=1.0).batches(8)
    batch = next(it)
    np.testing.assert_array_equal(batch["inputs"][0], plain["inputs"][0])  # same corruption draw
    for i in range(8):
        assert (batch["inputs"][i] >= 4093).sum() == 3  # still corrupted: 3 sentinels
        np.testing.assert_array_equal(batch["targets"][i], np.append(it.chunks[i][:15], EOS))
        assert batch["target_mask"][i].sum() == 16
    mixed = [next(it) for it in [pt.SpanCorruptionStream(docs, seed=3, reconstruct_fraction=0.5).batches(8)]
             for _ in range(8)]
    whole = np.array([(b["targets"] < 4093).all(1) for b in mixed]).ravel()  # no sentinel: reconstructed
    assert 0.3 < whole.mean() < 0.7


def test_stream_state_resumes_exactly():
    docs = [np.arange(3, 3 + n, dtype=np.int32) for n in range(5, 60)]
    stream = pt.SpanCorruptionStream(docs, seed=3)
    straight = stream.batches(8)
    expected = [next(straight) for _ in range(25)]  # 200 chunks: past the first epoch (~22 chunks)
    it = stream.batches(8)
    for _ in range(11):
        next(it)
    state = json.loads(json.dumps(it.state()))  # it goes through checkpoint metadata as JSON
    assert state["epoch"] > 1
    resumed = stream.batches(8, state)
    for want in expected[11:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_interrupted_pretraining_resumes_bit_identical(tmp_path, monkeypatch, tok, tiny):
    """A stop request at step 7 (checkpoints every 5 steps) saves step 7 and raises RunInterrupted;
    the same call resumes there and ends with the uninterrupted params and loss history."""
    docs = pt.embedded_documents(tok)[:400]
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


def test_corpus_is_train_texts_only():
    from fedmoe_jax.data import load_embedded_benchmark

    ordered = pt.corpus_texts()
    texts = set(ordered)
    assert len(ordered) == len(texts)  # unique
    bench = load_embedded_benchmark()
    train = {t for task in bench.values() for t in [*task["train"].inputs, *task["train"].targets]}
    assert texts == train
    # WordNet repeats some texts across synsets (so across splits); those only held out must not leak.
    held_out = {t for task in bench.values() for s in ("validation", "test")
                for t in [*task[s].inputs, *task[s].targets]} - train
    assert len(held_out) > 10000 and not texts & held_out


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


def counting(monkeypatch):
    calls = []
    original = pt.pretrain

    def wrapped(*args, **kwargs):
        calls.append(kwargs.get("steps"))
        return original(*args, **kwargs)

    monkeypatch.setattr(pt, "pretrain", wrapped)
    return calls


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_cache_hit_miss_and_rebuild(tmp_path, monkeypatch, caplog, tok, tiny):
    calls = counting(monkeypatch)
    cache = str(tmp_path / "cache")
    first, info = pt.pretrained_entry(tiny, 6, cache, progress=False, tokenizer=tok, **FAST)
    assert calls == [6] and not info["cached"]
    path = info["path"]
    assert os.path.basename(path).startswith("d32-l2x2-e4-v4096-s6-")
    assert len(os.path.basename(path).rsplit("-", 1)[1]) == 12
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "pretrain.json"]
    assert os.path.exists(path + ".lock")
    assert not [f for f in os.listdir(cache) if ".tmp-" in f or ".partial" in f]  # nothing left over
    meta = json.loads(open(os.path.join(path, "pretrain.json")).read())
    assert len(meta["loss_history"]) == 6 and meta["key"]["hyperparameters"]["steps"] == 6
    assert meta["key"]["model"]["dropout_rate"] == 0.0 and meta["key"]["model"]["expert_capacity"] is None
    # Shapes of the requested config.
    ref = SwitchTransformer(tiny).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                                       jnp.ones((1, 4), jnp.int32))["params"]
    assert jax.tree.map(np.shape, first) == jax.tree.map(np.shape, ref)

    # Hit: no training, identical arrays. The requested dropout / capacity do not enter the key.
    second = pt.pretrained_params(tiny.replace(dropout_rate=0.0, expert_capacity=8), 6, cache,
                                  progress=False, tokenizer=tok, **FAST)
    assert calls == [6]
    assert_same(first, second)

    # Other steps, seed or model: other entries, trained.
    other_steps = pt.pretrained_entry(tiny, 7, cache, progress=False, tokenizer=tok, **FAST)[1]["path"]
    other_seed = pt.pretrained_entry(tiny, 6, cache, seed=1, progress=False, tokenizer=tok, **FAST)
    # (A model field that does not change the compiled step, so the test compiles nothing new.)
    other_model = pt.pretrained_entry(tiny.replace(router_z_loss_coef=0.01), 6, cache, progress=False,
                                      tokenizer=tok, **FAST)[1]["path"]
    other_hp = pt.pretrained_entry(tiny, 6, cache, progress=False, tokenizer=tok,
                                   **{**FAST, "learning_rate": 1e-3})[1]["path"]
    assert calls == [6, 7, 6, 6, 6]
    assert len({path, other_steps, other_seed[1]["path"], other_model, other_hp}) == 5
    assert not np.array_equal(other_seed[0]["shared"]["embedding"], first["shared"]["embedding"])

    # A corrupt entry (unreadable safetensors) is rebuilt with a warning, never loaded.
    weights = os.path.join(path, WEIGHTS_FILE)
    with open(weights, "wb") as f:
        f.write(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="fedmoe_jax.pretrain"):
        rebuilt, info = pt.pretrained_entry(tiny, 6, cache, progress=False, tokenizer=tok, **FAST)
    assert calls == [6, 7, 6, 6, 6, 6] and not info["cached"]
    assert any("corrupt" in r.getMessage() and path in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(rebuilt["shared"]["embedding"], first["shared"]["embedding"], atol=1e-6)

    # A silently changed tensor (readable file, wrong bytes) is caught by the SHA-256 too.
    blob = bytearray(open(weights, "rb").read())
    blob[-5] ^= 0xFF
    open(weights, "wb").write(bytes(blob))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedmoe_jax.pretrain"):
        pt.pretrained_params(tiny, 6, cache, progress=False, tokenizer=tok, **FAST)
    assert len(calls) == 7 and any("SHA-256" in r.getMessage() for r in caplog.records)
    # A missing pretrain.json as well.
    os.remove(os.path.join(path, "pretrain.json"))
    pt.pretrained_params(tiny, 6, cache, progress=False, tokenizer=tok, **FAST)
    assert len(calls) == 8
    assert pt.pretrained_entry(tiny, 6, cache, progress=False, tokenizer=tok, **FAST)[1]["cached"]
    assert len(calls) == 8


def test_shipped_entry_comes_first_and_a_broken_one_falls_back_to_the_cache(tmp_path, monkeypatch, caplog,
                                                                             tok, tiny):
    calls = counting(monkeypatch)
    built, info = pt.pretrained_entry(tiny, 6, str(tmp_path / "build"), progress=False, tokenizer=tok,
                                      shipped_dir=None, **FAST)
    assert calls == [6] and not info["shipped"]
    meta = json.loads(open(os.path.join(info["path"], "pretrain.json")).read())
    assert meta["built_with"]["jax"] == jax.__version__ and meta["built_with"]["cpu_count"] == os.cpu_count()
    assert set(meta["built_with"]) == {"cpu", "isa", "cpu_count", "jax", "jaxlib", "xla_flags"}
    assert set(meta["built_with"]["isa"]) <= set(pt.ISA_FLAGS)
    shipped = tmp_path / "shipped"
    shutil.copytree(info["path"], shipped / os.path.basename(info["path"]))

    # Shipped: loaded as is, no training, nothing written to the (empty) cache.
    cache = tmp_path / "cache"
    params, got = pt.pretrained_entry(tiny, 6, str(cache), progress=False, tokenizer=tok,
                                      shipped_dir=str(shipped), **FAST)
    assert calls == [6] and got["shipped"] and got["cached"]
    assert got["path"] == str(shipped / os.path.basename(info["path"]))
    assert_same(params, built)
    assert not cache.exists() or not [f for f in os.listdir(cache) if not f.endswith(".lock")]
    # ... even when the cache holds an entry under the same key (another machine's build).
    cached = pt.pretrained_entry(tiny, 6, str(cache), progress=False, tokenizer=tok, shipped_dir=None, **FAST)
    assert calls == [6, 6] and cached[1]["path"].startswith(str(cache))
    assert pt.pretrained_entry(tiny, 6, str(cache), progress=False, tokenizer=tok, shipped_dir=str(shipped),
                               **FAST)[1]["path"] == got["path"]
    # Another key is not in the shipped folder: the cache (here: a build) serves it.
    other = pt.pretrained_entry(tiny, 7, str(cache), progress=False, tokenizer=tok, shipped_dir=str(shipped),
                                **FAST)[1]
    assert calls == [6, 6, 7] and not other["shipped"]

    # A shipped entry that does not verify (say, a partial checkout) warns and falls back to the cache.
    weights = shipped / os.path.basename(info["path"]) / WEIGHTS_FILE
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="fedmoe_jax.pretrain"):
        _, fallback = pt.pretrained_entry(tiny, 6, str(cache), progress=False, tokenizer=tok,
                                          shipped_dir=str(shipped), **FAST)
    assert calls == [6, 6, 7] and fallback["cached"] and not fallback["shipped"]
    assert fallback["path"] == cached[1]["path"]
    assert any("does not verify" in r.getMessage() and "SHA-256" in r.getMessage() for r in caplog.records)


def test_cpu_scale_configs_start_from_the_shipped_models(tmp_path, monkeypatch):
    """configs/cpu.py's two models (switch-small-16 and the baselines' 4-expert sibling) ship with the
    package: no machine trains them (a rebuild elsewhere differs in the last bits)."""
    import importlib.util

    from fedmoe_jax import experiment
    from fedmoe_jax.checkpoints import load_hf_switch

    def no_training(*args, **kwargs):
        raise AssertionError("the CPU-scale configs trained a model instead of loading the shipped one")

    monkeypatch.setattr(pt, "pretrain", no_training)
    spec = importlib.util.spec_from_file_location(
        "cpu_config", os.path.join(os.path.dirname(__file__), "..", "configs", "cpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = set()
    for method in ("fedmoe", "fedprox"):
        config = module.get_config(f"standard_hetero_t,{method}")
        full = method in experiment.FULL_MODEL_METHODS
        cfg = experiment.model_config(config, experiment.load_tokenizer(config), full)
        params, info = pt.pretrained_entry(cfg, config.model.pretrain_steps or pt.DEFAULT_STEPS,
                                           str(tmp_path), progress=False)
        assert info["shipped"] and os.path.dirname(info["path"]) == pt.SHIPPED_DIR, info["path"]
        assert cfg.num_experts == (config.model.baseline_num_experts if full else 16)
        _, direct = load_hf_switch(info["path"])
        np.testing.assert_array_equal(params["shared"]["embedding"], direct["shared"]["embedding"])
        assert_same(experiment.initial_params(config, cfg, full, progress=False)[1], params)
        seen.add(os.path.basename(info["path"]))
        # compute-only fields (remat) name the same model: switching them never retrains it
        steps = config.model.pretrain_steps or pt.DEFAULT_STEPS
        for remat in ("full", "dots"):
            other = cfg.replace(remat=remat)
            assert pt.entry_name(pt.cache_key(other, steps)) == os.path.basename(info["path"])
    assert sorted(seen) == sorted(os.listdir(pt.SHIPPED_DIR))


def test_build_false_refuses_to_pretrain_a_missing_model(tmp_path, tiny, tok, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("build=False pretrained a model")

    monkeypatch.setattr(pt, "pretrain", no_training)
    with pytest.raises(pt.PretrainedModelMissing, match="neither shipped .* nor cached in") as info:
        pt.pretrained_params(tiny, 6, str(tmp_path), tokenizer=tok, build=False)
    assert pt.entry_name(pt.cache_key(tiny, 6, tokenizer=tok)) in str(info.value)
    assert not [f for f in os.listdir(tmp_path) if not f.endswith(".lock")]  # nothing built or left

    # the CLI path: a one-line ConfigError naming the key that turns building back on
    from fedmoe_jax.experiment import initial_params
    from fedmoe_jax.experiment.config import ConfigError, default_config

    config = default_config()
    config.model.path, config.model.build_pretrained = str(tmp_path), False
    with pytest.raises(ConfigError, match="build_pretrained=True"):
        initial_params(config, tiny, False, progress=False)


def test_cache_rejects_unknown_hyperparameters(tmp_path, tiny, tok):
    with pytest.raises(TypeError, match="learning_rat"):
        pt.pretrained_params(tiny, 6, str(tmp_path), tokenizer=tok, learning_rat=1e-3)


def test_parallel_builders_train_once(tmp_path, monkeypatch, tok, tiny):
    calls = counting(monkeypatch)
    cache = str(tmp_path)
    results, errors = [None, None], []
    barrier = threading.Barrier(2)

    def worker(i):
        try:
            barrier.wait()
            results[i] = pt.pretrained_entry(tiny, 6, cache, progress=False, tokenizer=tok, **FAST)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and calls == [6]
    assert sorted(r[1]["cached"] for r in results) == [False, True]
    assert_same(results[0][0], results[1][0])


def test_run_pretrain_writes_summary_and_plot(tmp_path, tok):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pretrain_config", os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.method == "pretrain" and config.num_rounds == 0 and config.model.name == "switch-small-16"
    assert config.steps == pt.DEFAULT_STEPS and config.cache_dir == "runs/pretrained"
    assert {k: config[k] for k in pt.DEFAULTS} == pt.DEFAULTS
    config.model.name = "switch-tiny-4"
    config.model.vocab_size = tok.vocab_size
    config.model.num_experts = 2
    assert pt.model_config(config) == get_config("switch-tiny-4", vocab_size=4096, num_experts=2)
    config.model.num_experts = 0  # the named config's 4
    config.steps = 6
    config.progress = False
    config.cache_dir = str(tmp_path / "cache")
    for k, v in FAST.items():
        config[k] = v
    workdir = tmp_path / "work"
    summary = pt.run_pretrain(config, str(workdir))
    written = json.loads((workdir / "pretrain.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert summary["num_experts"] == 4 and summary["steps"] == 6 and not summary["cached"]
    assert not summary["shipped"]
    assert summary["method"] == "pretrain" and summary["num_params"] > 0
    assert len(summary["loss_history"]) == 6 and summary["final_loss"] == summary["loss_history"][-1]
    assert summary["steps_per_second"] > 0
    assert set(summary["input_dependence"]) == {"own_ce", "other_ce", "gap", "span_corruption_gap"}
    assert os.path.isdir(summary["checkpoint"]) and summary["checkpoint"].startswith(str(tmp_path / "cache"))
    png = (workdir / "pretrain_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    again = pt.run_pretrain(config, str(tmp_path / "work2"))
    assert again["cached"] and again["checkpoint"] == summary["checkpoint"]

    config.model.num_experts = -1
    with pytest.raises(ValueError, match="model.num_experts"):
        pt.run_pretrain(config, str(workdir))
    config.model.num_experts = 0
    config.steps = 0
    with pytest.raises(ValueError, match="config.steps=0"):
        pt.run_pretrain(config, str(workdir))
    config.steps = 6
    config.optimizer = "sgd"
    with pytest.raises(ValueError, match="config.optimizer='sgd' is invalid"):
        pt.run_pretrain(config, str(workdir))


def test_input_dependence_is_zero_without_cross_attention_and_matches_direct_ce(tok, tiny):
    """own_ce is the plain span-corruption CE; with the cross-attention outputs zeroed the decoder
    cannot see the encoder, so the CE with another example's inputs is the same (gap exactly 0)."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    from fedmoe_jax.models import shift_right, switch_loss

    cfg = pt.train_config(tiny)
    params = SwitchTransformer(cfg).init(jax.random.key(3), jnp.ones((1, 4), jnp.int32),
                                         jnp.ones((1, 4), jnp.int32))["params"]
    docs = pt.embedded_documents(tok)
    stream = pt.SpanCorruptionStream([docs[i] for i in range(200)], 32, 8, sentinel_start=4095)
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


@pytest.mark.parametrize("name", pt.OPTIMIZERS)
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
