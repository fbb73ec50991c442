"""Atomic writes: the content arrives whole, no temporary file stays behind, NumPy values become JSON."""

import json
import os

import numpy as np
import pytest

from fedmoe_jax.files import atomic_write, json_default, json_get, save_npz, write_json


def test_atomic_write_text_and_bytes_replace_whole_files(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(path, "first version, longer than the second\n")
    atomic_write(str(path), "second ✓\n")
    assert path.read_text(encoding="utf-8") == "second ✓\n"
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_write_json_converts_numpy(tmp_path):
    path = tmp_path / "s.json"
    write_json(path, {"a": np.float32(0.5), "b": np.arange(3), "c": np.int64(7), "d": "x"})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": 7, "d": "x"}
    assert path.read_text().endswith("}\n")


def test_finite_json_and_json_get(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {1: (np.float64("nan"), np.int64(2)), "x": float("inf")}, finite=True)
    assert path.read_text() == '{\n "1": [\n  null,\n  2\n ],\n "x": null\n}\n'
    assert json_default(np.arange(2)) == [0, 1] and json_default(path) == str(path)
    with pytest.raises(TypeError, match="PosixPath"):
        json_default(path, strict=True)
    doc = {"a": {"b": 1, "c": None}}
    assert json_get(doc, "a", "b") == 1 and json_get(doc, "a", "c", "d") is None
    assert json_get(doc, "z", "b") is None and json_get(None, "a") is None and json_get(doc) == doc


def test_save_npz_round_trip(tmp_path):
    path = tmp_path / "a.npz"
    save_npz(path, maps=np.eye(3, dtype=bool), probs=np.full((2, 2), 0.25, np.float32))
    with np.load(path) as z:
        np.testing.assert_array_equal(z["maps"], np.eye(3, dtype=bool))
        assert z["probs"].dtype == np.float32 and z["probs"].sum() == 1.0
    assert os.listdir(tmp_path) == ["a.npz"]


def test_json_kind_names_json_types():
    from fedmoe_jax.files import json_kind

    assert [json_kind(x) for x in ({}, [], "a", 1, 2.5, True, None)] == [
        "object", "array", "string", "number", "number", "boolean", "null"]


def test_write_report_writes_json_and_markdown(tmp_path):
    from fedmoe_jax.files import write_report

    write_report(tmp_path / "new", "x", {"a": np.float32(1.5)}, "# x\n")
    assert json.loads((tmp_path / "new" / "x.json").read_text()) == {"a": 1.5}
    assert (tmp_path / "new" / "x.md").read_text() == "# x\n"


def test_is_disk_full_reads_errno_text_and_causes():
    import errno

    from fedmoe_jax.files import DiskFull, is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    # tensorstore's error under orbax is a ValueError with the OS error in its text
    assert is_disk_full(ValueError("RESOURCE_EXHAUSTED: Failed to write 604858 bytes to file 14: No space "
                                   "left on device [os_error_code='28']"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(ValueError("shape mismatch"))
    message = str(DiskFull("metrics.jsonl", OSError(errno.EDQUOT, "Disk quota exceeded")))
    assert message == ("the disk is full (Disk quota exceeded) while writing metrics.jsonl; free space and "
                       "run the same command again: the checkpoints of earlier rounds are intact")


def test_unwritable_says_why_and_creates_nothing(tmp_path):
    from fedmoe_jax.files import unwritable

    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_folder").mkdir()
    assert unwritable(tmp_path / "new" / "deeper", folder=True) is None  # made later, by the writer
    assert unwritable(tmp_path / "a_folder", folder=True) is None
    assert unwritable(tmp_path / "spec.json") is None and unwritable(tmp_path / "a_file") is None
    assert unwritable(tmp_path / "a_file", folder=True).endswith("a_file is a file")
    assert unwritable(tmp_path / "a_folder").endswith("a_folder is a folder")
    assert unwritable(tmp_path / "a_file" / "x.json").endswith("a_file is not a writable folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder"]
