"""Partitions: task assignment, IID and Dirichlet label-skew splits (property tests), save/load."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmoe_jax.data.partition import Partition, assign_tasks, make_partition
from fedmoe_jax.data.tasks import SPLITS, TASKS, TaskData

PROPS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _task_data(task, n, num_labels, rng, probs=None):
    labels = rng.choice(num_labels, size=n, p=probs)
    return TaskData(task, [f"in {i}" for i in range(n)], [f"out {i}" for i in range(n)], labels)


def make_data(sizes, num_labels=5, seed=0, tasks=TASKS):
    """Synthetic data: `sizes` = (train, validation, test) example counts for every task."""
    rng = np.random.default_rng(seed)
    return {t: {s: _task_data(t, n, num_labels, rng) for s, n in zip(SPLITS, sizes)} for t in tasks}


def label_entropy(part, data, split="train"):
    """Mean over clients of the entropy (nats) of the client's label distribution."""
    out = []
    for c in range(part.num_clients):
        labels = data[part.task_of(c)][split].labels[part.client_indices(c, split)]
        if labels.size:
            p = np.bincount(labels) / labels.size
            out.append(-np.sum(p[p > 0] * np.log(p[p > 0])))
    return float(np.mean(out))


# --------------------------------------------------------------------------------------------
# assign_tasks
# --------------------------------------------------------------------------------------------


def test_assign_tasks_default_is_ten_per_task_in_blocks():
    ct = assign_tasks()
    assert ct.dtype == np.int32 and ct.shape == (30,)
    np.testing.assert_array_equal(ct, np.repeat([0, 1, 2], 10))


def test_assign_tasks_ratios():
    np.testing.assert_array_equal(assign_tasks(10, ratios=[1, 2, 3]), [0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(assign_tasks(7, ratios={"tc": 1, "rc": 1, "ts": 1}), [0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(assign_tasks(4, tasks=("ts", "tc")), [0, 0, 1, 1])


@PROPS
@given(
    n=st.integers(1, 60),
    ratios=st.lists(st.floats(0.05, 20), min_size=1, max_size=3),
)
def test_assign_tasks_properties(n, ratios):
    tasks = TASKS[: len(ratios)]
    exact = n * np.asarray(ratios) / np.sum(ratios)
    try:
        ct = assign_tasks(n, tasks, ratios)
    except ValueError as e:
        assert "no client for task" in str(e)
        assert np.min(np.floor(exact)) == 0
        return
    counts = np.bincount(ct, minlength=len(tasks))
    assert counts.sum() == n and counts.min() >= 1
    assert np.all(np.abs(counts - exact) < 1)
    assert np.all(np.diff(ct) >= 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_clients=2), "no client for task"),
        (dict(num_clients=0), "positive integer"),
        (dict(ratios=[1, 2]), "2 entries for 3 tasks"),
        (dict(ratios=[1, 0, 1]), "positive and finite"),
        (dict(ratios={"tc": 1, "rc": 1}), "missing"),
        (dict(tasks=("tc", "xx")), "unknown task"),
        (dict(tasks=("tc", "tc")), "distinct"),
    ],
)
def test_assign_tasks_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        assign_tasks(**kwargs)


# --------------------------------------------------------------------------------------------
# make_partition: properties
# --------------------------------------------------------------------------------------------


@PROPS
@given(
    clients=st.lists(st.integers(1, 6), min_size=3, max_size=3),
    sizes=st.tuples(st.integers(0, 120), st.integers(0, 30), st.integers(0, 30)),
    num_labels=st.integers(1, 6),
    setting=st.sampled_from(["T", "TD"]),
    alpha=st.floats(0.01, 100),
    seed=st.integers(0, 2**31),
)
def test_every_example_lands_in_exactly_one_client_of_its_task(
    clients, sizes, num_labels, setting, alpha, seed
):
    data = make_data(sizes, num_labels, seed % 7)
    ct = np.repeat(np.arange(3), clients)
    part = make_partition(data, ct, setting, alpha=alpha, min_examples=0, seed=seed)
    assert part.num_clients == sum(clients)
    for split, n in zip(SPLITS, sizes):
        counts = part.num_examples(split)
        assert counts.sum() == 3 * n
        for t, task in enumerate(TASKS):
            held = [part.client_indices(c, split) for c in part.clients_of(task)]
            assert all(a.dtype == np.int32 and np.all(np.diff(a) > 0) for a in held)
            np.testing.assert_array_equal(np.sort(np.concatenate(held)), np.arange(n))
            assert len(part.clients_of(task)) == clients[t]
        if setting == "T":  # IID: even split
            for task in TASKS:
                c = counts[part.clients_of(task)]
                assert c.max() - c.min() <= 1


@PROPS
@given(seed=st.integers(0, 2**31), other=st.integers(0, 2**31), setting=st.sampled_from(["T", "TD"]))
def test_same_seed_same_partition_other_seed_different(seed, other, setting):
    data = make_data((200, 40, 40))
    ct = assign_tasks(12)
    a = make_partition(data, ct, setting, seed=seed)
    b = make_partition(data, ct, setting, seed=seed)
    assert a.fingerprint() == b.fingerprint()
    for s in SPLITS:
        for x, y in zip(a.indices[s], b.indices[s]):
            np.testing.assert_array_equal(x, y)
    if other != seed:
        c = make_partition(data, ct, setting, seed=other)
        assert c.fingerprint() != a.fingerprint()
        assert any(not np.array_equal(x, y) for x, y in zip(a.indices["train"], c.indices["train"]))


def test_partition_ignores_global_numpy_rng():
    data = make_data((100, 20, 20))
    a = make_partition(data, assign_tasks(6), "TD", seed=3)
    np.random.random(7)  # noqa: NPY002  (moves the legacy global state)
    b = make_partition(data, assign_tasks(6), "TD", seed=3)
    assert a.fingerprint() == b.fingerprint()


def test_task_streams_are_independent_of_other_tasks():
    """A task's split depends on (seed, task) and its own clients, not on the other tasks."""
    data = make_data((100, 20, 20))
    a = make_partition(data, [0, 0, 0, 1, 2], "TD", seed=5)
    b = make_partition(data, [0, 0, 0, 1, 1, 1, 1, 2, 2], "TD", seed=5)
    for s in SPLITS:
        for c in range(3):
            np.testing.assert_array_equal(a.client_indices(c, s), b.client_indices(c, s))


@PROPS
@given(seed=st.integers(0, 10_000))
def test_smaller_alpha_gives_more_label_skew(seed):
    data = make_data((2000, 400, 400), num_labels=10, seed=1, tasks=("tc",))
    ct = np.zeros(10, np.int32)
    ent = {
        a: label_entropy(
            make_partition(data, ct, "TD", alpha=a, min_examples=0, seed=seed, tasks=("tc",)), data
        )
        for a in (0.05, 1.0, 100.0)
    }
    assert ent[0.05] < ent[1.0] < ent[100.0]
    iid = label_entropy(make_partition(data, ct, "T", seed=seed, tasks=("tc",)), data)
    assert abs(ent[100.0] - iid) < 0.05


def test_large_alpha_is_approximately_iid():
    data = make_data((3000, 600, 600), num_labels=6, seed=2, tasks=("tc",))
    part = make_partition(data, np.zeros(6, np.int32), "TD", alpha=1000.0, seed=0, tasks=("tc",))
    for s in SPLITS:
        labels = data["tc"][s].labels
        overall = np.bincount(labels, minlength=6) / labels.size
        counts = part.num_examples(s)
        assert np.all(np.abs(counts / counts.mean() - 1) < 0.15)
        for c in range(6):
            own = np.bincount(labels[part.client_indices(c, s)], minlength=6) / counts[c]
            assert 0.5 * np.abs(own - overall).sum() < 0.1


def test_label_skew_is_shared_by_the_splits():
    """One Dirichlet draw per task: a client's validation/test labels look like its train labels."""
    data = make_data((3000, 1000, 1000), num_labels=8, seed=3, tasks=("tc",))
    part = make_partition(data, np.zeros(5, np.int32), "TD", alpha=0.3, min_examples=1, seed=4, tasks=("tc",))

    def dist(c, s):
        return (
            np.bincount(data["tc"][s].labels[part.client_indices(c, s)], minlength=8)
            / part.num_examples(s)[c]
        )

    same = [0.5 * np.abs(dist(c, "train") - dist(c, s)).sum() for c in range(5) for s in SPLITS[1:]]
    other = [
        0.5 * np.abs(dist(c, "train") - dist(d, "test")).sum() for c in range(5) for d in range(5) if c != d
    ]
    assert max(same) < 0.15 < np.mean(other)


@PROPS
@given(alpha=st.floats(0.05, 5.0), seed=st.integers(0, 1000), m=st.integers(1, 8))
def test_min_examples_is_respected_or_reported(alpha, seed, m):
    data = make_data((120, 40, 40), num_labels=4, seed=seed)
    try:
        part = make_partition(
            data, assign_tasks(9), "TD", alpha=alpha, min_examples=m, seed=seed, max_retries=20
        )
    except ValueError as e:
        msg = str(e)
        assert "\n" not in msg and "alpha" in msg and "min_examples" in msg and "task" in msg
        return
    for s in SPLITS:
        assert part.num_examples(s).min() >= m


def test_min_examples_per_split():
    data = make_data((100, 20, 20))
    part = make_partition(data, assign_tasks(6), "TD", alpha=0.5, min_examples={"train": 5}, seed=0)
    assert part.num_examples("train").min() >= 5
    assert part.min_examples == {"train": 5, "validation": 0, "test": 0}


def test_impossible_constraints_raise_after_bounded_retries():
    one_label = make_data((200, 50, 50), num_labels=1)
    # Tiny alpha puts nearly all of the single label on one client: min_examples cannot be met.
    with pytest.raises(ValueError, match=r"task 'tc'.*5 tries.*raise alpha") as e:
        make_partition(one_label, assign_tasks(9), "TD", alpha=1e-3, min_examples=5, max_retries=5)
    assert "\n" not in str(e.value)
    # Arithmetically impossible: refused before any draw (either setting).
    for setting in ("T", "TD"):
        with pytest.raises(ValueError, match=r"task 'tc' has 50 validation examples for 3 clients.*needs 60"):
            make_partition(one_label, assign_tasks(9), setting, min_examples=20, max_retries=10**9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(setting="X"), "unknown setting"),
        (dict(setting="TD", alpha=0.0), "alpha must be a positive"),
        (dict(setting="TD", alpha=float("nan")), "alpha must be a positive"),
        (dict(seed=-1), "seed must be"),
        (dict(max_retries=0), "max_retries"),
        (dict(min_examples=-1), "min_examples"),
        (dict(min_examples={"dev": 1}), "unknown splits"),
        (dict(client_tasks=[0, 3]), "index into tasks"),
        (dict(client_tasks=[]), "non-empty"),
        (dict(client_tasks=[0.0, 1.0]), "integer"),
    ],
)
def test_make_partition_errors(kwargs, match):
    data = make_data((10, 5, 5))
    kwargs = {"client_tasks": [0, 1, 2], **kwargs}
    with pytest.raises(ValueError, match=match):
        make_partition(data, **kwargs)


def test_missing_task_or_split_is_named():
    data = make_data((10, 5, 5), tasks=("tc", "rc"))
    with pytest.raises(ValueError, match="no task 'ts'"):
        make_partition(data, [0, 1, 2])
    del data["rc"]["test"]
    with pytest.raises(ValueError, match="'rc' lacks the 'test' split"):
        make_partition(data, [0, 1], tasks=("tc", "rc"))


def test_negative_labels_refused_for_td():
    data = make_data((10, 5, 5), tasks=("tc",))
    data["tc"]["train"] = TaskData("tc", ["a"] * 3, ["b"] * 3, [0, -1, 0])
    with pytest.raises(ValueError, match="negative labels"):
        make_partition(data, [0], "TD", tasks=("tc",))


# --------------------------------------------------------------------------------------------
# Partition object: accessors, save/load, tamper detection
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    data = make_data((300, 60, 60), num_labels=7)
    part = make_partition(data, assign_tasks(12, ratios=[2, 1, 1]), "TD", alpha=0.5, min_examples=2, seed=11)
    prefix = tmp_path_factory.mktemp("part") / "partition"
    return data, part, part.save(prefix)


def test_accessors(saved):
    data, part, _ = saved
    assert part.tasks == TASKS and part.setting == "TD" and part.alpha == 0.5 and part.seed == 11
    assert part.task_of(0) == "tc" and part.task_of(11) == "ts"
    np.testing.assert_array_equal(part.clients_of("rc"), [6, 7, 8])
    assert set(part.counts()) == set(SPLITS)
    assert part.source_sizes["rc"] == {"train": 300, "validation": 60, "test": 60}
    with pytest.raises(ValueError):  # read-only arrays keep the fingerprint valid
        part.client_indices(0)[0] = 5
    with pytest.raises(ValueError, match="unknown split"):
        part.num_examples("dev")
    part.check_data(data)
    assert "TD" in repr(part) and part.fingerprint()[:12] in repr(part)


def test_check_data_refuses_other_data(saved):
    _, part, _ = saved
    with pytest.raises(ValueError, match="rebuild the partition"):
        part.check_data(make_data((301, 60, 60)))
    with pytest.raises(ValueError, match="data lacks ts/train"):
        part.check_data(make_data((300, 60, 60), tasks=("tc", "rc")))


def test_save_load_round_trip(saved):
    _, part, (npz, js) = saved
    assert npz.endswith("partition.npz") and js.endswith("partition.json")
    for path in (npz, js, npz[: -len(".npz")]):
        back = Partition.load(path)
        assert back.fingerprint() == part.fingerprint()
        np.testing.assert_array_equal(back.client_tasks, part.client_tasks)
        for s in SPLITS:
            for x, y in zip(back.indices[s], part.indices[s]):
                np.testing.assert_array_equal(x, y)
        assert (back.setting, back.alpha, back.seed, back.tasks) == (
            part.setting,
            part.alpha,
            part.seed,
            part.tasks,
        )
    meta = json.load(open(js))
    assert meta["fingerprint"] == part.fingerprint() and meta["num_clients"] == 12


def test_load_detects_tampering(saved, tmp_path):
    _, part, _ = saved
    prefix = tmp_path / "p"
    npz, js = part.save(prefix)

    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["train_indices"] = arrays["train_indices"][::-1].copy()  # still a valid cover, other clients
    np.savez(npz, **arrays)
    with pytest.raises(ValueError, match="does not match the sha256"):
        Partition.load(prefix)

    part.save(prefix)
    meta = json.load(open(js))
    meta["seed"] = 12
    json.dump(meta, open(js, "w"))
    with pytest.raises(ValueError, match="does not match the sha256"):
        Partition.load(prefix)

    part.save(prefix)
    arrays["train_indices"][0] = 10**6
    np.savez(npz, **arrays)
    with pytest.raises(ValueError, match="corrupt.*within"):
        Partition.load(prefix)

    open(npz, "wb").write(b"not a zip")
    with pytest.raises(ValueError, match="corrupt"):
        Partition.load(prefix)
    open(js, "w").write("{")
    with pytest.raises(ValueError, match="corrupt"):
        Partition.load(prefix)
    with pytest.raises(ValueError, match="does not exist"):
        Partition.load(tmp_path / "missing")


def test_t_setting_has_no_alpha():
    data = make_data((30, 6, 6))
    part = make_partition(data, assign_tasks(3), "T", alpha=0.1)
    assert part.alpha is None
    assert make_partition(data, assign_tasks(3), "T", alpha=7.0).fingerprint() == part.fingerprint()
