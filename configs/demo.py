"""`make demo`: a Standard-Hetero-T comparison at CPU scale, small enough for 10 minutes on 2 cores.

configs/cpu.py's structure and training recipe (the shipped benchmark, switch-small-16 pretrained on its
corpus vs its 4-expert sibling for the full-model baselines, modular aggregation, Stage 1 + Stage 2,
AdamW at 1e-3, no dropout, 4-beam decoding) with a third of its compute: 15 rounds of 16 local steps
(each client trained ~5 times), half the training examples, a third of the test examples and a short
Stage 1. ARG: the method (fedmoe, random_moe, fedprox, ...).

    python -m fedmoe_jax.main --config=configs/demo.py:random_moe --workdir=runs/demo/random_moe
"""

from fedmoe_jax.experiment.config import default_config


def get_config(method: str = "fedmoe"):
    c = default_config()
    c.method = method or "fedmoe"
    c.setting = "standard_hetero_t"
    c.num_rounds = 15
    c.cohort_size = 5
    c.local_steps = 16
    c.max_eval_examples = 16
    c.data.num_clients = 15
    # the pretrained models that ship with the package (configs/cpu.py's): nothing to build
    c.model.build_pretrained = False
    # configs/cpu.py's fine-tuning: the pretraining's dropout (0.0) and 4-beam decoding
    c.model.dropout_rate = 0.0
    c.decoding.num_beams = 4
    c.data.train_examples_per_task = 1500
    c.data.eval_examples_per_task = 200
    c.stage1.rounds = 2
    c.stage1.local_steps = 2
    c.stage2.patience = 1
    c.eval.global_model = False
    c.eval.unseen_local_steps = 0
    return c
