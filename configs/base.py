"""The base experiment config (CPU scale, Standard-Hetero-T, FedMoE); every field is documented in
`fedmoe_jax/experiment/config.py`, the schema that `fedmoe_jax.main` validates against.

    python -m fedmoe_jax.main --config=configs/base.py --workdir=runs/base --config.method=random_moe
"""

from fedmoe_jax.experiment.config import default_config


def get_config():
    return default_config()
