"""Baselines (randomMoE, FedProx, SCAFFOLD): update rules against small references, short runs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedmoe_jax.algorithms import Algorithm, CohortReport
from fedmoe_jax.algorithms.baselines import SCAFFOLD, FedProx, LocalOnly, RandomMoE, proximal_term
from fedmoe_jax.federated.state import ClientStates
from fedmoe_jax.federated.trainer import FederatedTrainer, RunSettings

LR = 0.05


def make_trainer(small_run, algorithm, tx=None, **settings):
    config, params, fed, tok = small_run
    run = RunSettings(**{"num_rounds": 2, "cohort_size": 3, "batch_size": 4, "local_steps": 2,
                         "eval_every": 0, **settings})
    return FederatedTrainer(config, params, fed, tok, algorithm, tx or optax.adamw(3e-3, eps=1e-3), run)


# ---------------------------------------------------------------------------------------------- randomMoE
def test_random_moe_maps_counts_determinism_and_diversity(small_run):
    config = small_run[0].replace(num_experts=32)
    maps = RandomMoE(8).initial_expert_maps(config, 5, seed=3)
    assert maps.shape == (5, config.num_moe_layers, 32) and maps.dtype == bool
    assert np.all(maps.sum(-1) == 8)
    np.testing.assert_array_equal(maps, RandomMoE(8).initial_expert_maps(config, 5, seed=3))
    # client k's draw depends on (seed, k) only, not on N
    np.testing.assert_array_equal(maps[:3], RandomMoE(8).initial_expert_maps(config, 3, seed=3))
    assert not np.array_equal(maps, RandomMoE(8).initial_expert_maps(config, 5, seed=4))
    assert len({m.tobytes() for m in maps}) == 5
    with pytest.raises(ValueError, match="experts_per_layer"):
        RandomMoE(33).initial_expert_maps(config, 2, seed=0)
    with pytest.raises(ValueError, match="experts_per_layer"):
        RandomMoE(0)


# ---------------------------------------------------------------------------------------------- FedProx
def test_fedprox_term_and_gradient():
    rng = np.random.default_rng(0)
    w = {"a": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32), "b": {"c": jnp.asarray(rng.normal(size=4))}}
    anchor = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), x.dtype), w)
    mu = 0.3
    hook = FedProx(mu).hooks.loss_term
    expected = 0.5 * mu * sum(float(np.sum((np.asarray(p) - np.asarray(a)) ** 2))
                              for p, a in zip(jax.tree.leaves(w), jax.tree.leaves(anchor)))
    np.testing.assert_allclose(float(hook(w, anchor, None)), expected, rtol=1e-5)
    grads = jax.grad(hook)(w, anchor, None)
    for g, p, a in zip(jax.tree.leaves(grads), jax.tree.leaves(w), jax.tree.leaves(anchor)):
        np.testing.assert_allclose(np.asarray(g), mu * (np.asarray(p) - np.asarray(a)), rtol=1e-5, atol=1e-7)
    assert float(proximal_term(w, w, mu)) == 0.0
    with pytest.raises(ValueError, match="mu"):
        FedProx(-1.0)


def test_fedprox_mu0_equals_fedavg_and_mu_pulls_towards_global(small_run):
    runs = {name: make_trainer(small_run, alg, num_rounds=1)
            for name, alg in [("avg", Algorithm()), ("prox0", FedProx(0.0)), ("prox", FedProx(10.0))]}
    hist = {name: t.run(progress=False) for name, t in runs.items()}
    np.testing.assert_allclose(hist["avg"][0]["client_train_loss"], hist["prox0"][0]["client_train_loss"],
                               rtol=1e-6)
    start = jax.tree.leaves(small_run[1])

    def drift(trainer):
        return sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
                   for a, b in zip(jax.tree.leaves(trainer.server.params), start))

    for a, b in zip(jax.tree.leaves(runs["avg"].server.params), jax.tree.leaves(runs["prox0"].server.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert drift(runs["prox"]) < drift(runs["avg"])


# ---------------------------------------------------------------------------------------------- SCAFFOLD
def tiny_tree(rng, lead=()):
    return {"a": rng.normal(size=lead + (2, 3)).astype(np.float32),
            "b": {"c": rng.normal(size=lead + (4,)).astype(np.float32)}}


def test_scaffold_control_updates_match_numpy():
    rng = np.random.default_rng(1)
    n, k_steps, lr = 5, 3, 0.1
    alg = SCAFFOLD(lr_local=lr, local_steps=k_steps)
    x = tiny_tree(rng)
    states = ClientStates.create(np.ones((n, 2, 4), bool), alg.init_extra(n, x))
    server = alg.init_server_extra(x)
    assert all(np.all(leaf == 0) for leaf in jax.tree.leaves((states.extra, server["c"])))
    # start from non-zero controls so every term of the formulas matters
    states = states.replace(extra=tiny_tree(rng, (n,)))
    server = {"c": tiny_tree(rng), "x": x}
    c_i0, c0 = jax.tree.map(np.copy, states.extra), server["c"]  # update_clients writes c_i in place

    cohort = np.array([3, 0, 4])
    extra = alg.cohort_extra(states, cohort, server)
    for e, c, ci in zip(jax.tree.leaves(extra), jax.tree.leaves(c0), jax.tree.leaves(c_i0)):
        np.testing.assert_allclose(e, c[None] - ci[cohort], rtol=1e-6)
    # the local step's correction: u - lr (c - c_i) (under SGD, u = -lr g: the gradient g - c_i + c)
    u = tiny_tree(rng)
    one = jax.tree.map(lambda e: e[0], extra)
    corrected = alg.hooks.update_correction(jax.tree.map(jnp.asarray, u), one)
    for out, ul, c, ci in zip(jax.tree.leaves(corrected), jax.tree.leaves(u), jax.tree.leaves(c0),
                              jax.tree.leaves(c_i0)):
        np.testing.assert_allclose(np.asarray(out), ul - lr * (c - ci[3]), rtol=1e-5, atol=1e-6)

    y = tiny_tree(rng, (3,))
    examples = np.array([10, 0, 7])  # client 0 has no data: no step, controls unchanged
    report = CohortReport(0, cohort, np.zeros(3, np.float32), examples, np.full(3, np.nan, np.float32),
                          np.zeros((3, 2, 4), np.float32), client_params=y)
    new_states = alg.update_clients(states, report)
    assert new_states.extra["a"] is states.extra["a"]  # the [N, ...] controls: written in place, O(C)
    new_server = alg.update_server(server, report, "new-params")
    assert new_server["x"] == "new-params"
    np.testing.assert_array_equal(new_states.participations, [1, 0, 0, 1, 1])
    for get in (lambda t: t["a"], lambda t: t["b"]["c"]):
        ci, c, xl, yl = get(c_i0), get(c0), get(x), get(y)
        ref_ci = ci.copy()
        total = np.zeros_like(c)
        for j, client in enumerate(cohort):
            if examples[j] == 0:
                continue
            ci_plus = ci[client] - c + (xl - yl[j]) / (k_steps * lr)
            total += ci_plus - ci[client]
            ref_ci[client] = ci_plus
        np.testing.assert_allclose(get(new_states.extra), ref_ci, rtol=1e-5, atol=1e-6)
        # c + (|S| / N) * mean over the clients that trained (|S| = 2 here)
        np.testing.assert_allclose(get(new_server["c"]), c + (2 / n) * (total / 2), rtol=1e-5, atol=1e-6)


def test_scaffold_rejects_partial_maps_and_out_of_order_calls():
    rng = np.random.default_rng(2)
    alg = SCAFFOLD(lr_local=0.1, local_steps=2)
    x = tiny_tree(rng)
    maps = np.ones((3, 2, 4), bool)
    maps[1, 0, 2] = False
    states = ClientStates.create(maps, alg.init_extra(3, x))
    with pytest.raises(ValueError, match="every expert"):
        alg.cohort_extra(states, np.array([0, 1]), alg.init_server_extra(x))
    report = CohortReport(0, np.array([0]), np.zeros(1), np.ones(1), np.full(1, np.nan),
                          np.zeros((1, 2, 4)), client_params=tiny_tree(rng, (1,)))
    with pytest.raises(RuntimeError, match="cohort_extra"):
        SCAFFOLD(lr_local=0.1, local_steps=2).update_clients(states, report)


def test_scaffold_trainer_run(small_run):
    alg = SCAFFOLD(lr_local=LR, local_steps=2)
    trainer = make_trainer(small_run, alg, tx=optax.sgd(LR))
    history = trainer.run(progress=False)
    assert len(history) == 2 and all(np.isfinite(row["train_loss"]) for row in history)
    c = trainer.server.extra["c"]
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(c))
    assert sum(float(np.abs(leaf).sum()) for leaf in jax.tree.leaves(c)) > 0
    seen = np.flatnonzero(trainer.states.participations > 0)
    unseen = np.flatnonzero(trainer.states.participations == 0)
    for leaf in jax.tree.leaves(trainer.states.extra):
        assert np.all(np.abs(leaf[seen]).reshape(len(seen), -1).sum(-1) > 0)
        assert np.all(leaf[unseen] == 0)
    # the server keeps the round's starting point x = the current global parameters
    for a, b in zip(jax.tree.leaves(trainer.server.extra["x"]), jax.tree.leaves(trainer.server.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert SCAFFOLD.comm_multiplier == 2
    # never-sampled clients are fine-tuned before their test with their correction c - c_i = c
    # (this evaluation crashed with extra=None in the Enforced CPU grid), recording nothing
    alg._round = None
    extra = alg.local_extra(trainer.states, unseen, trainer.server.extra)
    for e, cl in zip(jax.tree.leaves(extra), jax.tree.leaves(c)):
        np.testing.assert_array_equal(e, np.broadcast_to(np.asarray(cl), e.shape))
    tuned = trainer.evaluate("test", clients=unseen, max_examples=4, batch_size=4, local_steps=2)
    own = trainer.evaluate("test", clients=unseen, max_examples=4, batch_size=4)
    assert all(np.isfinite(tuned["clients"][int(k)]["loss"]) for k in unseen)
    loss = lambda r: [r["clients"][int(k)]["loss"] for k in unseen]  # noqa: E731
    assert loss(tuned) != loss(own)
    assert alg._round is None


def test_local_only_trains_personal_models_and_never_the_global_one(small_run):
    trainer = make_trainer(small_run, LocalOnly(), num_rounds=2)
    initial = jax.tree.map(np.asarray, trainer.server.params)
    history = trainer.run(progress=False)
    for a, b in zip(jax.tree.leaves(trainer.server.params), jax.tree.leaves(initial)):
        np.testing.assert_array_equal(np.asarray(a), b)  # no server model
    sampled = sorted({k for row in history for k in row["cohort"]})
    others = [k for k in range(6) if k not in sampled]
    leaf = lambda tree: np.asarray(jax.tree.leaves(tree)[0])  # noqa: E731
    for k in sampled:
        assert not np.allclose(leaf(trainer.states.extra)[k], leaf(initial))
    for k in others:
        np.testing.assert_array_equal(leaf(trainer.states.extra)[k], leaf(initial))
    assert all(np.isfinite(row["train_loss"]) for row in history)
    # personalized evaluation runs each client's own model
    result = trainer.evaluate("test", max_examples=4, batch_size=4)
    assert sorted(result["clients"]) == list(range(6))
