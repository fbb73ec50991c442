"""Config of `experiments/model_demo.py`: a small Switch Transformer on sequence reversal.

    python experiments/model_demo.py --config=configs/model_demo.py --config.steps=2000
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.steps = 1000
    config.batch_size = 64
    config.learning_rate = 3e-3
    config.warmup_steps = 50
    config.weight_decay = 0.01
    config.lb_loss_weight = 0.01
    config.eval_examples = 256
    # Task: strings of 3..max_len tokens (ids 3..vocab_size-1) -> the same string reversed + EOS.
    config.max_len = 8
    config.vocab_size = 64
    # Model: a named config from fedmoe_jax.models.NAMED_CONFIGS plus overrides.
    config.model = "switch-tiny-8"
    config.model_overrides = ml_collections.ConfigDict(
        {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 4, "num_decoder_layers": 4,
         "dispatch": "capacity"}
    )
    return config
