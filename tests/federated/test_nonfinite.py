"""A client whose update turns NaN or explodes never poisons the global model: excluded, recorded, or the
run stops; an exploding aggregate ends the run before it is committed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedmoe_jax.algorithms import Algorithm
from fedmoe_jax.federated.algorithm import LocalHooks
from fedmoe_jax.federated.loop import exclude_diverged, update_ratio
from fedmoe_jax.federated.trainer import DivergedAggregate, FederatedTrainer, NonFiniteUpdate, RunSettings


class PoisonClient(Algorithm):
    """FedAvg whose local training multiplies client `bad`'s gradients by `factor` (NaN; `poison_round`
    only)."""

    name = "fedavg"

    def __init__(self, bad: int, poison_round: int = 0, factor: float = np.nan):
        self.bad, self.poison_round, self.factor = bad, poison_round, factor
        self.hooks = LocalHooks(grad_correction=lambda g, scale: jax.tree.map(lambda x: x * scale, g))
        self.round = 0

    def cohort_extra(self, states, cohort, server_extra):
        scale = np.ones(len(cohort), np.float32)
        if self.round == self.poison_round:
            scale[np.asarray(cohort) == self.bad] = self.factor
        self.round += 1
        return scale


def test_update_ratio_by_hand():
    old = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # ||old|| = 5
    new = {"a": jnp.array([3.0, 6.0]), "b": jnp.array([[12.0]])}  # ||new - old|| = sqrt(36 + 64) = 10
    assert float(update_ratio(new, old)) == pytest.approx(2.0)
    # a model smaller than 1 is measured against 1: ||(0.3, 0.4)|| = 0.5 -> 0.5 / 1
    assert float(update_ratio({"w": jnp.array([0.3, 0.4])}, {"w": jnp.zeros(2)})) == pytest.approx(0.5)


def test_exclude_diverged_by_hand():
    trained = {"w": jnp.array([[1.0, 2.0], [jnp.nan, 0.0], [3.0, 4.0], [30.0, 40.0]])}
    received = {"w": jnp.zeros((4, 2))}
    loss = jnp.array([0.5, 0.1, jnp.inf, 0.2])
    # client 1's local training saw a NaN parameter (its flag), client 2's loss is not finite,
    # client 3 moved by 50 (ratio 50 over max(0, 1)): exploding at max_update_ratio=10
    flags = {"loss": loss, "finite": jnp.array([1.0, 0.0, 1.0, 1.0])}
    out, metrics = exclude_diverged(trained, received, flags, max_update_ratio=10.0)
    assert np.asarray(metrics["finite"]).tolist() == [1.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(np.asarray(metrics["update_ratio"]), [5 ** 0.5, np.inf, np.inf, 50.0],
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["w"]), [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    # no ratio check: the finite client 3 is kept
    _, metrics = exclude_diverged(trained, received, flags)
    assert np.asarray(metrics["finite"]).tolist() == [1.0, 0.0, 0.0, 1.0]


def make(small_run, algorithm, optimizer=None, server_optimizer=None, **kw):
    config, params, fed, tok = small_run
    run = RunSettings(**{"num_rounds": 2, "cohort_size": 3, "batch_size": 4, "local_steps": 2,
                         "eval_every": 0, "sampling": "enforced", **kw})
    return FederatedTrainer(config, params, fed, tok, algorithm, optimizer or optax.adamw(3e-3, eps=1e-3),
                            run, server_optimizer=server_optimizer)


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
    with pytest.raises(NonFiniteUpdate, match=f"round 1: client\\(s\\) {bad} produced a NaN/inf update; "
                                              "nothing of round 1 is committed"):
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
    with pytest.raises(NonFiniteUpdate, match="every client diverged .* nothing to aggregate"):
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


def test_an_exploding_client_is_left_out_and_recorded(small_run):
    """A finite update 1e6 times a plain SGD step (a change ~100 times the model) is excluded like a
    NaN one: the aggregate is FedAvg over the others, and the row names it under `exploding_clients`."""
    sgd = optax.sgd(1e-2)
    bad = int(make(small_run, Algorithm(), sgd).prepare_round().cohort[2])
    trainer = make(small_run, PoisonClient(bad, factor=1e6), sgd)
    row = trainer.run_round()
    assert row["exploding_clients"] == [bad] and "nonfinite_clients" not in row
    ratios = row["client_update_ratio"]
    assert ratios[2] > 10 and max(ratios[:2]) < 1  # the healthy clients' steps are small
    healthy = make(small_run, Algorithm(), sgd)
    prep = healthy.prepare_round()
    prep.cohort_args = (*prep.cohort_args[:4], prep.cohort_args[4] * (np.asarray(prep.cohort) != bad),
                        *prep.cohort_args[5:])
    healthy.finish_round(prep, healthy.train_round(prep))
    for x, y in zip(jax.tree.leaves(trainer.server.params), jax.tree.leaves(healthy.server.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_every_client_exploding_stops_the_run_with_the_rule_in_the_message(small_run):
    """The hostile case: learning rate 1e6. Every update is finite but huge, so the round has nothing to
    aggregate. Without the ratio check, one step at 1e12 commits weights of ~1e12 whose validation loss
    is NaN: the row says so."""
    trainer = make(small_run, Algorithm(), optax.adamw(1e6))
    with pytest.raises(NonFiniteUpdate, match="every client diverged .* over max_update_ratio=10 times"):
        trainer.run_round()
    assert trainer.server.round == 0
    unguarded = make(small_run, Algorithm(), optax.adamw(1e12), max_update_ratio=0.0, eval_every=1,
                     local_steps=1)
    row = unguarded.run_round()
    assert "exploding_clients" not in row and min(row["client_update_ratio"]) > 10
    assert row["nonfinite_validation"] == row["cohort"]  # said, not hidden


def test_an_exploding_aggregate_ends_the_run_before_it_is_committed(small_run):
    """Healthy client updates blown up by a server learning rate of 1e4: `DivergedAggregate`, and the
    server state is that of before the round."""
    trainer = make(small_run, Algorithm(), server_optimizer=optax.sgd(1e4))
    before = jax.tree.map(np.asarray, trainer.server.params)
    with pytest.raises(DivergedAggregate, match="round 1: the aggregated update moves the global model "
                       "by .* times its size \\(over max_update_ratio=10\\); nothing of round 1 is "
                       "committed"):
        trainer.run_round()
    assert trainer.server.round == 0 and trainer.history == []
    for a, b in zip(jax.tree.leaves(trainer.server.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
