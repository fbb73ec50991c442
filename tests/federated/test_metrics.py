"""Round metrics: weighted means by hand, jsonl append and resume truncation, TensorBoard events."""

import math
import os

import numpy as np

from fedmoe_jax.federated.metrics import MetricsWriter, read_metrics, weighted_means


def test_weighted_means_by_hand():
    # (1 * 2 + 3 * 6) / 4 = 5 example-weighted; (2 + 6) / 2 = 4 client-weighted; NaN ignored
    got = weighted_means([2.0, 6.0, math.nan], [1, 3, 10])
    assert got == {"example_weighted": 5.0, "client_weighted": 4.0}
    assert math.isnan(weighted_means([math.nan], [1])["client_weighted"])


def test_writer_appends_and_resume_drops_later_rounds(tmp_path):
    with MetricsWriter(str(tmp_path)) as w:
        for r in (1, 2, 3):
            w.write({"round": r, "train_loss": 1.0 / r, "cohort": [0, r]})
    assert [row["round"] for row in read_metrics(str(tmp_path))] == [1, 2, 3]
    # resuming from the checkpoint of round 2 drops row 3, then the run writes it again
    with MetricsWriter(str(tmp_path), resume_round=2) as w:
        assert [row["round"] for row in read_metrics(str(tmp_path))] == [1, 2]
        w.write({"round": 3, "train_loss": 0.5})
    rows = read_metrics(str(tmp_path))
    assert [row["round"] for row in rows] == [1, 2, 3] and rows[-1]["train_loss"] == 0.5
    events = os.listdir(tmp_path / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)


def test_rows_are_strict_json_with_null_for_non_finite(tmp_path):
    """A mean over no clients (NaN) is written as null: every line parses as strict JSON."""
    import json

    from fedmoe_jax.federated.metrics import METRICS_FILE, MetricsWriter

    with MetricsWriter(str(tmp_path), tensorboard=False) as w:
        w.write({"round": 1, "train_loss": float("nan"), "client_train_loss": [np.float32(np.inf), 1.5],
                 "probs": np.array([np.nan, 0.25])})

    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    (line,) = (tmp_path / METRICS_FILE).read_text().splitlines()
    row = json.loads(line, parse_constant=refuse)
    assert row == {"round": 1, "train_loss": None, "client_train_loss": [None, 1.5], "probs": [None, 0.25]}


def test_resume_rebuilds_lost_and_cut_rows_from_the_checkpoint(tmp_path, caplog):
    """The checkpoint's rows win over the file's: a row cut short after its round was checkpointed,
    or lost, comes back; without them (an older checkpoint) a missing row is warned about."""
    import logging

    from fedmoe_jax.federated.metrics import METRICS_FILE

    rows = [{"round": r, "train_loss": 1.0 / r} for r in (1, 2, 3)]
    with MetricsWriter(str(tmp_path), tensorboard=False) as w:
        for row in rows:
            w.write(row)
    path = tmp_path / METRICS_FILE
    text = path.read_text()
    path.write_text(text[: len(text) - 10])  # row 3 cut short (its round was checkpointed)
    with caplog.at_level(logging.WARNING):
        MetricsWriter(str(tmp_path), resume_round=3, tensorboard=False).close()
    assert [row["round"] for row in read_metrics(str(tmp_path))] == [1, 2]
    assert "lacks the row(s) of round(s) 3" in caplog.text
    MetricsWriter(str(tmp_path), resume_round=3, tensorboard=False, rows=rows).close()
    assert read_metrics(str(tmp_path)) == rows
