"""The runs client by client, by hand: whose scores a method's clients follow (`client_resemblance`) and
how evenly it serves them (`client_spread`)."""

import pytest

from fedmoe_jax.tools import reports


def _run(method, seed, scores, setting="standard_hetero_td"):
    """A run whose clients "0", "1", ... score `scores` = [(task, score), ...]."""
    summary = {"method": method, "setting": setting, "seed": seed,
               "test_clients": {str(i): {"task": t, "score": s} for i, (t, s) in enumerate(scores)}}
    return reports.Run(path="", rel="", summary=summary, mtime=0.0)


def test_distances_to_the_global_and_the_own_model_by_hand():
    """Seed 0: FedAvg TC 40, 50, RC 60; local TC 80, 90, RC 62; FedMoE TC 50, 85, RC 61 -> TC from FedAvg
    (10 + 35) / 2 = 22.5, from local (30 + 5) / 2 = 17.5; RC 1 / 1. Seed 1 of randomMoE has no local
    run: left out, so randomMoE's TC 40, 50 (seed 0) equal FedAvg's: 0 / 40 -> marked global."""
    fedavg = [("tc", 40.0), ("tc", 50.0), ("rc", 60.0)]
    local = [("tc", 80.0), ("tc", 90.0), ("rc", 62.0)]
    groups = {"standard_hetero_td": {
        "fedavg": [_run("fedavg", 0, fedavg), _run("fedavg", 1, fedavg)],
        "local": [_run("local", 0, local)],
        "fedmoe": [_run("fedmoe", 0, [("tc", 50.0), ("tc", 85.0), ("rc", 61.0)])],
        "random_moe": [_run("random_moe", 0, fedavg), _run("random_moe", 1, local)]},
        "standard_hetero_t": {"fedmoe": [_run("fedmoe", 0, fedavg, "standard_hetero_t")]}}  # no references
    got = reports.client_resemblance(groups)
    assert list(got) == ["standard_hetero_td"] and list(got["standard_hetero_td"]) == ["fedmoe", "random_moe"]
    fedmoe = got["standard_hetero_td"]["fedmoe"]
    assert fedmoe["TC"] == {"to_global": pytest.approx(22.5), "to_local": pytest.approx(17.5), "clients": 2}
    assert fedmoe["RC"] == {"to_global": pytest.approx(1.0), "to_local": pytest.approx(1.0), "clients": 1}
    assert fedmoe["TS"] == {"to_global": None, "to_local": None, "clients": 0}
    rnd = got["standard_hetero_td"]["random_moe"]["TC"]
    assert (rnd["to_global"], rnd["to_local"], rnd["clients"]) == (0.0, 40.0, 2)
    lines = reports.render_client_resemblance(got)
    assert "| FedMoE | 22.5 / 17.5 | 1.0 / 1.0 | — |" in lines
    assert "| randomMoE | 0.0 / 40.0 (global) | 0.0 / 2.0 (global) | — |" in lines
    assert reports.render_client_resemblance({})[0].startswith("Not computed")


def test_a_client_with_another_task_in_a_reference_is_not_paired():
    """Partitions that differ (a client's task is not the same in the reference run) pair nothing."""
    groups = {"standard_hetero_t": {"fedavg": [_run("fedavg", 0, [("rc", 10.0)])],
                                    "local": [_run("local", 0, [("tc", 10.0)])],
                                    "fedmoe": [_run("fedmoe", 0, [("tc", 30.0)])]}}
    assert reports.client_resemblance(groups) == {}


def test_client_spread_by_hand():
    """FedMoE seed 0: TC 40, 60 (mean 50, population sd 10: c_v .2, worst 40), RC 30 alone (no c_v);
    seed 1: TC 20, 20, 20 (c_v 0, worst 20), RC 0, 0 (mean 0: no c_v, worst 0). Seed means: TC c_v .1,
    worst 30; RC worst 15; no TS client. A task with clients but no c_v leaves no client CVI.
    FedProx: TC 10, 30 (c_v .5), RC 50, 150 (c_v .5): client CVI .5."""
    groups = {"standard_hetero_t": {
        "fedmoe": [_run("fedmoe", 0, [("tc", 40.0), ("tc", 60.0), ("rc", 30.0)]),
                   _run("fedmoe", 1, [("tc", 20.0)] * 3 + [("rc", 0.0)] * 2)],
        "fedprox": [_run("fedprox", 0, [("tc", 10.0), ("tc", 30.0), ("rc", 50.0), ("rc", 150.0)])],
        "scaffold": [_run("scaffold", 0, [])]}}  # no client scores: no row
    got = reports.client_spread(groups)["standard_hetero_t"]
    assert list(got) == ["fedmoe", "fedprox"]
    fedmoe = got["fedmoe"]
    assert fedmoe["TC"] == {"cv": pytest.approx(0.1), "worst": pytest.approx(30.0), "clients": 5}
    assert fedmoe["RC"] == {"cv": None, "worst": pytest.approx(15.0), "clients": 3}
    assert fedmoe["TS"] == {"cv": None, "worst": None, "clients": 0} and fedmoe["client_cvi"] is None
    assert got["fedprox"]["client_cvi"] == pytest.approx(0.5)
    lines = reports.render_client_spread({"standard_hetero_t": got})
    assert "| FedMoE | 0.100 (30.0) | — (15.0) | — | — |" in lines
    assert "| FedProx | 0.500 (10.0) | 0.500 (50.0) | — | 0.500 |" in lines
    assert reports.render_client_spread({})[0].startswith("Not computed")
