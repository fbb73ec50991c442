"""`make demo`: a Standard-Hetero-T comparison at CPU scale, small enough for 10 minutes on 2 cores.

The structure of configs/cpu.py (pretrained switch-small-16, 16 experts vs 4 for the full-model
baselines, modular aggregation, Stage 1 + Stage 2) with fewer clients (15, 5 per task), rounds and
evaluation examples. ARG: the method (fedmoe, random_moe, fedprox, ...).

    python -m fedmoe_jax.main --config=configs/demo.py:random_moe --workdir=runs/demo/random_moe
"""

from fedmoe_jax.experiment.config import default_config


def get_config(method: str = "fedmoe"):
    c = default_config()
    c.method = method or "fedmoe"
    c.setting = "standard_hetero_t"
    c.num_rounds = 8
    c.cohort_size = 5
    c.local_steps = 6
    c.learning_rate = 2e-3
    c.max_eval_examples = 16
    c.data.num_clients = 15
    # the pretrained models that ship with the package (configs/cpu.py's): nothing to build
    c.model.build_pretrained = False
    c.data.train_examples_per_task = 1500
    c.data.eval_examples_per_task = 200
    c.stage1.rounds = 2
    c.stage1.local_steps = 2
    c.stage2.patience = 1
    c.eval.global_model = False
    c.eval.unseen_local_steps = 0
    return c
