"""Embedded benchmark loader: sizes, labels, RC spans, disjoint splits, tokenizer, corrupt files."""

import shutil

import numpy as np
import pytest

from fedmoe_jax.data import embedded, wordnet
from fedmoe_jax.data.tasks import SPLITS, TASKS


@pytest.fixture(scope="module")
def bench():
    return embedded.load_embedded_benchmark()


@pytest.fixture(scope="module")
def manifest():
    return embedded.load_manifest()


@pytest.fixture(scope="module")
def ids():
    """Synset ids of every task and split, read from the shipped files."""
    folder = embedded.embedded_dir()
    return {
        t: {
            s: [
                r["id"]
                for r in wordnet.decode_records(folder.joinpath(wordnet.data_file_name(t, s)).read_bytes())
            ]
            for s in SPLITS
        }
        for t in TASKS
    }


@pytest.fixture
def copy(tmp_path):
    """A copy of the shipped folder that a test may damage."""
    dst = tmp_path / "embedded"
    shutil.copytree(str(embedded.embedded_dir()), dst)
    return dst


def test_sizes(bench, manifest):
    assert manifest["source"]["name"] == "WordNet" and manifest["source"]["version"] == "3.0"
    for t in TASKS:
        for s in SPLITS:
            assert len(bench[t][s]) == manifest["sizes"][t][s] > 0
    assert sum(len(bench["tc"][s]) for s in SPLITS) == 117659  # every WordNet 3.0 synset
    assert 30000 < sum(len(bench["rc"][s]) for s in SPLITS) < 33000
    total = sum(f["bytes"] for f in manifest["files"].values())
    assert total < 20e6


def test_labels(bench):
    for t in TASKS:
        for s in SPLITS:
            data = bench[t][s]
            assert data.label_names == wordnet.LEXNAMES and data.num_labels == 45
            assert data.labels.dtype == np.int32 and 0 <= data.labels.min() and data.labels.max() < 45
    tc, ts = bench["tc"]["train"], bench["ts"]["train"]
    assert len(np.unique(tc.labels)) == 45
    assert tc.targets == [tc.label_names[i] for i in tc.labels]
    np.testing.assert_array_equal(tc.labels, ts.labels)  # same synsets, same order
    assert [x.removeprefix("topic: ") for x in tc.inputs] == ts.targets
    assert all(x.startswith("summarize: ") and x.endswith(")") for x in ts.inputs)


def test_rc_spans(bench):
    for s in SPLITS:
        data = bench["rc"][s]
        for x, target, refs in zip(data.inputs, data.targets, data.references):
            question, context = x.removeprefix("question: ").split(" context: ", 1)
            assert question and target == refs[0]
            assert all(ref and ref in context for ref in refs)


def test_splits_disjoint(ids):
    for t in TASKS:
        seen = [set(ids[t][s]) for s in SPLITS]
        assert sum(map(len, seen)) == len(set().union(*seen))
        for s in SPLITS:
            assert ids[t][s] == sorted(ids[t][s])
            assert all(wordnet.split_of(i) == s for i in ids[t][s][:500])
    for s in SPLITS:
        assert set(ids["rc"][s]) <= set(ids["tc"][s]) and ids["tc"][s] == ids["ts"][s]
    n = {s: len(ids["tc"][s]) for s in SPLITS}
    assert 0.78 < n["train"] / sum(n.values()) < 0.82


def test_tokenizer(bench):
    tok = embedded.embedded_tokenizer()
    assert tok.vocab_size == 4096 and (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    texts = bench["rc"]["test"].inputs[:200] + bench["ts"]["test"].targets[:200]
    ids = tok.encode(texts)
    assert [tok.decode(row) for row in ids] == texts
    assert sum(row.count(tok.unk_id) for row in ids) == 0


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        embedded.load_embedded("qa", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        embedded.load_embedded("tc", "dev")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        embedded.load_embedded_benchmark(splits=("train", "dev"))


def test_copy_loads(copy):
    data = embedded.load_embedded_benchmark("rc", "validation", data_dir=copy)
    assert list(data) == ["rc"] and list(data["rc"]) == ["validation"]
    assert len(data["rc"]["validation"]) == embedded.load_manifest()["sizes"]["rc"]["validation"]


def _one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "python -m fedmoe_jax.data.wordnet build" in message


def test_corrupt_file(copy, monkeypatch):
    path = copy / "tc_test.jsonl.gz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    _one_line_error(r"tc_test\.jsonl\.gz is corrupt", embedded.load_embedded, "tc", "test", data_dir=copy)
    embedded.load_embedded("tc", "validation", data_dir=copy)  # the other files still load
    monkeypatch.setenv(embedded.ENV_VAR, str(copy))
    _one_line_error(r"tc_test\.jsonl\.gz is corrupt", embedded.load_embedded, "tc", "test")


def test_missing_files(copy):
    (copy / "rc_train.jsonl.gz").unlink()
    _one_line_error(r"rc_train\.jsonl\.gz is missing", embedded.load_embedded_benchmark, data_dir=copy)
    (copy / "spiece.model").write_bytes(b"not a model")
    _one_line_error(r"spiece\.model is corrupt", embedded.embedded_tokenizer, data_dir=copy)
    (copy / "manifest.json").write_text("{")
    _one_line_error(r"manifest\.json is corrupt", embedded.load_embedded, "ts", "test", data_dir=copy)
    (copy / "manifest.json").unlink()
    _one_line_error(r"manifest\.json is missing", embedded.load_embedded, "ts", "test", data_dir=copy)
