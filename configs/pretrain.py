"""Pretraining of the CPU-scale Switch model on the benchmark's corpus (T5 span corruption), cached.

    python -m fedmoe_jax.pretrain --config=configs/pretrain.py --workdir=runs/pretrain
    python -m fedmoe_jax.pretrain --config=configs/pretrain.py --workdir=runs/pretrain_e4 \
        --config.model.num_experts=4          # the full-model baselines' MoE (switch-base-8 analogue)

The defaults build the two models that ship with the package for `data.source="benchmark"`
(30,000 steps each on the 2-core machine; the shipped copies are used as they are, so this trains only
with `--config.use_shipped=False`). The original WordNet-only benchmark's models:
`--config.data_dir= --config.steps=3000`.

Writes `workdir/pretrain.json` and `workdir/pretrain_loss.png`; the model itself lives in the
cache (`cache_dir/<name>-<key>/`, a Hugging Face checkpoint) where the experiments find it. The
defaults are `fedmoe_jax.pretrain.DEFAULTS`, so this trains exactly the entry that an experiment
with `data.source="benchmark"` looks up (`pretrained_params(config, BENCHMARK_STEPS, data_dir=...)`).
Not an experiment config: it has no method.
"""

import ml_collections

from fedmoe_jax.data import benchmark_dir
from fedmoe_jax.pretrain import BENCHMARK_STEPS, DEFAULT_CACHE_DIR, DEFAULTS


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.progress = True

    c.model = ml_collections.ConfigDict()
    c.model.name = "switch-small-16"  # a name in fedmoe_jax.models.NAMED_CONFIGS
    c.model.num_experts = 0  # experts per MoE layer (0: the named config's)
    c.model.vocab_size = 0  # 0: the named config's (switch-small-16: 4096, the embedded tokenizer's)

    # The corpus (its train splits' texts) and tokenizer: a folder like fedmoe_jax/data/embedded
    # (the package's WordNet + Debian benchmark; "": the original WordNet-only embedded benchmark)
    c.data_dir = benchmark_dir()
    c.steps = BENCHMARK_STEPS  # 30,000: about 1.7 hours for switch-small-16 alone on 2 CPU cores
    c.cache_dir = DEFAULT_CACHE_DIR
    # An entry shipped in fedmoe_jax/data/pretrained/ (the reproduction's models) is used as is;
    # False trains (or loads from cache_dir) this machine's own build instead.
    c.use_shipped = True
    for key, value in DEFAULTS.items():  # batch_size, input_len, target_len, learning_rate, ...
        setattr(c, key, value)
    return c
