"""A client whose update turns NaN never poisons the global model: excluded, recorded, or the run stops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedmoe_jax.algorithms import Algorithm
from fedmoe_jax.federated.algorithm import LocalHooks
from fedmoe_jax.federated.loop import exclude_nonfinite
from fedmoe_jax.federated.trainer import FederatedTrainer, NonFiniteUpdate, RunSettings


class PoisonClient(Algorithm):
    """FedAvg whose local training multiplies client `bad`'s gradients by NaN (`poison_round` only)."""

    name = "fedavg"

    def __init__(self, bad: int, poison_round: int = 0):
        self.bad, self.poison_round = bad, poison_round
        self.hooks = LocalHooks(grad_correction=lambda g, scale: jax.tree.map(lambda x: x * scale, g))
        self.round = 0

    def cohort_extra(self, states, cohort, server_extra):
        scale = np.ones(len(cohort), np.float32)
        if self.round == self.poison_round:
            scale[np.asarray(cohort) == self.bad] = np.nan
        self.round += 1
        return scale


def test_exclude_nonfinite_by_hand():
    trained = {"w": jnp.array([[1.0, 2.0], [jnp.nan, 0.0], [3.0, 4.0]])}
    received = {"w": jnp.zeros((3, 2))}
    loss = jnp.array([0.5, 0.1, jnp.inf])
    # client 1's local training saw a NaN parameter (its flag), client 2's loss is not finite
    out, metrics = exclude_nonfinite(trained, received, {"loss": loss, "finite": jnp.array([1.0, 0.0, 1.0])})
    assert np.asarray(metrics["finite"]).tolist() == [1.0, 0.0, 0.0]
    np.testing.assert_array_equal(np.asarray(out["w"]), [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])


def make(small_run, algorithm, **kw):
    config, params, fed, tok = small_run
    run = RunSettings(**{"num_rounds": 2, "cohort_size": 3, "batch_size": 4, "local_steps": 2,
                         "eval_every": 0, "sampling": "enforced", **kw})
    return FederatedTrainer(config, params, fed, tok, algorithm, optax.adamw(3e-3, eps=1e-3), run)


def test_a_nan_client_is_left_out_and_recorded(small_run):
    probe = make(small_run, Algorithm())
    cohort = probe.prepare_round().cohort
    bad = int(cohort[1])
    trainer = make(small_run, PoisonClient(bad))
    row = trainer.run_round()
    assert row["nonfinite_clients"] == [bad]
    assert row["client_train_loss"][1] is None and np.isfinite(row["train_loss"])
    leaves = jax.tree.leaves(trainer.server.params)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    # the aggregate equals FedAvg over the two healthy clients alone (weights of the third = 0)
    healthy = make(small_run, Algorithm())
    prep = healthy.prepare_round()
    prep.cohort_args = (*prep.cohort_args[:4], prep.cohort_args[4] * (np.asarray(prep.cohort) != bad),
                        *prep.cohort_args[5:])
    healthy.finish_round(prep, healthy.train_round(prep))
    for x, y in zip(leaves, jax.tree.leaves(healthy.server.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    assert "nonfinite_clients" not in trainer.run_round()  # the next round is healthy again


def test_stop_mode_raises_naming_round_and_client_and_commits_nothing(small_run):
    probe = make(small_run, Algorithm())
    bad = int(probe.prepare_round().cohort[0])
    trainer = make(small_run, PoisonClient(bad), on_nonfinite="stop")
    before = jax.tree.leaves(trainer.server.params)
    with pytest.raises(NonFiniteUpdate, match=f"round 1: client\\(s\\) {bad} produced a NaN/inf"):
        trainer.run_round()
    assert trainer.server.round == 0 and not trainer.history
    for x, y in zip(before, jax.tree.leaves(trainer.server.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class PoisonAll(PoisonClient):
    """Every sampled client's gradients times NaN in the first round."""

    def cohort_extra(self, states, cohort, server_extra):
        self.round += 1
        return np.full(len(cohort), np.nan, np.float32)


def test_a_round_where_every_client_diverges_is_an_error_not_a_row(small_run):
    trainer = make(small_run, PoisonAll(bad=-1), on_nonfinite="exclude")
    before = jax.tree.map(np.asarray, trainer.server.params)
    with pytest.raises(NonFiniteUpdate, match="every client .* nothing to aggregate"):
        trainer.run_round()
    assert trainer.server.round == 0 and trainer.history == []
    for a, b in zip(jax.tree.leaves(trainer.server.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(small_run):
    from fedmoe_jax.errors import ConfigError

    config, params, fed, tok = small_run
    with pytest.raises(ConfigError, match=f"tokenizer has {tok.vocab_size} pieces but the model's vocabulary "
                                          "is 128"):
        make((config.replace(vocab_size=128), params, fed, tok), Algorithm())
