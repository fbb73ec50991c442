"""Pretraining of the CPU-scale Switch model on the embedded corpus (T5 span corruption), cached.

    python -m fedmoe_jax.pretrain --config=configs/pretrain.py --workdir=runs/pretrain
    python -m fedmoe_jax.pretrain --config=configs/pretrain.py --workdir=runs/pretrain_e4 \
        --config.model.num_experts=4          # the full-model baselines' MoE (switch-base-8 analogue)

Writes `workdir/pretrain.json` and `workdir/pretrain_loss.png`; the model itself lives in the
cache (`cache_dir/<name>-<key>/`, a Hugging Face checkpoint) where the experiments find it. The
defaults are `fedmoe_jax.pretrain.DEFAULTS`, so this trains exactly the entry that
`pretrained_params(config, DEFAULT_STEPS)` looks up. Not an experiment config: it has no method.
"""

import ml_collections

from fedmoe_jax.pretrain import DEFAULT_CACHE_DIR, DEFAULT_STEPS, DEFAULTS


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.progress = True

    c.model = ml_collections.ConfigDict()
    c.model.name = "switch-small-16"  # a name in fedmoe_jax.models.NAMED_CONFIGS
    c.model.num_experts = 0  # experts per MoE layer (0: the named config's)
    c.model.vocab_size = 0  # 0: the named config's (switch-small-16: 4096, the embedded tokenizer's)

    # The corpus (its train splits' texts) and tokenizer: a folder like fedmoe_jax/data/embedded
    # ("": the embedded WordNet benchmark; "fedmoe_jax/data/benchmark": the WordNet + Debian one)
    c.data_dir = ""
    c.steps = DEFAULT_STEPS  # 3000: ~15 minutes for switch-small-16 on 2 CPU cores
    c.cache_dir = DEFAULT_CACHE_DIR
    # An entry shipped in fedmoe_jax/data/pretrained/ (the reproduction's models) is used as is;
    # False trains (or loads from cache_dir) this machine's own build instead.
    c.use_shipped = True
    for key, value in DEFAULTS.items():  # batch_size, input_len, target_len, learning_rate, ...
        setattr(c, key, value)
    return c
