"""Federated arrays: per-client tokens vs a direct tokenizer reference, cohort batches, masks, buckets."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_jax.data import Tokenizer, train_sentencepiece
from fedmoe_jax.data.client_arrays import PAD_CLIENT, FederatedData, length_buckets, pick_bucket
from fedmoe_jax.data.partition import Partition, assign_tasks, make_partition
from fedmoe_jax.data.tasks import SPLITS, TASKS, LazySequence, SequenceView, TaskData

WORDS = (
    "the a cat dog bird fish horse runs jumps sleeps swims over under near big small red green blue "
    "house tree river mountain garden city morning evening night rain snow sun happy tired old young"
).split()
MAX_IN, MAX_OUT = 24, 12
PROPS = settings(max_examples=20, deadline=None)


def _text(r, lo, hi):
    return " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))


def make_data(sizes, seed=0, long_inputs=(1, 40)):
    """Per task: inputs of `long_inputs` words (some longer than MAX_IN tokens), short targets, 4 labels."""
    r = random.Random(seed)
    data = {}
    for t in TASKS:
        data[t] = {}
        for s, n in zip(SPLITS, sizes):
            inputs = [f"{t}: " + _text(r, *long_inputs) for _ in range(n)]
            targets = [_text(r, 1, 6) for _ in range(n)]
            data[t][s] = TaskData(t, inputs, targets, [r.randrange(4) for _ in range(n)])
    return data


class CountingList(LazySequence):
    """A list behind the lazy interface that records the keys of every batched read."""

    def __init__(self, items, log):
        self.items, self.log = list(items), log

    def __len__(self):
        return len(self.items)

    def __getitems__(self, keys):
        keys = list(keys)
        self.log.append(keys)
        return [self.items[k] for k in keys]


def lazy_copy(data, log):
    """`data` with every text column a `CountingList` logging into `log[(task, split, column)]`."""
    out = {}
    for t, splits in data.items():
        out[t] = {}
        for s, d in splits.items():
            x, y = (CountingList(getattr(d, c), log.setdefault((t, s, c), [])) for c in ("inputs", "targets"))
            out[t][s] = TaskData(t, x, y, d.labels, d.label_names)
    return out


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    r = random.Random(0)
    texts = [f"{r.choice(TASKS)}: " + _text(r, 3, 12) for _ in range(300)]
    path = train_sentencepiece(texts, tmp_path_factory.mktemp("spm") / "sp", 50)
    return Tokenizer.from_file(path)


@pytest.fixture(scope="session")
def fed(tok):
    data = make_data((60, 12, 10))
    part = make_partition(data, assign_tasks(9), "TD", alpha=0.5, min_examples=1, seed=1)
    return FederatedData.build(data, part, tok, MAX_IN, MAX_OUT)


def reference_arrays(fed, client, split):
    """Slow, obvious: the client's texts from the partition indices, through `Tokenizer.encode_batch`."""
    task = fed.partition.task_of(client)
    idx = fed.partition.client_indices(client, split)
    d = fed.data[task][split]
    inputs, input_mask = fed.tokenizer.encode_batch([d.inputs[i] for i in idx], MAX_IN)
    targets, target_mask = fed.tokenizer.encode_batch([d.targets[i] for i in idx], MAX_OUT)
    S, T = fed.input_len, fed.target_len
    assert not inputs[:, S:].any() and not targets[:, T:].any()
    return {
        "inputs": inputs[:, :S],
        "input_mask": input_mask[:, :S],
        "targets": targets[:, :T],
        "target_mask": target_mask[:, :T],
        "example_ids": idx,
        "task": np.full(len(idx), TASKS.index(task)),
    }


def test_buckets():
    assert length_buckets(512) == (8, 16, 32, 64, 128, 256, 512)
    assert length_buckets(24) == (8, 16, 24) and length_buckets(8) == (8,)
    assert pick_bucket(9, (8, 16)) == 16 and pick_bucket(16, (16, 8)) == 16
    with pytest.raises(ValueError, match="largest bucket"):
        pick_bucket(17, (8, 16))


def test_widths_are_global_buckets(fed):
    # Some inputs are truncated to MAX_IN = 24, so S is the cap; targets fit the 8 or 12 bucket.
    assert fed.input_len == MAX_IN and sum(v["train"] for v in fed.truncated.values()) > 0
    assert fed.target_len in length_buckets(MAX_OUT)
    longest = max(
        int(fed.client_arrays(c, s)["target_mask"].sum(-1).max(initial=0))
        for c in range(fed.num_clients)
        for s in SPLITS
    )
    assert fed.target_len == pick_bucket(longest, length_buckets(MAX_OUT))


def test_short_data_gets_a_small_bucket(tok):
    data = make_data((20, 5, 5), long_inputs=(1, 2))
    part = make_partition(data, assign_tasks(3))
    for buckets in (None, [5, 11, 64, 100]):
        fed = FederatedData.build(data, part, tok, 512, 512, buckets=buckets)
        allowed = length_buckets(512) if buckets is None else (*buckets, 512)
        for arrays, width in (("input_mask", fed.input_len), ("target_mask", fed.target_len)):
            longest = max(
                int(fed.client_arrays(c, s)[arrays].sum(-1).max()) for c in range(3) for s in SPLITS
            )
            assert width == pick_bucket(longest, allowed) <= 64


def test_client_arrays_match_tokenizer_reference(fed):
    for c in range(fed.num_clients):
        for s in SPLITS:
            got, want = fed.client_arrays(c, s), reference_arrays(fed, c, s)
            assert set(got) == set(want)
            for k in want:
                assert got[k].dtype == np.int32
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"client {c} {s} {k}")
    np.testing.assert_array_equal(fed.num_examples["train"], fed.partition.num_examples("train"))
    assert fed.client_examples(4, "test").inputs == [
        fed.data[fed.partition.task_of(4)]["test"].inputs[i] for i in fed.partition.client_indices(4, "test")
    ]


def test_lazy_task_data_take_is_a_view():
    log = []
    x, y = (CountingList([f"{c}{i}" for i in range(4)], log) for c in "xy")
    d = TaskData("ts", x, y, [0] * 4)
    assert isinstance(d.references, SequenceView) and not log
    sub = d.take([3, 1, -4])
    assert isinstance(sub.inputs, SequenceView) and sub.labels.tolist() == [0, 0, 0] and not log
    assert list(sub.inputs) == ["x3", "x1", "x0"] and log == [[3, 1, 0]]
    assert list(sub.references[1:]) == [["y1"], ["y0"]] and log[-1] == [1, 0]
    assert sub.take([2]).inputs.base is d.inputs  # a view of a view reads the root directly
    assert d.inputs[-1] == "x3" and "x2" in d.inputs and d.inputs[1:3][1] == "x2"
    for bad in (4, -5):
        with pytest.raises(IndexError):
            d.inputs[bad]
    with pytest.raises(IndexError):
        d.take([4])
    assert TaskData("ts", ["x"], ["y"], [0]).take([0]).references == [["y"]]  # lists stay lists


def one_shot_reference(tok, texts, max_len):
    """Slow, obvious: every text through `Tokenizer.encode` at once; (tokens, lengths, truncated)."""
    rows = tok.encode(list(texts), max_length=max_len)
    full = tok.encode(list(texts))
    flat = [i for r in rows for i in r]
    return np.array(flat, np.int64), np.array([len(r) for r in rows]), sum(len(r) > max_len for r in full)


def test_chunked_tokenization_equals_one_shot(fed, tok):
    for chunk in (1, 7, 10**6):
        other = FederatedData.build(fed.data, fed.partition, tok, MAX_IN, MAX_OUT, chunk=chunk)
        assert other.fingerprint() == fed.fingerprint() and other.truncated == fed.truncated
        for t in TASKS:
            for s in SPLITS:
                for r, col, max_len in (
                    (other._inputs[t][s], "inputs", MAX_IN),
                    (other._targets[t][s], "targets", MAX_OUT),
                ):
                    texts = getattr(fed.data[t][s], col)
                    tokens, lengths, truncated = one_shot_reference(tok, texts, max_len)
                    np.testing.assert_array_equal(r.tokens, tokens, err_msg=f"{t} {s} {col} chunk={chunk}")
                    np.testing.assert_array_equal(r.lengths, lengths)
                    np.testing.assert_array_equal(r.offsets, np.concatenate([[0], np.cumsum(lengths)[:-1]]))
                    assert r.truncated == truncated
    with pytest.raises(ValueError, match="chunk must be a positive"):
        FederatedData.build(fed.data, fed.partition, tok, MAX_IN, MAX_OUT, chunk=0)


def test_build_on_lazy_data_equals_eager_and_reads_in_chunks(fed, tok):
    log = {}
    lazy = FederatedData.build(lazy_copy(fed.data, log), fed.partition, tok, MAX_IN, MAX_OUT, chunk=7)
    assert lazy.fingerprint() == fed.fingerprint() and lazy.truncated == fed.truncated
    assert (lazy.input_len, lazy.target_len) == (fed.input_len, fed.target_len)
    for c in range(fed.num_clients):
        for s in SPLITS:
            got, want = lazy.client_arrays(c, s), fed.client_arrays(c, s)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"client {c} {s} {k}")
    for (t, s, _), calls in log.items():
        keys = [k for call in calls for k in call]
        assert all(len(call) <= 7 for call in calls) and keys == list(range(len(fed.data[t][s])))


def test_build_reads_only_examples_some_client_holds(fed, tok):
    held = {s: list(fed.partition.indices[s]) for s in SPLITS}
    dropped = {s: held[s][0] for s in SPLITS}  # client 0 leaves the federation
    held = {s: tuple([np.zeros(0, np.int32)] + held[s][1:]) for s in SPLITS}
    p = fed.partition
    part = Partition(p.tasks, p.client_tasks, held, p.setting, p.alpha, p.seed, p.source_sizes)
    log = {}
    lazy = FederatedData.build(lazy_copy(fed.data, log), part, tok, MAX_IN, MAX_OUT, chunk=5)
    eager = FederatedData.build(fed.data, part, tok, MAX_IN, MAX_OUT)
    assert lazy.fingerprint() == eager.fingerprint()
    task = p.task_of(0)
    for s in SPLITS:
        read = {k for call in log[(task, s, "inputs")] for k in call}
        assert read.isdisjoint(dropped[s].tolist()) and len(read) == len(fed.data[task][s]) - dropped[s].size
        for store, full in ((lazy._inputs, fed._inputs), (lazy._targets, fed._targets)):
            lengths = store[task][s].lengths.copy()
            assert not lengths[dropped[s]].any()
            lengths[dropped[s]] = full[task][s].lengths[dropped[s]]
            np.testing.assert_array_equal(lengths, full[task][s].lengths)
        for c in range(1, fed.num_clients):
            got, want = lazy.client_arrays(c, s), fed.client_arrays(c, s)
            for k, w in (("inputs", lazy.input_len), ("targets", lazy.target_len)):  # widths may shrink
                np.testing.assert_array_equal(got[k], want[k][:, :w])


def _rows(batch, i):
    """Client row i of a cohort batch: its valid examples, flattened over steps in order."""
    m = batch["example_mask"][i]
    keys = ("inputs", "input_mask", "targets", "target_mask", "example_ids", "task")
    return {k: batch[k][i][m] for k in keys}


@PROPS
@given(
    cohort=st.lists(st.integers(0, 8), min_size=1, max_size=5),
    round_=st.integers(0, 1000),
    seed=st.integers(0, 2**31),
    batch_size=st.integers(1, 7),
    epochs=st.integers(1, 3),
)
def test_cohort_batches_are_each_clients_own_examples_permuted(fed, cohort, round_, seed, batch_size, epochs):
    b = fed.cohort_batches(cohort, round_, seed, batch_size, epochs=epochs)
    C, steps = len(cohort), b["step_mask"].shape[1]
    assert b["inputs"].shape == (C, steps, batch_size, fed.input_len)
    assert b["targets"].shape == (C, steps, batch_size, fed.target_len)
    for i, c in enumerate(cohort):
        ref = reference_arrays(fed, c, "train")
        n = len(ref["example_ids"])
        rows = _rows(b, i)
        # Every epoch is one permutation of the client's examples, from default_rng([seed, round, c]).
        rng = np.random.default_rng([seed, round_, c])
        order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
        for k in rows:
            np.testing.assert_array_equal(rows[k], ref[k][order], err_msg=f"client {c} {k}")
        per_epoch = -(-n // batch_size)
        assert b["num_steps"][i] == epochs * per_epoch == b["step_mask"][i].sum()
        assert b["num_examples"][i] == n and b["client_ids"][i] == c
        # Each epoch starts on a fresh step; only its last step is partly masked.
        counts = b["example_mask"][i].sum(-1)[: epochs * per_epoch].reshape(epochs, per_epoch)
        assert np.all(counts[:, :-1] == batch_size) and np.all(
            counts[:, -1] == n - (per_epoch - 1) * batch_size
        )


@PROPS
@given(
    cohort=st.lists(st.integers(0, 8), min_size=1, max_size=4),
    num_steps=st.integers(1, 12),
    batch_size=st.integers(1, 9),
)
def test_num_steps_mode_cycles_through_permutations(fed, cohort, num_steps, batch_size):
    b = fed.cohort_batches(cohort, 3, 7, batch_size, num_steps=num_steps)
    assert (
        b["step_mask"].shape == (len(cohort), num_steps) and b["step_mask"].all() and b["example_mask"].all()
    )
    for i, c in enumerate(cohort):
        ids = fed.partition.client_indices(c, "train")
        rng = np.random.default_rng([7, 3, c])
        total = num_steps * batch_size
        order = np.concatenate([rng.permutation(len(ids)) for _ in range(-(-total // len(ids)))])[:total]
        np.testing.assert_array_equal(b["example_ids"][i].ravel(), ids[order])
        uses = np.bincount(order, minlength=len(ids))
        assert uses.max() - uses.min() <= 1


def test_client_batches_do_not_depend_on_the_cohort(fed):
    alone = fed.cohort_batches([7], 5, 0, 4)
    for cohort in ([3, 7], [7, 3, 0], [PAD_CLIENT, 1, 7, 7]):
        other = fed.cohort_batches(cohort, 5, 0, 4)
        i = cohort.index(7)
        steps = alone["num_steps"][0]
        assert other["num_steps"][i] == steps
        for k in ("inputs", "input_mask", "targets", "target_mask", "example_ids", "example_mask"):
            np.testing.assert_array_equal(other[k][i, :steps], alone[k][0, :steps])
            assert np.all(other[k][i, steps:] == (-1 if k == "example_ids" else 0))
    # every row of a client, padding included, carries its task (per-task decoding reads row 0)
    other = fed.cohort_batches([PAD_CLIENT, 1, 7], 5, 0, 4)
    for i, c in enumerate([1, 7], start=1):
        assert np.all(other["task"][i] == TASKS.index(fed.partition.task_of(c)))
    assert np.all(other["task"][0] == 0)
    # With a fixed number of steps the rows are identical, shapes included.
    a = fed.cohort_batches([7], 5, 0, 4, num_steps=6)
    b = fed.cohort_batches([3, 7], 5, 0, 4, num_steps=6)
    for k in ("inputs", "targets", "example_mask", "step_mask"):
        np.testing.assert_array_equal(b[k][1], a[k][0])


def test_determinism_from_seed_round_client(fed):
    a = fed.cohort_batches([0, 4, 8], 2, 9, 3)
    b = fed.cohort_batches([0, 4, 8], 2, 9, 3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for kwargs in ({"round": 3, "seed": 9}, {"round": 2, "seed": 10}):
        c = fed.cohort_batches([0, 4, 8], batch_size=3, **kwargs)
        assert not np.array_equal(a["example_ids"], c["example_ids"])
        for i in range(3):  # same examples, other order
            np.testing.assert_array_equal(
                np.sort(a["example_ids"][i].ravel()), np.sort(c["example_ids"][i].ravel())
            )


def test_padding_masks(fed):
    b = fed.cohort_batches([2, PAD_CLIENT, 5], 0, 0, 5, epochs=2)
    em, sm = b["example_mask"], b["step_mask"]
    assert em.dtype == sm.dtype == np.bool_
    np.testing.assert_array_equal(em, b["example_ids"] >= 0)
    np.testing.assert_array_equal(sm, em.any(-1))
    np.testing.assert_array_equal(b["num_steps"], sm.sum(-1))
    # Masked examples carry no tokens; real ones start at position 0 and end with EOS.
    for x, m in (("inputs", "input_mask"), ("targets", "target_mask")):
        assert not b[x][~em].any() and not b[m][~em].any()
        assert not b[x][b[m] == 0].any()
        lens = b[m][em].sum(-1)
        assert lens.min() >= 1
        np.testing.assert_array_equal(b[m][em], np.arange(b[m].shape[-1]) < lens[:, None])
        np.testing.assert_array_equal(b[x][em][np.arange(lens.size), lens - 1], 1)
    assert not em[1].any() and not sm[1].any() and b["num_examples"][1] == 0 and b["client_ids"][1] == -1


def test_step_buckets(fed):
    cap = fed.max_steps(2)
    assert cap == int(np.max(-(-fed.num_examples["train"] // 2)))
    shapes = set()
    for r in range(40):
        cohort = np.random.default_rng(r).choice(9, size=3, replace=False)
        b = fed.cohort_batches(cohort, r, 0, 2)
        steps = b["step_mask"].shape[1]
        assert steps >= b["num_steps"].max()
        assert steps == cap or (steps & (steps - 1) == 0 and steps < 2 * b["num_steps"].max())
        shapes.add(b["inputs"].shape)
    assert len(shapes) <= cap.bit_length() + 1
    b = fed.cohort_batches([0, 1], 0, 0, 2, step_buckets=[cap, 1000])
    assert b["step_mask"].shape[1] == cap
    with pytest.raises(ValueError, match="largest bucket"):
        fed.cohort_batches([0, 1], 0, 0, 1, step_buckets=[1])
    assert fed.cohort_batches([PAD_CLIENT], 0, 0, 4)["step_mask"].shape == (1, 1)


def test_eval_batches(fed):
    for c in (0, 5):
        want = fed.client_arrays(c, "validation")
        batches = list(fed.eval_batches(c, "validation", batch_size=4))
        assert len(batches) == -(-len(want["example_ids"]) // 4)
        assert all(x["inputs"].shape == (4, fed.input_len) for x in batches)
        for k in want:
            got = np.concatenate([x[k][x["example_mask"]] for x in batches])
            np.testing.assert_array_equal(got, want[k])
        assert not batches[-1]["inputs"][~batches[-1]["example_mask"]].any()
    ev = fed.cohort_eval_batches([0, 5], 4, "test")
    for i, c in enumerate((0, 5)):
        want = fed.client_arrays(c, "test")
        for k in want:
            np.testing.assert_array_equal(_rows(ev, i)[k], want[k])


def test_eval_subsets_are_fixed_random_samples(fed):
    """`max_examples` picks a fixed uniform subset per (client, split), not the first examples."""
    sizes = fed.num_examples["validation"]
    c = int(np.argmax(sizes))
    m = max(1, int(sizes[c]) // 2)
    ev = fed.cohort_eval_batches([c, c], 4, "validation", max_examples=m)
    again = fed.cohort_eval_batches([c], 3, "validation", max_examples=m)
    want = fed.client_arrays(c, "validation")
    got = [_rows(ev, 0), _rows(ev, 1), _rows(again, 0)]
    assert all(len(g["example_ids"]) == m for g in got)
    for g in got[1:]:  # the same subset whatever the batch size or cohort position
        np.testing.assert_array_equal(g["example_ids"], got[0]["example_ids"])
    assert set(got[0]["example_ids"]) <= set(want["example_ids"])
    # over many sizes the subset is not always the prefix (a prefix of sorted files is biased)
    test_ids = fed.client_arrays(c, "test")["example_ids"]
    subset = lambda k: _rows(fed.cohort_eval_batches([c], 4, "test", max_examples=k), 0)  # noqa: E731
    prefixes = [np.array_equal(subset(k)["example_ids"], test_ids[:k]) for k in range(1, len(test_ids))]
    assert not all(prefixes)
    full = fed.cohort_eval_batches([c], 4, "validation", max_examples=10**6)
    np.testing.assert_array_equal(_rows(full, 0)["example_ids"], want["example_ids"])
    with pytest.raises(ValueError, match="max_examples"):
        fed.cohort_eval_batches([c], 4, "validation", max_examples=0)


def test_errors(fed, tok):
    with pytest.raises(ValueError, match="not both"):
        fed.cohort_batches([0], 0, 0, 2, num_steps=2, epochs=1)
    with pytest.raises(ValueError, match=r"client ids must be in \[0, 9\)"):
        fed.cohort_batches([9], 0, 0, 2)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        fed.cohort_batches([], 0, 0, 2)
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        fed.cohort_batches([0], 0, 0, 0)
    with pytest.raises(ValueError, match="round must be a non-negative"):
        fed.cohort_batches([0], -1, 0, 2)
    with pytest.raises(ValueError, match="unknown split"):
        fed.cohort_batches([0], 0, 0, 2, split="dev")
    with pytest.raises(ValueError, match="max_input_len must be an integer >= 2"):
        FederatedData.build(fed.data, fed.partition, tok, 1, 8)
    with pytest.raises(ValueError, match="rebuild the partition"):
        FederatedData.build(make_data((61, 12, 10)), fed.partition, tok, 8, 8)


def test_fingerprint(fed, tok):
    again = FederatedData.build(fed.data, fed.partition, tok, MAX_IN, MAX_OUT)
    assert again.fingerprint() == fed.fingerprint()
    assert FederatedData.build(fed.data, fed.partition, tok, 16, MAX_OUT).fingerprint() != fed.fingerprint()
    assert "S=24" in repr(fed)


def test_thirty_clients_of_thousands_of_examples(tok):
    """Scale smoke test (timing lives in the benchmark): 33 clients, ~2,000 train examples each."""
    data = make_data((22_000, 2_200, 2_200), long_inputs=(5, 30))
    part = make_partition(data, assign_tasks(33), "TD", alpha=0.5, min_examples=10)
    fed = FederatedData.build(data, part, tok, 64, 16)
    assert fed.num_examples["train"].sum() == 66_000 and fed.num_examples["train"].min() >= 10
    b = fed.cohort_batches([0, 11, 22, 32, 5], 0, 0, 16, epochs=1)
    assert b["inputs"].shape[:3] == (5, b["step_mask"].shape[1], 16)
    np.testing.assert_array_equal(
        b["example_mask"].sum((1, 2)), fed.num_examples["train"][[0, 11, 22, 32, 5]]
    )
