"""What the pretraining tests share: the small hyperparameters (one compiled step per model config),
the tiny model config, and a params comparison. Imported by the test modules of this folder."""

import os

import jax
import numpy as np

from fedmoe_jax.models import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Small, fast pretraining hyperparameters shared by the cache tests (one compiled program).
# Every pretraining here has these shapes, so the tests share one compiled step per model config.
FAST = dict(batch_size=8, input_len=32, target_len=8, warmup_steps=2, learning_rate=3e-3)


def tiny_config(tok):
    # The config a caller would fine-tune: dropout on, its own capacity. Pretraining overrides both.
    return get_config("switch-tiny-4", vocab_size=tok.vocab_size, dropout_rate=0.1, expert_capacity=4)


def load_config_file(name: str):
    """`get_config()`'s module of configs/<name>.py."""
    import importlib.util

    path = os.path.join(ROOT, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
