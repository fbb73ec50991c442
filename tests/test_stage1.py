"""Stage 1 end to end on a slice of the embedded benchmark, then Eq. 3 maps and a FedMoE run."""

import numpy as np
import optax
import pytest

from fedmoe_jax.algorithms.fedmoe import FedMoE
from fedmoe_jax.algorithms.memory import MemoryModel
from fedmoe_jax.algorithms.stage1 import initial_maps, run_stage1, stage1_eligible
from fedmoe_jax.federated.trainer import FederatedTrainer, RunSettings


def test_stage1_probs_prediction_and_maps(small_run):
    config, params, fed, tok = small_run
    eligible = np.array([True, False, True, True, True, False])  # clients 1 (tc) and 5 (ts) predicted
    result = run_stage1(config, params, fed, eligible, rounds=2, rank=2, local_steps=2, batch_size=4,
                        eval_batch_size=4, max_eval_examples=8, learning_rate=1e-2)
    assert len(result.lora_loss) == 2 and np.all(np.isfinite(result.lora_loss))
    np.testing.assert_allclose(result.probs.sum(-1), 1.0, rtol=1e-5)
    tasks = [fed.partition.task_of(c) for c in range(6)]
    for k in np.flatnonzero(~eligible):
        peers = [a for a in range(6) if eligible[a] and tasks[a] == tasks[k]]
        sizes = fed.num_examples["train"][peers].astype(float)
        expected = np.tensordot(sizes, result.probs[peers], axes=1) / sizes.sum()
        np.testing.assert_allclose(result.probs[k], expected, rtol=1e-5)

    memory = MemoryModel(config, batch_size=4, input_len=32, target_len=16)
    budget = memory.dense_bytes + 2.5 * config.num_moe_layers * memory.expert_bytes[0]
    maps, thetas = initial_maps(result.probs, memory, np.full(6, budget), mem_fraction=1.0)
    assert maps.shape == (6, config.num_moe_layers, config.num_experts)
    assert np.all(maps.sum(-1) >= 1) and np.all(maps.sum((1, 2)) <= 2.5 * config.num_moe_layers)
    assert np.all((0 < thetas) & (thetas <= 1))
    with pytest.raises(ValueError, match="client 0: memory budget"):
        initial_maps(result.probs, memory, np.full(6, memory.dense_bytes), mem_fraction=1.0)
    budgets = np.array([memory.full_model_bytes() * 2, memory.activation_bytes])
    assert stage1_eligible(memory, budgets).tolist() == [True, False]

    # Stage 2 from these maps runs on the engine
    trainer = FederatedTrainer(config, params, fed, tok, FedMoE(maps, patience=1, num_references=2),
                               optax.adamw(3e-3), RunSettings(num_rounds=3, cohort_size=3, batch_size=4,
                                                              local_steps=2, eval_batch_size=4,
                                                              max_eval_examples=4))
    history = trainer.run(progress=False)
    assert len(history) == 3 and np.isfinite(history[-1]["train_loss"])


def test_stage1_needs_a_measured_client_per_task(small_run):
    config, params, fed, _ = small_run
    with pytest.raises(ValueError, match="no client of task"):
        run_stage1(config, params, fed, np.array([False, False, True, True, True, True]), rounds=1)
