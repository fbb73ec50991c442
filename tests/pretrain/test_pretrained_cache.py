"""The cache of pretrained models (`fedmoe_jax.pretrain.cache`): hits, misses, keys, rebuilds of corrupt
entries, the shipped models first, `build=False`, and parallel builders that train once."""

import json
import logging
import os
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pretraining_helpers import FAST, assert_same, load_config_file, tiny_config

from fedmoe_jax.checkpoints.hf_switch import WEIGHTS_FILE
from fedmoe_jax.data import embedded_tokenizer
from fedmoe_jax.models import SwitchTransformer
from fedmoe_jax.pretrain import cache as pt


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def tiny(tok):
    return tiny_config(tok)


def counting(monkeypatch):
    calls = []
    original = pt.pretrain

    def wrapped(*args, **kwargs):
        calls.append(kwargs.get("steps"))
        return original(*args, **kwargs)

    monkeypatch.setattr(pt, "pretrain", wrapped)  # the name pretrained_entry calls (in cache.py)
    return calls


def test_cache_hit_miss_and_rebuild(tmp_path, monkeypatch, caplog, tok, tiny):
    calls = counting(monkeypatch)
    cache = str(tmp_path / "cache")
    first, info = pt.pretrained_entry(tiny, 6, cache, progress=False, tokenizer=tok, **FAST)
    assert calls == [6] and not info["cached"]
    path = info["path"]
    assert os.path.basename(path).startswith("d32-l2x2-e4-v4096-s6-")
    assert len(os.path.basename(path).rsplit("-", 1)[1]) == 12
    # with its tokenizer: the entry loads whole as a Hugging Face directory (model.init="hf")
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "pretrain.json", "spiece.model"]
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
    """configs/cpu.py's two models (switch-small-16 and the baselines' 4-expert sibling, pretrained on
    the benchmark) ship with the package, as do the original WordNet benchmark's two: no machine trains
    them (a rebuild elsewhere differs in the last bits), and nothing else ships; `make demo` uses the
    benchmark's two."""
    from fedmoe_jax.algorithms.registry import get_method
    from fedmoe_jax.checkpoints import load_hf_switch
    from fedmoe_jax.experiment.build import (
        initial_params,
        load_tokenizer,
        model_config,
        pretrain_steps,
        shipped_data_dir,
    )

    def no_training(*args, **kwargs):
        raise AssertionError("the CPU-scale configs trained a model instead of loading the shipped one")

    monkeypatch.setattr(pt, "pretrain", no_training)
    module = load_config_file("cpu")
    seen = set()
    for source, methods, steps in (("embedded", ("fedmoe", "fedprox"), pt.DEFAULT_STEPS),
                                   ("benchmark", ("fedmoe", "fedprox"), pt.BENCHMARK_STEPS)):
        for method in methods:
            config = module.get_config(f"standard_hetero_t,{method}")
            config.data.source = source
            full = get_method(method).full_model
            tokenizer, data_dir = load_tokenizer(config), shipped_data_dir(config)
            cfg = model_config(config, tokenizer, full)
            assert pretrain_steps(config) == steps  # as experiments resolve it
            params, info = pt.pretrained_entry(cfg, steps, str(tmp_path), progress=False, data_dir=data_dir)
            assert info["shipped"] and os.path.dirname(info["path"]) == pt.SHIPPED_DIR, info["path"]
            assert info["key"]["hyperparameters"]["steps"] == steps
            assert cfg.num_experts == (config.model.baseline_num_experts if full else 16)
            _, direct = load_hf_switch(info["path"])
            np.testing.assert_array_equal(params["shared"]["embedding"], direct["shared"]["embedding"])
            assert_same(initial_params(config, cfg, full, progress=False)[1], params)
            seen.add(os.path.basename(info["path"]))
            # compute-only fields (remat) name the same model: switching them never retrains it
            for remat in ("full", "dots"):
                key = pt.cache_key(cfg.replace(remat=remat), steps, tokenizer=tokenizer, data_dir=data_dir)
                assert pt.entry_name(key) == os.path.basename(info["path"])
    assert sorted(seen) == sorted(os.listdir(pt.SHIPPED_DIR))
    # `make demo` (configs/demo.py) starts its three methods from configs/cpu.py's benchmark models
    demo, benchmark_models = load_config_file("demo"), set()
    for method in ("fedmoe", "random_moe", "fedprox"):
        config = demo.get_config(method)
        assert config.data.source == "benchmark" and not config.model.build_pretrained
        cfg = model_config(config, load_tokenizer(config), get_method(method).full_model)
        _, info = pt.pretrained_entry(cfg, pretrain_steps(config), str(tmp_path), progress=False,
                                      data_dir=shipped_data_dir(config))
        assert info["shipped"] and info["key"]["hyperparameters"]["steps"] == pt.BENCHMARK_STEPS
        benchmark_models.add(os.path.basename(info["path"]))
    assert len(benchmark_models) == 2 and benchmark_models <= seen


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


def test_an_unfinished_pretraining_exports_a_step_as_a_hugging_face_model(tmp_path, monkeypatch, tok, tiny):
    """Pretraining stopped at step 7 (checkpoints every 5): step 7 exports as an HF directory with the
    tokenizer and the loss history so far, its params those of the verified checkpoint; a missing step
    names the steps there, a damaged one is refused."""
    import signal

    from fedmoe_jax.checkpoints import load_hf_switch
    from fedmoe_jax.data.tokenizer import Tokenizer
    from fedmoe_jax.federated.preemption import RunInterrupted
    from fedmoe_jax.federated.run_checkpoint import CheckpointError, read_step_part
    from fedmoe_jax.pretrain import train

    original, calls = pt.pretrain, []
    monkeypatch.setattr(pt, "pretrain", lambda *a, **k: original(*a, **{**k, "checkpoint_every": 5}))
    monkeypatch.setattr(train, "requested_stop",
                        lambda: calls.append(1) or (signal.SIGTERM if len(calls) == 7 else None))
    cache = str(tmp_path / "cache")
    with pytest.raises(RunInterrupted):
        pt.pretrained_entry(tiny, 12, cache, progress=False, tokenizer=tok, shipped_dir=None, **FAST)
    out = str(tmp_path / "step7")
    info = pt.export_partial_step(tiny, 12, cache, 0, 7, out, tokenizer=tok, **FAST)
    assert info["step"] == 7 and info["of_steps"] == 12 and len(info["loss_history"]) == 7
    config, params = load_hf_switch(out)
    partial = pt.partial_dir(os.path.join(cache, info["entry"]))
    saved, _ = read_step_part(partial, 7, "params")
    assert_same(jax.tree.map(np.asarray, params), saved)
    assert config.num_experts == tiny.num_experts
    assert Tokenizer.from_pretrained(out).encode("a federated test") == tok.encode("a federated test")
    with pytest.raises(ValueError, match="no pretraining checkpoint of step 6 .* \\(steps there: 5, 7\\)"):
        pt.export_partial_step(tiny, 12, cache, 0, 6, str(tmp_path / "x"), tokenizer=tok, **FAST)
    with open(os.path.join(partial, "5", "integrity", "metadata"), "w") as f:
        f.write("{}")
    with pytest.raises(CheckpointError, match="step 5 .* is missing or damaged"):
        pt.export_partial_step(tiny, 12, cache, 0, 5, str(tmp_path / "y"), tokenizer=tok, **FAST)
