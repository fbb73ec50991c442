"""TFDS loaders on tiny local stand-ins with the real feature structure, prepared as array_record
(`fedmoe_jax.data.tiny_tfds`: builders named like the real ones, so TFDS writes the real layout and the
loader reads them unchanged)."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as data_source_base

from fedmoe_jax.data import assign_tasks, embedded_tokenizer, make_partition, tfds_sources
from fedmoe_jax.data.client_arrays import FederatedData
from fedmoe_jax.data.tasks import SPLITS, LazySequence, rc_prompt, tc_prompt, ts_prompt
from fedmoe_jax.data.tfds_sources import TextClusters, cluster_texts, load_tfds_task
from fedmoe_jax.data.tiny_tfds import (
    AG_NAMES,
    TOPICS,
    FakeAgNewsSubset,
    tiny_builder,
    tiny_rows,
    topic_text,
    write_tiny_tfds,
)

SIZES = {"ag_news_subset": {"train": 60, "test": 12}, "squad": {"train": 60, "validation": 15},
         "xsum": {"train": 40, "validation": 9, "test": 9}}
ROWS = tiny_rows(SIZES)
AG, SQUAD, XSUM = ROWS["ag_news_subset"], ROWS["squad"], ROWS["xsum"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return write_tiny_tfds(str(tmp_path_factory.mktemp("tfds")), SIZES)


def _by_input(data):
    return {
        x: (t, r, int(lab)) for x, t, r, lab in zip(data.inputs, data.targets, data.references, data.labels)
    }


def _check_carved(load, expected_train):
    """Our train and validation are disjoint, cover the official train, and validation is 5% of it."""
    train, val = load("train"), load("validation")
    assert (len(train), len(val)) == (57, 3)
    assert set(train.inputs).isdisjoint(val.inputs)
    assert set(train.inputs) | set(val.inputs) == set(expected_train)
    return train, val


def test_ag_news_fields(data_dir):
    expected = {
        tc_prompt(r["title"] + " " + r["description"]): r["label"] for split in AG.values() for r in split
    }
    for split in ("train", "validation", "test"):
        data = load_tfds_task("tc", split, data_dir)
        assert data.task == "tc" and data.label_names == tuple(AG_NAMES)
        for x, t, refs, lab in zip(data.inputs, data.targets, data.references, data.labels):
            assert lab == expected[x] and t == AG_NAMES[lab] and refs == [t]
    test = load_tfds_task("tc", "test", data_dir)
    assert sorted(test.inputs) == sorted(tc_prompt(r["title"] + " " + r["description"]) for r in AG["test"])
    assert "Title 1000000 ü " + TOPICS[1000000 % 3][0] in " ".join(test.inputs)  # the test split's first row
    _check_carved(
        lambda s: load_tfds_task("tc", s, data_dir),
        [tc_prompt(r["title"] + " " + r["description"]) for r in AG["train"]],
    )


def test_squad_fields_and_cluster_labels(data_dir):
    def load(split):
        return load_tfds_task("rc", split, data_dir, num_clusters=3)

    test = load("test")  # the official validation (dev) split
    expected = {rc_prompt(r["question"], r["context"]): r for r in SQUAD["validation"]}
    assert sorted(test.inputs) == sorted(expected)
    for x, t, refs in zip(test.inputs, test.targets, test.references):
        answers = expected[x]["answers"]["text"]
        assert t == answers[0] and refs == answers and len(refs) == 3
    train, val = _check_carved(load, [rc_prompt(r["question"], r["context"]) for r in SQUAD["train"]])
    assert all(len(refs) == 1 and refs[0] == t for t, refs in zip(train.targets, train.references))
    assert test.label_names == ("cluster_0", "cluster_1", "cluster_2")
    # Clusters follow the topics, with the same ids in every split (fitted on train only).
    topic = {
        rc_prompt(r["question"], r["context"]): int(r["question"].split()[-1][:-1]) % 3
        for rows in SQUAD.values()
        for r in rows
    }
    pairs = {(int(lab), topic[x]) for d in (train, val, test) for x, lab in zip(d.inputs, d.labels)}
    assert len(pairs) == 3 and len({p[0] for p in pairs}) == 3


def test_xsum_fields(data_dir):
    for split in ("train", "validation", "test"):
        data = load_tfds_task("ts", split, data_dir, num_clusters=3)
        expected = [(ts_prompt(r["document"]), r["summary"]) for r in XSUM[split]]
        assert sorted(zip(data.inputs, data.targets)) == sorted(expected)
        assert all(refs == [t] for t, refs in zip(data.targets, data.references))
        assert set(data.labels.tolist()) <= {0, 1, 2}
    again = load_tfds_task("ts", "test", data_dir, num_clusters=3)
    assert _by_input(again) == _by_input(load_tfds_task("ts", "test", data_dir, num_clusters=3))


def test_max_examples_reads_only_what_it_returns(data_dir, monkeypatch):
    reads = []
    original = data_source_base.BaseDataSource.__getitems__

    def counting(self, keys):
        reads.append((str(self.split), list(keys)))
        return original(self, keys)

    monkeypatch.setattr(data_source_base.BaseDataSource, "__getitems__", counting)
    monkeypatch.setattr(
        data_source_base.BaseDataSource, "__getitem__", lambda self, k: pytest.fail("one by one")
    )
    assert len(load_tfds_task("tc", "train", data_dir, max_examples=5)) == 5
    assert reads == [("train", [0, 1, 2, 3, 4])]
    reads.clear()
    assert len(load_tfds_task("tc", "validation", data_dir, max_examples=2)) == 2
    assert reads == [("train", [57, 58])]
    reads.clear()
    full = load_tfds_task("rc", "test", data_dir, num_clusters=3)
    reads.clear()
    part = load_tfds_task("rc", "test", data_dir, max_examples=4, num_clusters=3, cluster_fit_examples=60)
    assert sorted(reads) == [("train", list(range(57))), ("validation", [0, 1, 2, 3])]
    assert list(part.inputs) == list(full.inputs[:4]) and part.labels.tolist() == full.labels[:4].tolist()
    assert len(load_tfds_task("ts", "test", data_dir, max_examples=0, num_clusters=3)) == 0


def _load_all(data_dir, lazy, **kwargs):
    return {
        t: {s: load_tfds_task(t, s, data_dir, num_clusters=3, lazy=lazy, **kwargs) for s in SPLITS}
        for t in ("tc", "rc", "ts")
    }


def test_lazy_and_eager_loads_are_identical(data_dir):
    for kwargs in ({}, {"max_examples": 5}):
        lazy, eager = _load_all(data_dir, True, **kwargs), _load_all(data_dir, False, **kwargs)
        for t in lazy:
            for s in SPLITS:
                a, b = lazy[t][s], eager[t][s]
                assert isinstance(a.inputs, LazySequence) and isinstance(b.inputs, list)
                assert len(a) == len(b) and a.label_names == b.label_names
                np.testing.assert_array_equal(a.labels, b.labels)
                for col in ("inputs", "targets", "references"):
                    assert list(getattr(a, col)) == getattr(b, col), (t, s, col)
                sub = [len(b) - 1, 0, 1, 0]
                assert list(a.take(sub).references) == b.take(sub).references
                assert a.inputs[-1] == b.inputs[-1] and list(a.targets[1:4:2]) == b.targets[1:4:2]
    with pytest.raises(IndexError):
        lazy["tc"]["test"].inputs[len(lazy["tc"]["test"])]


def test_lazy_task_data_reads_only_the_rows_accessed(data_dir, monkeypatch):
    reads = []
    original = data_source_base.BaseDataSource.__getitems__

    def counting(self, keys):
        reads.append((str(self.split), list(keys)))
        return original(self, keys)

    monkeypatch.setattr(data_source_base.BaseDataSource, "__getitems__", counting)
    monkeypatch.setattr(tfds_sources, "_CACHE_ROWS", 4)
    monkeypatch.setattr(tfds_sources, "_READ_BATCH", 16)
    data = load_tfds_task("tc", "train", data_dir)  # streams the split once for the labels
    assert sorted(k for _, keys in reads for k in keys) == list(range(57))
    assert all(len(keys) <= 16 for _, keys in reads)
    reads.clear()
    assert data.inputs[5].startswith("topic: Title ")
    assert data.targets[5] == AG_NAMES[data.labels[5]] and data.references[5] == [data.targets[5]]
    assert reads == [("train", [5])]  # the row's other columns come from the cache
    sub = data.take([40, 2, 40])  # a view: reads nothing yet
    assert reads == [("train", [5])]
    assert list(sub.targets) == [AG_NAMES[data.labels[i]] for i in (40, 2, 40)]
    assert reads == [("train", [5]), ("train", [2, 40])]
    reads.clear()
    assert len(list(data.inputs)) == 57  # iteration streams in batches; the cache stays bounded
    assert all(len(keys) <= 16 for _, keys in reads) and len(reads) > 57 // 16
    reads.clear()
    data.inputs[0]
    assert reads == [("train", [0])]


def test_federated_build_on_lazy_tfds_data_equals_eager(data_dir):
    tok = embedded_tokenizer()
    lazy, eager = _load_all(data_dir, True), _load_all(data_dir, False)
    part = make_partition(eager, assign_tasks(6), "TD", alpha=1.0, min_examples=1, seed=3)
    a = FederatedData.build(lazy, part, tok, 32, 8, chunk=5)
    b = FederatedData.build(eager, part, tok, 32, 8)
    assert a.fingerprint() == b.fingerprint() and a.truncated == b.truncated
    assert (a.input_len, a.target_len) == (b.input_len, b.target_len)
    for c in range(part.num_clients):
        for s in SPLITS:
            x, y = a.client_arrays(c, s), b.client_arrays(c, s)
            for k in y:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"client {c} {s} {k}")
            assert list(a.client_examples(c, s).references) == b.client_examples(c, s).references


def test_not_prepared_error_names_the_command(tmp_path):
    for task, name in (("tc", "ag_news_subset"), ("rc", "squad"), ("ts", "xsum")):
        with pytest.raises(ValueError) as err:
            load_tfds_task(task, "train", str(tmp_path))
        message = str(err.value)
        assert "\n" not in message and "not prepared" in message
        assert (
            f"python -m fedmoe_jax.data.tfds_sources prepare --dataset={name} --data_dir={tmp_path}"
            in message
        )
    assert "--manual_dir" in message  # xsum is a manual download


def test_prepare_command_line_prepares_what_the_loader_reads(tmp_path, monkeypatch):
    asked = []

    def fake_builder(name, data_dir):
        asked.append(name)
        return tiny_builder("ag_news_subset", data_dir, AG)

    monkeypatch.setattr(tfds, "builder", fake_builder)
    assert tfds_sources.main(["prepare", "--dataset", "ag_news_subset", "--data_dir", str(tmp_path)]) == 0
    assert asked == ["ag_news_subset"]
    assert len(load_tfds_task("tc", "test", str(tmp_path))) == len(AG["test"])
    with pytest.raises(SystemExit) as exit_info:
        tfds_sources.main(["prepare", "--dataset", "mnist", "--data_dir", str(tmp_path)])
    assert exit_info.value.code == 2


def test_prepare_names_a_missing_package(tmp_path, monkeypatch, capsys):
    class NeedsPackage(FakeAgNewsSubset, skip_registration=True):
        def download_and_prepare(self, **kwargs):
            raise ModuleNotFoundError("No module named 'importlib_resources'", name="importlib_resources")

    monkeypatch.setattr(tfds, "builder", lambda name, data_dir: NeedsPackage(data_dir=data_dir))
    assert tfds_sources.main(["prepare", "--dataset", "squad", "--data_dir", str(tmp_path)]) == 2
    assert "pip install importlib_resources" in capsys.readouterr().err


def test_older_plain_text_squad_layout_is_read(tmp_path):
    squad = tiny_builder("squad", tmp_path, SQUAD, config="plain_text")
    squad.download_and_prepare(file_format="array_record")
    assert os.path.isdir(tmp_path / "squad" / "plain_text" / "3.0.0")
    assert len(load_tfds_task("rc", "test", str(tmp_path), num_clusters=3)) == len(SQUAD["validation"])


def test_bad_names():
    with pytest.raises(ValueError, match="unknown task"):
        load_tfds_task("qa", "train", "/nonexistent")
    with pytest.raises(ValueError, match="unknown split"):
        load_tfds_task("tc", "dev", "/nonexistent")
    with pytest.raises(ValueError, match="unknown dataset"):
        tfds_sources.prepare("mnist", "/nonexistent")


@pytest.fixture
def ag_copy(data_dir, tmp_path):
    shutil.copytree(os.path.join(data_dir, "ag_news_subset"), tmp_path / "ag_news_subset")
    return tmp_path, tmp_path / "ag_news_subset" / "1.0.0"


def test_corrupt_records_error_names_the_file(ag_copy):
    root, version_dir = ag_copy
    shard = version_dir / "ag_news_subset-test.array_record-00000-of-00001"
    blob = bytearray(shard.read_bytes())
    blob[::7] = bytes(b ^ 0x5A for b in blob[::7])
    shard.write_bytes(bytes(blob))
    assert len(load_tfds_task("tc", "train", str(root))) == 57  # other files still read
    with pytest.raises(ValueError) as err:
        load_tfds_task("tc", "test", str(root))
    assert str(shard) in str(err.value) and "\n" not in str(err.value)


def test_corrupt_metadata_and_wrong_format(ag_copy):
    root, version_dir = ag_copy
    info_path = version_dir / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
    with pytest.raises(ValueError, match="prepared as tfrecord.*array_record"):
        load_tfds_task("tc", "test", str(root))
    info_path.write_text('{"name": ')
    with pytest.raises(ValueError, match="cannot read the TFDS metadata") as err:
        load_tfds_task("tc", "test", str(root))
    assert str(version_dir) in str(err.value) and "\n" not in str(err.value)


def test_text_clusters_are_deterministic_and_follow_topics():
    texts = [topic_text(i) for i in range(30)]
    labels = cluster_texts(texts, k=3, seed=0)
    assert labels.dtype == np.int32 and labels.shape == (30,)
    assert np.array_equal(labels, cluster_texts(texts, k=3, seed=0))
    assert {(int(lab), i % 3) for i, lab in enumerate(labels)} == {(int(labels[t]), t) for t in range(3)}
    assert len(set(labels.tolist())) == 3
    clusters = TextClusters.fit(texts, k=3, seed=1)
    new = clusters.assign([topic_text(i, 5) for i in range(300, 306)] + ["", "unseen words only"])
    fitted = clusters.assign(texts)
    assert [int(new[j]) for j in range(6)] == [int(fitted[(300 + j) % 3]) for j in range(6)]
    assert new[6] == 0 and 0 <= new[7] < 3
    with pytest.raises(ValueError, match="cannot fit 3 text clusters to 2 texts"):
        TextClusters.fit(texts[:2], k=3)
