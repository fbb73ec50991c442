"""Stage 1 end to end on a slice of the embedded benchmark, then Eq. 3 maps and a FedMoE run."""

import numpy as np
import optax
import pytest

from fedmoe_jax.algorithms.fedmoe import FedMoE
from fedmoe_jax.algorithms.fedmoe.stage1 import initial_maps, run_stage1, stage1_eligible
from fedmoe_jax.algorithms.memory import MemoryModel
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


def test_stage1_sub_cohorts_match_all_at_once(small_run):
    """Sub-cohorts of 1 and 2 clients (and 2 sharded over a 2-device mesh) give the all-at-once result."""
    from fedmoe_jax.federated.sharding import make_mesh

    config, params, fed, _ = small_run
    eligible = np.array([True, False, True, True, True, False])
    kw = dict(rounds=2, rank=2, local_steps=2, batch_size=4, eval_batch_size=4, max_eval_examples=8,
              learning_rate=1e-2)
    whole = run_stage1(config, params, fed, eligible, chunk_size=None, **kw)
    assert whole.chunks == {"train": None, "measure": None}
    for chunk, mesh in [(1, None), (2, None), (2, make_mesh(2))]:
        sub = run_stage1(config, params, fed, eligible, chunk_size=chunk, mesh=mesh, **kw)
        assert sub.chunks == {"train": chunk, "measure": chunk}
        np.testing.assert_allclose(sub.probs, whole.probs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sub.lora_loss, whole.lora_loss, rtol=1e-5)
    capped = run_stage1(config, params, fed, eligible, memory_cap=10**12, **kw)  # fit_under_cap's path
    assert capped.chunks == {"train": None, "measure": None}
    np.testing.assert_allclose(capped.probs, whole.probs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of chunk_size=3"):
        run_stage1(config, params, fed, eligible, chunk_size=3, **kw)


def _fixed_bytes(build, args, per_client_out: bool) -> int:
    """Compiled peak bytes less the cohort's own inputs (and per-client outputs), which must scale."""
    import jax

    from fedmoe_jax.federated.loop import program_bytes

    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    program = build.lower(*args).compile()
    out = nbytes(jax.eval_shape(build, *args)) if per_client_out else 0
    return program_bytes(program) - nbytes(args[2:]) - out


def test_stage1_peak_memory_does_not_grow_with_clients():
    """XLA's memory analysis of the Stage 1 programs at 4 and 16 clients in sub-cohorts of 2: the peak
    less the cohort's batches stays put; all clients at once (the old vmap) grows ~4x."""
    from fedmoe_jax.algorithms.fedmoe.stage1 import (
        abstract_stage1_args,
        make_lora_measure,
        make_lora_round,
        stage1_program,
    )
    from fedmoe_jax.federated.loop import program_bytes
    from fedmoe_jax.models import get_config

    config = get_config("switch-tiny-8")
    dims = dict(steps=2, batch=4, input_len=32, target_len=16)
    args = {c: abstract_stage1_args(config, 2, c, **dims) for c in (4, 16)}
    for chunk, grows in [(2, False), (None, True)]:
        train = {c: _fixed_bytes(make_lora_round(config, 2, 16.0, 1e-3, chunk=chunk), args[c][0], False)
                 for c in args}
        measure = {c: _fixed_bytes(make_lora_measure(config, 2, 16.0, chunk=chunk), args[c][1], True)
                   for c in args}
        for fixed in (train, measure):
            assert min(fixed.values()) > 0
            if grows:
                assert fixed[16] > 2 * fixed[4], (chunk, fixed)
            else:
                assert fixed[16] <= 1.01 * fixed[4], (chunk, fixed)

    # under a cap between the sub-cohorts of 4 and 2, `stage1_program` (fit_under_cap) picks 2
    build = lambda chunk: make_lora_round(config, 2, 16.0, 1e-3, chunk=chunk)  # noqa: E731
    need = {chunk: program_bytes(build(chunk).lower(*args[16][0]).compile()) for chunk in (4, 2)}
    assert need[4] > need[2]
    tried = {}
    chunk, program = stage1_program(build, args[16][0], None, memory_cap=need[2], tried=tried)
    assert chunk == 2 and program_bytes(program) <= need[2] and tried == need
