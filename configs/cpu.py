"""CPU-scale experiments: the paper's settings on the embedded benchmark with a small Switch model.

ARG is a setting, optionally with a method: `standard_hetero_t`, `enforced_hetero_td,fedprox`, ...
(settings: standard_hetero_t/td, enforced_hetero_t/td; methods: fedmoe, random_moe, fedprox,
scaffold, fedavg, local, fedmoe_no_stage1, fedmoe_no_stage2). The structure is the paper's
(30 clients, 10 per task, 5 sampled or one per task, 16-expert global MoE vs a 4-expert one for
the full-model baselines, as switch-base-32 vs switch-base-8); the numbers are smaller.

    python -m fedmoe_jax.main --config=configs/cpu.py:standard_hetero_t,random_moe --workdir=runs/cpu/rm
"""

from fedmoe_jax.experiment.config import default_config, parse_setting_arg


def get_config(arg: str = "standard_hetero_t"):
    c = default_config()
    c.setting, method = parse_setting_arg(arg)
    c.method = method or c.method
    # CPU scale (2 cores): switch-small-16 pretrained on the embedded corpus, 3000 training examples
    # per task (about 300 per client), 30 rounds of 24 local steps at 1e-3 (measured choice: see
    # fedmoe_jax/experiment/config.py, which holds every default).
    return c
