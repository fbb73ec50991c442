"""Tokenizer: a tiny SentencePiece model trained on generated text, T5 conventions, errors."""

import os
import random
import shutil

import numpy as np
import pytest

from fedmoe_jax.data import Tokenizer, train_sentencepiece
from fedmoe_jax.data.tokenizer import SPIECE_FILE

WORDS = (
    "the a cat dog bird fish horse runs jumps sleeps swims flies eats quickly slowly over under near big "
    "small red green blue yellow house tree river mountain garden city village morning evening night rain "
    "snow sun happy tired hungry old young teacher student farmer doctor writes reads sings paints builds "
    "every never always"
).split()
VOCAB = 150


def _sentences(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [
        " ".join(r.choice(WORDS) for _ in range(r.randint(3, 12))).capitalize() + r.choice(".!?")
        for _ in range(n)
    ]


@pytest.fixture(scope="session")
def texts():
    return _sentences(400)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory, texts):
    """A directory laid out like a Hugging Face T5 / Switch checkpoint (tokenizer files only)."""
    d = tmp_path_factory.mktemp("switch-tiny")
    path = train_sentencepiece(texts, d / "spiece", VOCAB)
    assert path == str(d / SPIECE_FILE)
    (d / "config.json").write_text('{"model_type": "switch_transformers"}')
    return d


@pytest.fixture(scope="session")
def tok(checkpoint_dir):
    return Tokenizer.from_pretrained(checkpoint_dir)


def test_t5_conventions(tok):
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.vocab_size == len(tok) == VOCAB
    assert [tok.processor.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert tok.processor.bos_id() == -1


def test_round_trip(tok, texts):
    for t in texts[:50] + _sentences(20, seed=1):
        ids = tok.encode(t)
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1] and tok.pad_id not in ids
        assert tok.decode(ids) == t
    assert tok.encode(texts[0], add_eos=False) == tok.encode(texts[0])[:-1]
    assert tok.encode(texts[:3]) == [tok.encode(t) for t in texts[:3]]
    assert tok.decode(tok.encode(texts[:3])) == texts[:3]
    assert tok.decode(tok.encode_batch(texts[:3], max_length=64)[0]) == texts[:3]
    assert tok.unk_id in tok.encode("Zebra")  # 'Z' never occurs in the training text


def test_decode_stops_at_eos_and_skips_pad(tok):
    a, b = tok.encode("The cat sleeps.", add_eos=False), tok.encode("A dog runs.")
    assert tok.decode([0] + a + [0, 1] + b) == "The cat sleeps."
    assert tok.decode(a + [-100, VOCAB + 5]) == "The cat sleeps."  # label filler, sentinel rows


def test_truncation_keeps_eos(tok, texts):
    long = max(texts, key=lambda t: len(tok.encode(t)))
    full = tok.encode(long)
    assert len(full) > 6
    cut = tok.encode(long, max_length=6)
    assert cut == full[:5] + [tok.eos_id]
    assert tok.encode(long, max_length=6, add_eos=False) == full[:6]
    assert tok.encode("A cat.", max_length=64) == tok.encode("A cat.")
    with pytest.raises(ValueError, match="max_length"):
        tok.encode(long, max_length=1)


def test_encode_batch_pads_and_masks(tok, texts):
    batch = [texts[0], "A cat.", max(texts, key=len)]
    ids, mask = tok.encode_batch(batch, max_length=10)
    assert ids.shape == mask.shape == (3, 10) and ids.dtype == np.int32
    for i, t in enumerate(batch):
        want = tok.encode(t, max_length=10)
        n = len(want)
        assert ids[i, :n].tolist() == want and ids[i, n - 1] == tok.eos_id
        assert (ids[i, n:] == tok.pad_id).all()
        assert mask[i].tolist() == [1] * n + [0] * (10 - n)
    assert mask[2].all() and ids[2, -1] == tok.eos_id  # truncated row: EOS in the last slot
    assert tok.decode(ids[1]) == "A cat."
    with pytest.raises(ValueError, match="list of strings"):
        tok.encode_batch("A cat.", max_length=10)


def test_training_is_deterministic(tmp_path, tok, texts):
    other = Tokenizer.from_file(train_sentencepiece(texts, tmp_path / "again.model", VOCAB))
    assert [other.processor.id_to_piece(i) for i in range(VOCAB)] == [
        tok.processor.id_to_piece(i) for i in range(VOCAB)
    ]
    assert [other.encode(t) for t in texts[:20]] == [tok.encode(t) for t in texts[:20]]


def test_errors(tmp_path, checkpoint_dir, texts):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"no {SPIECE_FILE}.*{SPIECE_FILE}"):
        Tokenizer.from_pretrained(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / SPIECE_FILE).write_bytes(b"this is not a protobuf \xff\xfe")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        Tokenizer.from_pretrained(bad)
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_file(missing / SPIECE_FILE)
    # A model with other special ids would pad with a real token: refused.
    train_sentencepiece(texts, tmp_path / "nont5", VOCAB, pad_id=3, unk_id=0)
    with pytest.raises(ValueError, match="expected T5 ids"):
        Tokenizer.from_file(tmp_path / "nont5.model")
    with pytest.raises(ValueError, match="training failed"):
        train_sentencepiece(texts, tmp_path / "huge", 100_000)
    with pytest.raises(ValueError, match="does not exist"):
        train_sentencepiece(texts, missing / "spiece", VOCAB)
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_sentencepiece(["", ""], tmp_path / "none", VOCAB)


def test_error_messages_are_one_line(tmp_path):
    with pytest.raises(ValueError) as e:
        Tokenizer.from_pretrained(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path / SPIECE_FILE) in str(e.value)


def test_matches_transformers_t5_tokenizer(checkpoint_dir, tok, texts, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(os.path.join(checkpoint_dir, SPIECE_FILE), hf_dir / SPIECE_FILE)
    hf = transformers.T5Tokenizer.from_pretrained(str(hf_dir))
    assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2)
    for t in texts[:8] + ["The cat, the dog.", "Hello  world", "Zebra ü"]:
        assert hf(t)["input_ids"] == tok.encode(t), t
    ids, mask = tok.encode_batch(texts[:4], max_length=8)
    want = hf(texts[:4], max_length=8, truncation=True, padding="max_length", return_tensors="np")
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
