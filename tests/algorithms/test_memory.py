"""Memory model: parameter counts (the paper's models), the activation formula by hand, the baselines'
extra state, budgets."""

import numpy as np
import pytest

from fedmoe_jax.algorithms.memory import GB, MemoryModel, draw_budgets, parameter_counts
from fedmoe_jax.models import get_config


def test_switch_base_32_counts_and_full_training_memory():
    dense, expert = parameter_counts(get_config("switch-base-32"))
    assert abs(dense - 166.3e6) < 0.1e6  # the paper's switch-base-32: dense part ~166.3 M
    assert expert.tolist() == [2 * 768 * 3072 + 768] * 12  # wi + wo + its router column
    full = MemoryModel(get_config("switch-base-32"), batch_size=8, input_len=512, target_len=64)
    # the paper: training a 32-expert Switch model needs "at least 37GB"
    assert 37 * GB <= full.full_model_bytes() <= 39 * GB
    # and FedMoE's sub-MoEs of 65-78 experts peak around 13.4-14.0 GB
    assert 13 * GB <= full.dense_bytes + 65 * full.expert_bytes[0] <= 15 * GB


def test_activation_formula_by_hand():
    cfg = get_config("switch-tiny-4")  # d_model 32, 4 heads, 2 + 2 blocks
    m = MemoryModel(cfg, batch_size=2, input_len=8, target_len=4, bytes_per_activation=2)
    enc = 2 * 8 * 2 * 32 * (34 + 5 * 4 * 8 / 32)
    dec = 2 * 4 * 2 * 32 * (34 + 5 * 4 * 4 / 32 * 2)
    assert m.activation_bytes == pytest.approx(enc + dec)
    mask = np.zeros((cfg.num_moe_layers, cfg.num_experts), bool)
    mask[:, :2] = True
    assert m.submodel_bytes(mask) == pytest.approx(m.dense_bytes + 2 * m.expert_bytes.sum())


def test_budgets():
    b = draw_budgets(30, 18 * GB, 24 * GB, seed=0)
    assert b.shape == (30,) and set(np.unique(b / GB)) <= set(range(18, 25))
    assert np.array_equal(b, draw_budgets(30, 18 * GB, 24 * GB, seed=0))
    with pytest.raises(ValueError, match="budget range"):
        draw_budgets(3, 5, 4, seed=0)


def test_extra_state_copies_of_fedprox_and_scaffold_by_hand():
    from fedmoe_jax.algorithms import SCAFFOLD, Algorithm, FedMoE, FedProx, LocalOnly, RandomMoE

    cfg = get_config("switch-tiny-4")  # d_model 32, d_ff 64, 4 experts in each of 2 MoE layers
    m = MemoryModel(cfg, batch_size=2, input_len=8, target_len=4)
    dense, _ = parameter_counts(cfg)
    expert = 2 * 32 * 64 + 32  # wi + wo + its router column
    mask = np.zeros((cfg.num_moe_layers, cfg.num_experts), bool)
    mask[0, :3] = mask[1, :1] = True  # 4 experts in all
    params = dense + 4 * expert
    # training state: 16 B per parameter (weights, gradients, 2 Adam moments) plus activations
    plain = params * 4 * 4 + m.activation_bytes
    assert m.submodel_bytes(mask) == pytest.approx(plain)
    # FedProx: + the anchor (the model as received), SCAFFOLD: + c and c_i; 4 B per parameter each
    assert FedProx.state_copies == 1 and SCAFFOLD.state_copies == 2
    assert m.submodel_bytes(mask, extra_copies=FedProx.state_copies) == pytest.approx(plain + params * 4)
    assert m.submodel_bytes(mask, extra_copies=SCAFFOLD.state_copies) == pytest.approx(plain + 2 * params * 4)
    for algo in (Algorithm, RandomMoE, FedMoE, LocalOnly):
        assert algo.state_copies == 0, algo
    full = params + (cfg.num_moe_layers * cfg.num_experts - 4) * expert
    assert m.full_model_bytes(extra_copies=2) == pytest.approx(
        full * 4 * 4 + m.activation_bytes + 2 * full * 4)
    # from the experts per layer [L] alone (what the metrics rows keep)
    assert m.counts_bytes([3, 1], extra_copies=1) == pytest.approx(m.submodel_bytes(mask, 1))
