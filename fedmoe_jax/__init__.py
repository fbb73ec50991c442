"""fedmoe_jax: FedMoE (Mei et al., 2024) in JAX/Flax."""

__version__ = "0.1.0"
