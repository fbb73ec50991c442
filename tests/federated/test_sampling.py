"""Cohort samplers: pure functions of (seed, round), uniform and one-per-task."""

import numpy as np
import pytest

from fedmoe_jax.federated.sampling import sample_cohort, sample_enforced, sample_uniform


def test_uniform_is_pure_distinct_and_covers_clients():
    a = sample_uniform(0, 3, 30, 5)
    assert a.tolist() == sample_uniform(0, 3, 30, 5).tolist()
    assert len(set(a.tolist())) == 5 and a.min() >= 0 and a.max() < 30
    rounds = [tuple(sample_uniform(0, r, 30, 5)) for r in range(200)]
    assert len(set(rounds)) > 150  # rounds differ
    counts = np.bincount(np.concatenate(rounds), minlength=30)
    # 1000 draws over 30 clients: expected 33.3 each; a uniform sampler stays well inside 10..60
    assert counts.min() > 10 and counts.max() < 60
    other_seeds = [sample_uniform(s, 3, 30, 5).tolist() for s in (1, 2, 3)]
    assert any(o != a.tolist() for o in other_seeds)


def test_enforced_takes_one_client_per_task():
    tasks = np.repeat([0, 1, 2], 10)
    for r in range(20):
        cohort = sample_enforced(7, r, tasks)
        assert tasks[cohort].tolist() == [0, 1, 2]
    seen = {int(sample_enforced(7, r, tasks)[0]) for r in range(100)}
    assert len(seen) == 10  # every client of task 0 gets its turn


def test_bad_arguments():
    with pytest.raises(ValueError, match="cohort_size=31"):
        sample_uniform(0, 0, 30, 31)
    with pytest.raises(ValueError, match="seed and round"):
        sample_uniform(-1, 0, 30, 5)
    with pytest.raises(ValueError, match="unknown sampling scheme"):
        sample_cohort("random", 0, 0, np.zeros(3), 1)
