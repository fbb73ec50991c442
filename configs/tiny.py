"""A few rounds of the whole pipeline (Stage 1, Stage 2, all three task types) in well under a
minute on a 2-core CPU: tests, checks and smoke runs. Same fields as `configs/base.py`.

    python -m fedmoe_jax.main --config=configs/tiny.py --workdir=/tmp/tiny [--config.method=fedprox]
"""

from fedmoe_jax.experiment.config import default_config


def get_config(method: str = "fedmoe"):
    c = default_config()
    c.method = method or "fedmoe"
    c.num_rounds = 3
    c.cohort_size = 3
    c.batch_size = 4
    c.local_steps = 2
    c.learning_rate = 1e-3
    c.eval_batch_size = 8
    c.max_eval_examples = 8
    c.data.num_clients = 6
    c.data.train_examples_per_task = 48
    c.data.eval_examples_per_task = 16
    c.data.max_input_len = 32
    c.data.max_target_len = 16
    c.model.name = "switch-tiny-4"
    c.model.init = "random"  # no pretraining step: seconds, not minutes
    c.model.baseline_num_experts = 2
    # switch-tiny-4 with the 4096-piece vocabulary is ~91 % dense part: budgets near the full model
    c.memory.budget_low = 0.95
    c.memory.budget_high = 1.0
    c.memory.budget_step = 0.01
    c.memory.mem_fraction = 1.0
    c.stage1.rounds = 1
    c.stage1.rank = 2
    c.stage1.local_steps = 2
    c.stage2.patience = 1
    c.stage2.num_references = 2
    c.random_moe.experts_per_layer = 2
    c.eval.test_examples = 8
    c.eval.batch_size = 8
    c.eval.unseen_local_steps = 1
    return c
