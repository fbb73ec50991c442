"""The report beyond the paper, by hand: FedMoE against FedAvg / FedAvg + FT / local training with
seed-paired intervals, personalized vs global scores, what the plain words say (the floor itself:
`test_floor.py`)."""

import json

import numpy as np
import pytest

from fedmoe_jax.tools import reports


def _row(tc, rc, ts, global_scores=None):
    row = {}
    for col, by_seed in (("TC", tc), ("RC", rc), ("TS", ts)):
        row[col], row[f"{col}_by_seed"] = float(np.mean(list(by_seed.values()))), by_seed
    for col, v in (global_scores or {}).items():
        row[f"global_{col}"] = v
    return row


def test_reference_comparison_pairs_seeds_and_marks_significance():
    """FedMoE minus FedAvg + FT. TC diffs 10, 11, 9: mean 10, CI 10 +- 2.484138 (t_{0.975,2} 4.302653 *
    s 1 / sqrt 3), significant, 3/3 above. RC diffs -1, -2, -3: CI -2 +- 2.484138 holds 0. TS: one seed."""
    table = {"standard_hetero_t": {
        "fedmoe": _row({"0": 20.0, "1": 22.0, "2": 24.0}, {"0": 1.0, "1": 1.0, "2": 1.0}, {"0": 5.0}),
        "fedavg_ft": _row({"0": 10.0, "1": 11.0, "2": 15.0}, {"0": 2.0, "1": 3.0, "2": 4.0}, {"0": 1.0}),
        "fedprox": _row({"0": 1.0}, {"0": 1.0}, {"0": 1.0})},  # a paper baseline: not a reference point
        "enforced_hetero_t": {"fedavg": _row({"0": 1.0}, {"0": 1.0}, {"0": 1.0})}}  # no FedMoE: left out
    cmp = reports.reference_comparison(table)
    assert list(cmp) == ["standard_hetero_t"] and list(cmp["standard_hetero_t"]) == ["fedavg_ft"]
    tc, rc, ts = (cmp["standard_hetero_t"]["fedavg_ft"][c] for c in ("TC", "RC", "TS"))
    assert tc["diff"] == pytest.approx(10.0) and tc["significant"] is True
    assert tc["paired"]["ci"] == pytest.approx((10.0 - 2.484138, 10.0 + 2.484138), abs=1e-5)
    assert rc["diff"] == pytest.approx(-2.0) and rc["significant"] is False and rc["paired"]["better"] == 0
    assert ts["diff"] == pytest.approx(4.0) and ts["significant"] is None and ts["paired"]["ci"] is None
    lines = reports.render_reference_comparison(cmp)
    assert "| FedAvg + FT | **+10.00 [+7.52, +12.48] 3/3** | -2.00 [-4.48, +0.48] 0/3 | +4.00 |" in lines
    assert "No setting has FedMoE runs" in reports.render_reference_comparison({})[0]


def test_global_vs_personal_lists_the_methods_that_scored_their_global_model():
    table = {"standard_hetero_t": {
        "fedavg_ft": _row({"0": 30.0}, {"0": 40.0}, {"0": 5.0}, {"TC": 20.0, "RC": 35.0, "TS": 4.0}),
        "local": _row({"0": 10.0}, {"0": 10.0}, {"0": 1.0})}}
    got = reports.global_vs_personal(table)
    assert got == {"standard_hetero_t": {"fedavg_ft": {"TC": (30.0, 20.0), "RC": (40.0, 35.0),
                                                       "TS": (5.0, 4.0)}}}
    lines = reports.render_global_vs_personal(got)
    assert "| FedAvg + FT | 30.00 / 20.00 | 40.00 / 35.00 | 5.00 / 4.00 |" in lines


def test_global_vs_personal_pairs_the_seeds_that_scored_both():
    """Seeds 0, 1, 2 scored personal TC 10, 20, 30; only 0 and 1 scored the global model (5, 15): the
    pair is (15, 10) over seeds 0 and 1, not (20, 10) over different seed sets."""
    row = _row({"0": 10.0, "1": 20.0, "2": 30.0}, {"0": 1.0}, {"2": 3.0})
    row.update(global_TC=10.0, global_TC_by_seed={"0": 5.0, "1": 15.0},
               global_RC=2.0, global_RC_by_seed={"0": 2.0}, global_TS=None, global_TS_by_seed={})
    got = reports.global_vs_personal({"standard_hetero_t": {"fedavg": row}})["standard_hetero_t"]["fedavg"]
    assert got == {"TC": (15.0, 10.0), "RC": (1.0, 2.0), "TS": (None, None)}


def test_in_plain_words_says_ahead_behind_tested_and_floor():
    from fedmoe_jax.tools.reports.markdown import in_plain_words

    one = {"standard_hetero_t": {"fedmoe": {**_row({"0": 70.0}, {"0": 60.0}, {"0": 14.0}), "seeds": 1},
                                 "random_moe": {**_row({"0": 65.0}, {"0": 62.5}, {"0": 14.0}), "seeds": 1}}}
    clear = {"standard_hetero_t": {"fedmoe": [], "random_moe": []}}
    lines = in_plain_words(one, ["random_moe", "fedprox"], clear)
    assert lines[0] == "## In plain words"
    assert lines[2] == ("- Standard-Hetero-T, FedMoE against randomMoE: ahead on TC +5.0; behind on RC -2.5 "
                        "(seed means, points). Fewer than two paired seeds: these differences are not "
                        "tested; only a grid of seeds decides them. Every score is above the "
                        "trivial-baseline floor.")
    seeds = {"0": 1.0, "1": 2.0, "2": 3.0}
    three = {"enforced_hetero_td": {"fedmoe": _row(seeds, seeds, {**seeds, "3": 9.0}),
                                    "random_moe": _row(seeds, seeds, {**seeds, "4": 9.0})}}
    text = in_plain_words(three, ["random_moe"], {"enforced_hetero_td": {"fedmoe": ["RC"]}})[2]
    assert "randomMoE: level" in text and "3+ paired seeds: no difference is significant" in text
    assert text.endswith("At or below the trivial-baseline floor: FedMoE (RC).")
    # TC: FedMoE - randomMoE = 5, 6, 7 (mean 6, 95 % interval 6 +- 4.302653 / sqrt 3 = [3.52, 8.48]:
    # significant); RC: -1, +1, 0 (means equal: level); TS: -1, 3, 1 (mean 1, interval 1 +- 4.97: not).
    # FedAvg + FT, a reference point: TC -10, -9, -8 (significant); its RC and TS means equal FedMoE's.
    def by_seed(*values):
        return dict(zip(("0", "1", "2"), map(float, values)))

    fed = _row(by_seed(10, 12, 14), by_seed(1, 2, 3), by_seed(1, 5, 3))
    rand = _row(by_seed(5, 6, 7), by_seed(2, 1, 3), by_seed(2, 2, 2))
    ft = _row(by_seed(20, 21, 22), by_seed(1, 2, 3), by_seed(1, 5, 3))
    text = in_plain_words({"standard_hetero_t": {"fedmoe": fed, "random_moe": rand, "fedavg_ft": ft}},
                          ["random_moe"])[2]
    assert text == ("- Standard-Hetero-T, FedMoE against randomMoE: ahead on TC +6.0†, TS +1.0 | "
                    "FedAvg + FT: behind on TC -9.0† (seed means, points). 3+ paired seeds: † marks the 2 "
                    "differences whose paired 95 % interval excludes 0; the others are undecided.")
    assert in_plain_words({"standard_hetero_t": {"fedprox": one["standard_hetero_t"]["random_moe"]}},
                          ["fedprox"]) == []  # no FedMoE row: nothing to say


def test_seeds_to_add_names_undecided_gaps_above_half_their_spread():
    """Three paired seeds. TC diffs 1, 3, 5: mean 3, s 2, CI 3 +- 4.968 holds 0 and 3 > 1: wanted.
    RC diffs 10, 11, 9: decided (CI 10 +- 2.48). TS diffs 1, -1, 0.5: mean 0.17 < s/2 = 0.53: noise, not
    wanted. Against randomMoE with five seeds: never wanted."""
    table = {"standard_hetero_t": {
        "fedmoe": _row({"0": 11.0, "1": 13.0, "2": 15.0}, {"0": 20.0, "1": 22.0, "2": 24.0},
                       {"0": 2.0, "1": 1.0, "2": 1.5}),
        "fedprox": _row({"0": 10.0, "1": 10.0, "2": 10.0}, {"0": 10.0, "1": 11.0, "2": 15.0},
                        {"0": 1.0, "1": 2.0, "2": 1.0}),
        "random_moe": _row({"0": 10.0, "1": 10.0, "2": 10.0}, {"0": 1.0}, {"0": 1.0})}}
    table["standard_hetero_t"]["fedmoe"]["TC_by_seed"].update({"3": 12.0, "4": 14.0})
    table["standard_hetero_t"]["random_moe"]["TC_by_seed"].update({"3": 10.0, "4": 9.0})
    wanted = reports.seeds_to_add(table, ["fedprox", "random_moe", "scaffold"])
    assert wanted == {"standard_hetero_t": [{"baseline": "fedprox", "task": "TC", "seeds": 3,
                                             "mean": pytest.approx(3.0), "spread": pytest.approx(2.0)}]}
    assert "| Standard-Hetero-T | FedProx | TC | 3 | +3.00 | 2.00 |" in reports.render_seeds_to_add(wanted)
    assert reports.render_seeds_to_add({})[0].startswith("None:")


def test_cli_seeds_spec_writes_the_next_seed_and_refuses_runs_no_sweep_made(tmp_path, capsys):
    """FedMoE vs randomMoE TC, seeds 0 and 1: diffs +2, +6 (mean 4 > spread 2.83 / 2, 95 % interval
    4 +- 25.4 holds 0): seed 2 of both is wanted, and the spec of the grid's recorded sweep runs it."""
    from fedmoe_jax.tools import sweeps

    root = tmp_path / "runs"
    for method, tcs in (("fedmoe", (62.0, 66.0)), ("random_moe", (60.0, 60.0))):
        for seed, tc in enumerate(tcs):
            (root / f"{method}{seed}").mkdir(parents=True)
            summary = {"method": method, "setting": "standard_hetero_t", "seed": seed, "rounds": 1,
                       "test": {"tc_accuracy": tc, "rc_f1": 50.0, "ts_rouge2": 10.0}}
            (root / f"{method}{seed}" / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()
    spec_file = tmp_path / "more.json"
    assert reports.run_report(str(root), out=str(tmp_path / "a"), baselines=["random_moe"],
                              seeds_spec=str(spec_file)) == 2  # no sweep.json under the root
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --seeds-spec: ") and "sweep.json" in err[0]
    assert not (tmp_path / "a").exists() and not spec_file.exists()
    grid = sweeps.spec_from_dict({"config": "configs/cpu.py", "args": ["standard_hetero_t"],
                                  "grid": {"seed": [0, 1], "method": ["fedmoe", "random_moe"]},
                                  "set": {"model.build_pretrained": False}, "root": str(root)})
    sweeps.write_sweep_json(grid, [])
    assert reports.run_report(str(root), out=str(tmp_path / "a"), baselines=["random_moe"],
                              seeds_spec=str(tmp_path)) == 2  # a folder, not a file
    assert "is a folder" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert reports.run_report(str(root), out=str(tmp_path / "a"), baselines=["random_moe"],
                              seeds_spec=str(spec_file)) == 0
    spec = sweeps.load_spec(str(spec_file))
    assert spec.args == ["standard_hetero_t"]
    assert spec.grid == {"seed": [2], "method": ["fedmoe", "random_moe"]}
    assert spec.set == {"model.build_pretrained": False} and spec.root == str(root / "more_seeds" / "seeds=2")
    assert "python experiments/sweep.py --spec=" in capsys.readouterr().out
