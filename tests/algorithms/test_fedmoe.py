"""FedMoE's equations against hand-computed values and brute force."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_jax.algorithms.fedmoe import (
    cosine_similarity,
    estimated_importance,
    recommend,
    reference_set,
    search_submodel,
    static_prediction,
)


def test_search_by_hand():
    probs = np.array([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]])
    # budget for 3 experts: theta 0.6 needs 1 + 2 (0.4 + 0.35 = 0.75 >= 0.6) = 3 experts -> fits;
    # theta 0.75 needs 2 + 2 = 4 -> does not; so theta = min(0.6, 0.75) = 0.6
    mask, theta = search_submodel(probs, expert_bytes=10, dense_bytes=5, budget_bytes=35)
    assert mask.tolist() == [[True, False, False], [True, True, False]]
    assert theta == pytest.approx(0.6)
    full, theta_full = search_submodel(probs, 10, 5, 1000)
    assert full.all() and theta_full == pytest.approx(1.0)
    with pytest.raises(ValueError, match="below the smallest sub-MoE"):
        search_submodel(probs, 10, 5, 24)


def brute_force(probs, expert_bytes, dense, budget, min_k):
    """Every per-layer prefix length: the best worst-layer coverage within budget."""
    num_layers, num_experts = probs.shape
    sorted_p = -np.sort(-probs, axis=-1)
    cover = np.cumsum(sorted_p, axis=-1)
    best = -1.0
    for counts in itertools.product(range(min_k, num_experts + 1), repeat=num_layers):
        if dense + sum(counts) * expert_bytes <= budget:
            best = max(best, min(cover[layer, c - 1] for layer, c in enumerate(counts)))
    return best


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(2, 5), st.integers(1, 2), st.integers(0, 10**6), st.floats(0.0, 1.0))
def test_search_matches_brute_force(num_layers, num_experts, min_k, seed, slack):
    min_k = min(min_k, num_experts)
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(num_experts) * 0.5, size=num_layers)
    smallest = 3 + min_k * num_layers
    budget = smallest + slack * num_layers * (num_experts - min_k)
    mask, theta = search_submodel(probs, 1.0, 3.0, budget, min_k)
    assert theta == pytest.approx(brute_force(probs, 1.0, 3.0, budget, min_k), abs=1e-9)
    assert 3 + mask.sum() <= budget + 1e-9
    assert np.all(mask.sum(-1) >= min_k)
    for layer in range(num_layers):  # kept experts are a prefix by descending probability
        kept, dropped = probs[layer][mask[layer]], probs[layer][~mask[layer]]
        assert not dropped.size or kept.min() >= dropped.max()


def test_static_prediction_weights_by_data_size():
    probs = np.zeros((4, 1, 2))
    probs[0, 0] = [1.0, 0.0]
    probs[1, 0] = [0.0, 1.0]
    probs[2, 0] = [0.5, 0.5]
    tasks = np.array([0, 0, 1, 0])
    measured = np.array([True, True, True, False])
    # client 3 (task 0): sizes 1 and 3 -> (1 * [1, 0] + 3 * [0, 1]) / 4 = [0.25, 0.75]
    out = static_prediction(probs, np.array([1, 3, 100, 7]), tasks, measured)
    np.testing.assert_allclose(out[3, 0], [0.25, 0.75])
    np.testing.assert_array_equal(out[:3], probs[:3])
    with pytest.raises(ValueError, match="no measured client"):
        static_prediction(probs, np.ones(4), np.array([0, 0, 1, 2]), measured)


def test_cosine_reference_set_and_importance_by_hand():
    p = np.array([[[1.0, 0.0]], [[1.0, 0.0]], [[0.6, 0.8]], [[0.0, 1.0]], [[0.0, 0.0]]])
    sims = cosine_similarity(p[0], p)
    np.testing.assert_allclose(sims, [1.0, 1.0, 0.6, 0.0, 0.0])
    ref = reference_set(sims, client=0, k=2)
    assert ref.tolist() == [1, 2]
    # p_hat = (1 * [1, 0] + 0.6 * [0.6, 0.8]) / 1.6 = [0.85, 0.3]
    np.testing.assert_allclose(estimated_importance(sims[ref], p[ref]), [[0.85, 0.3]])
    with pytest.raises(ValueError, match="between 1 and N-1"):
        reference_set(sims, 0, 5)
    # clients 1 and 4 have no profile: never references, even to fill K
    has_profile = np.array([True, False, True, True, False])
    assert reference_set(sims, 0, 3, candidates=has_profile).tolist() == [2, 3]
    assert reference_set(sims, 0, 2, candidates=np.eye(5, dtype=bool)[0]).tolist() == []


def test_stage1_profiles_seed_stage2_and_profileless_clients_are_never_references():
    """A never-evaluated client with a zero profile does not move another client's map; with Stage 1's
    p seeding the profiles, the same client is a reference from round 0."""
    from fedmoe_jax.algorithms.fedmoe import FedMoE
    from fedmoe_jax.federated.state import ClientStates

    maps = np.zeros((4, 1, 4), bool)
    maps[:3, 0, :2] = True  # clients 0-2 keep 2 experts
    maps[3, 0, :] = True  # client 3 keeps 4 and is never sampled
    probs = np.array([[[0.6, 0.4, 0.0, 0.0]], [[0.5, 0.5, 0.0, 0.0]], [[0.7, 0.3, 0.0, 0.0]],
                      [[0.1, 0.1, 0.4, 0.4]]], np.float32)
    events = {}
    for seeded in (False, True):
        algo = FedMoE(maps, patience=1, num_references=3, initial_probs=probs if seeded else None)
        states = ClientStates.create(maps, algo.init_extra(4, None), algo.initial_profiles(None, 4))
        np.testing.assert_array_equal(states.probs[3], probs[3] if seeded else 0.0)
        states = algo.update_clients(states, _report(0, [0, 1, 2], [50, 50, 50], probs[:3]))
        states = algo.update_clients(states, _report(1, [0], [40], probs[:1]))  # 0 is stale
        events[seeded] = (list(algo.events), states.expert_maps[0].sum())
    # unseeded: client 3 has no profile, the references are 1 and 2 (2 experts each): nothing moves
    assert events[False] == ([], 2)
    # seeded: client 3 (4 experts) is the third reference; target (2 + 2 + 4) / 3 = 2.67 -> 3
    assert events[True][0][-1]["event"] == "adjust" and events[True][1] == 3


def test_recommend_adds_and_removes():
    mask = np.array([[True, False, False], [True, True, False]])
    p_hat = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    grown = recommend(mask, p_hat, target_count=4.6)  # round(4.6) - 3 = +2: p_hat 0.3 (1,2) and 0.3 (0,1)
    assert grown.tolist() == [[True, True, False], [True, True, True]]
    assert recommend(mask, p_hat, 9.0, max_count=4).sum() == 4  # capped by memory
    shrunk = recommend(mask, p_hat, 1.0)  # -2, but layer 0 must keep one expert
    assert shrunk.tolist() == [[True, False, False], [False, True, False]]
    assert recommend(mask, p_hat, 3.2).tolist() == mask.tolist()  # n = 0: unchanged


def _report(round_num, cohort, scores, probs, losses=None):
    from fedmoe_jax.algorithms import CohortReport

    c = len(cohort)
    return CohortReport(round_num, np.asarray(cohort), np.zeros(c), np.ones(c),
                        np.asarray(scores, np.float32), np.asarray(probs, np.float32),
                        val_losses=None if losses is None else np.asarray(losses, np.float32))


def test_improves_by_hand():
    from fedmoe_jax.federated.algorithm import improves

    score = np.array([0.0, 0.0, 0.0, 5.0, 0.0, 0.0])
    loss = np.array([2.0, 3.0, 2.5, 9.0, np.nan, 1.0])
    best = np.array([0.0, 0.0, 0.0, 4.0, 0.0, -np.inf])
    best_loss = np.array([2.5, 2.5, 2.5, 1.0, 2.5, np.inf])
    # lower loss at a tied score; higher loss; equal loss; higher score whatever the loss; NaN loss;
    # the first evaluation (best -inf)
    assert improves(score, loss, best, best_loss, True).tolist() == [True, False, False, True, False, True]
    assert improves(score, loss, best, best_loss, False).tolist() == [False, False, False, True, False, True]


def test_loss_tie_break_keeps_stuck_scores_from_stalling_and_accepts_trials():
    """All scores 0 (a small model early in training): without the tie-break every client looks
    stale and every trial is rolled back; with it, a falling validation loss is progress."""
    from fedmoe_jax.algorithms.fedmoe import FedMoE
    from fedmoe_jax.federated.state import ClientStates

    maps = np.zeros((3, 1, 4), bool)
    maps[0, 0, :1] = True
    maps[1:, 0, :3] = True
    probs = np.array([[[0.7, 0.3, 0.0, 0.0]], [[0.6, 0.3, 0.1, 0.0]], [[0.5, 0.2, 0.3, 0.0]]])
    runs = {}
    for tie_break in (False, True):
        algo = FedMoE(maps, patience=1, num_references=2, loss_tie_break=tie_break)
        states = ClientStates.create(maps, algo.init_extra(3, None))
        states = algo.update_clients(states, _report(0, [0, 1, 2], [0, 0, 0], probs, [3.0, 3.0, 3.0]))
        states = algo.update_clients(states, _report(1, [0], [0], probs[:1], [2.5]))  # loss falls
        runs[tie_break] = (algo, states)
    algo, states = runs[False]
    assert states.stale_rounds[0] == 1 and states.extra["on_trial"][0]  # 0 > 0 fails: adjusted
    assert states.best_loss[0] == 3.0
    algo, states = runs[True]
    assert states.stale_rounds[0] == 0 and not states.extra["on_trial"][0]
    assert states.best_loss[0] == 2.5 and states.best_score[0] == 0.0
    states = algo.update_clients(states, _report(2, [0], [0], probs[:1], [2.6]))  # stale: adjust
    assert states.extra["on_trial"][0] and states.expert_maps[0, 0].sum() == 3
    assert states.extra["best_loss_before_trial"][0] == 2.5
    states = algo.update_clients(states, _report(3, [0], [0], probs[:1], [2.4]))  # tie, lower loss
    assert algo.events[-1]["event"] == "accept" and states.expert_maps[0, 0].sum() == 3
    # without the tie-break the same trial is rolled back and the client frozen
    algo, states = runs[False]
    states = algo.update_clients(states, _report(2, [0], [0], probs[:1], [2.4]))
    assert algo.events[-1]["event"] == "rollback" and states.frozen[0]


def test_stage2_adjust_accept_rollback_freeze():
    from fedmoe_jax.algorithms.fedmoe import FedMoE
    from fedmoe_jax.federated.state import ClientStates

    maps = np.zeros((4, 1, 4), bool)
    maps[0, 0, :1] = True  # client 0 keeps 1 expert; its references keep 3
    maps[1:, 0, :3] = True
    maps[3, 0, :] = True  # client 3 keeps all 4; its references keep 3
    algo = FedMoE(maps, patience=1, num_references=2)
    states = ClientStates.create(maps, algo.init_extra(4, None))
    probs = np.array([[[1.0, 0.0, 0.0, 0.0]], [[0.6, 0.3, 0.1, 0.0]], [[0.5, 0.2, 0.3, 0.0]],
                      [[0.0, 0.0, 0.2, 0.8]]])
    states = algo.update_clients(states, _report(0, [0, 1, 2, 3], [50, 50, 50, 50], probs))
    assert not states.extra["on_trial"].any()  # first score is an improvement over -inf
    states = algo.update_clients(states, _report(1, [0], [40], probs[:1]))  # no improvement
    # refs of 0: clients 1, 2 (cosine 0.88, 0.85 > 0); target 3 experts: add experts 1 and 2 by p_hat
    assert states.expert_maps[0, 0].tolist() == [True, True, True, False]
    assert states.extra["on_trial"][0] and algo.events[-1]["event"] == "adjust"
    states = algo.update_clients(states, _report(2, [0], [45], probs[:1]))  # below best 50: roll back
    assert states.expert_maps[0, 0].tolist() == [True, False, False, False]
    assert states.frozen[0] and algo.events[-1]["event"] == "rollback"
    states = algo.update_clients(states, _report(3, [0], [10], probs[:1]))
    assert states.expert_maps[0, 0].sum() == 1  # frozen: never adjusted again
    # the accept path: client 3 stalls, is shrunk towards its references, then improves
    states = algo.update_clients(states, _report(4, [3], [20], probs[3:]))
    assert states.extra["on_trial"][3] and states.expert_maps[3, 0].sum() == 3
    states = algo.update_clients(states, _report(5, [3], [70], probs[3:]))
    assert not states.extra["on_trial"][3] and not states.frozen[3]
    assert algo.events[-1]["event"] == "accept"


def test_without_stage2_maps_stay_fixed():
    from fedmoe_jax.algorithms.fedmoe import FedMoE
    from fedmoe_jax.federated.state import ClientStates

    maps = np.ones((3, 1, 2), bool)
    maps[0, 0, 1] = False
    algo = FedMoE(maps, patience=1, num_references=1, adjust=False)
    states = ClientStates.create(maps, algo.init_extra(3, None))
    for r in range(3):
        states = algo.update_clients(states, _report(r, [0], [1.0], np.ones((1, 1, 2)) / 2))
    assert np.array_equal(states.expert_maps, maps) and not algo.events


def test_all_zero_probabilities_fall_back_to_lowest_index_experts():
    probs = np.zeros((2, 4))
    mask, theta = search_submodel(probs, 1.0, 0.0, 2.0)  # budget: one expert per layer
    assert theta == 0.0 and mask.tolist() == [[True, False, False, False]] * 2
    probs[1] = [0.1, 0.2, 0.3, 0.4]  # one informative layer, one empty
    mask, theta = search_submodel(probs, 1.0, 0.0, 100.0)
    assert theta == 0.0 and mask[1].all()  # max coverage 1 in layer 1; layer 0 stays at coverage 0
