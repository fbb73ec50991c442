"""Table 1's floor (`--floor`), by hand: the best trivial baseline per task, one file per partition
(T, TD) scored as runs are, refused when it measured other data or two files claim one setting."""

import json

import numpy as np
import pytest

from fedmoe_jax.tools import reports

POOLED = {"tc": {"majority": {"accuracy": 18.8}, "naive_bayes": {"accuracy": 64.7}},
          "rc": {"rarest_context_word": {"f1": 63.4, "exact_match": 61.8}},
          "ts": {"lead": {"rouge2": 13.0, "rouge1": 31.6}, "constant": {"rouge2": 4.7, "rouge1": 40.0}}}


def _row(tc, rc, ts):
    return {"TC": tc, "RC": rc, "TS": ts}


def _baselines_file(path, clients=None, **fields):
    """An older file (the whole test split only) or, with `clients`, one scored as runs are."""
    doc = {"baselines": POOLED, **fields}
    if clients is not None:
        doc["clients"] = clients
    path.write_text(json.dumps(doc))
    return path


def _clients(partition, tc, rc, ts, num_clients=15, alpha=0.1):
    return {"setting": {"T": "standard_hetero_t", "TD": "standard_hetero_td"}[partition],
            "partition": partition, "num_clients": num_clients, "alpha": alpha, "seeds": [0, 1, 2],
            "baselines": {"tc": {"naive_bayes": {"accuracy": tc[0]},
                                 "naive_bayes_client_prior": {"accuracy": tc[1]}},
                          "rc": {"rarest_context_word": {"f1": rc}},
                          "ts": {"lead": {"rouge2": ts}, "constant": {"rouge2": 4.0}}},
            "by_seed": {}}


def test_the_floor_is_the_best_baseline_of_each_task_by_its_primary_metric(tmp_path):
    floor = reports.load_floor(str(_baselines_file(tmp_path / "baselines.json")))
    assert floor == {"TC": {"baseline": "naive_bayes", "value": 64.7},
                     "RC": {"baseline": "rarest_context_word", "value": 63.4},
                     "TS": {"baseline": "lead", "value": 13.0}}  # ROUGE-2 decides, not ROUGE-1
    assert reports.load_floor(str(tmp_path)) == floor  # the folder holding it
    table = {"standard_hetero_t": {"fedmoe": _row(70.0, 63.4, 12.0), "fedprox": _row(80.0, 70.0, 20.0)},
             "standard_hetero_td": {"fedmoe": _row(1.0, 1.0, 1.0)}}
    floors = {"standard_hetero_t": floor}  # TD has none: left out, not judged against T's
    below = reports.floor_check(table, floors)
    assert below == {"standard_hetero_t": {"fedmoe": ["RC", "TS"], "fedprox": []}}  # equal counts as at
    lines = reports.render_floor(floors, below)
    assert ("| Standard-Hetero-T | TC 64.70 (naive bayes), RC 63.40 (rarest context word), TS 13.00 (lead) "
            "| FedMoE (RC, TS) |") in lines
    (tmp_path / "bad.json").write_text('{"baselines": {"tc": {}}}')
    (tmp_path / "list.json").write_text("[]")
    for bad in (tmp_path / "bad.json", tmp_path / "list.json", tmp_path / "nowhere.json"):
        with pytest.raises(ValueError, match="not a readable baselines.json") as e:
            reports.load_floor(str(bad))
        assert "\n" not in str(e.value)


def test_a_file_scored_as_runs_are_is_the_floor_of_its_partition_only(tmp_path):
    """The clients' scores decide (the personalized NB's 79.4 over NB's 65.2; RC 55.3 under the pooled
    63.4); a T file serves Standard- and Enforced-Hetero-T, a TD file the TD settings; an older file
    serves every setting, so beside a partition's file it claims that setting twice."""
    t = _baselines_file(tmp_path / "t.json", _clients("T", (64.7, 64.2), 63.4, 13.0))
    td = _baselines_file(tmp_path / "td.json", _clients("TD", (65.2, 79.4), 55.3, 13.1))
    assert reports.load_floor(str(td)) == {"TC": {"baseline": "naive_bayes_client_prior", "value": 79.4},
                                           "RC": {"baseline": "rarest_context_word", "value": 55.3},
                                           "TS": {"baseline": "lead", "value": 13.1}}
    settings = ["standard_hetero_t", "standard_hetero_td", "enforced_hetero_t", "enforced_hetero_td"]
    floors = reports.floors_by_setting([str(t), str(td)], settings)
    assert {s: (f["TC"]["value"], f["file"]) for s, f in floors.items()} == {
        "standard_hetero_t": (64.7, str(t)), "enforced_hetero_t": (64.7, str(t)),
        "standard_hetero_td": (79.4, str(td)), "enforced_hetero_td": (79.4, str(td))}
    assert list(reports.floors_by_setting([str(td)], settings)) == ["standard_hetero_td",
                                                                    "enforced_hetero_td"]
    old = _baselines_file(tmp_path / "old.json")
    assert set(reports.floors_by_setting([str(old)], settings)) == set(settings)
    with pytest.raises(ValueError, match="are both the floor of standard_hetero_td") as e:
        reports.floors_by_setting([str(td), str(old)], settings)
    assert "\n" not in str(e.value)


def _write_runs(root, runs):
    for name, setting, scores, data in runs:
        (root / name).mkdir(parents=True)
        summary = {"method": name.split("_")[0], "setting": setting, "seed": 0, "rounds": 1,
                   "test": dict(zip(("tc_accuracy", "rc_f1", "ts_rouge2"), scores)),
                   "global_test": {"tc_accuracy": 1.0, "rc_f1": 2.0, "ts_rouge2": 3.0}}
        if data is not None:
            summary["config"] = {"data": data}
        (root / name / "summary.json").write_text(json.dumps(summary))


def test_cli_floor_adds_each_settings_row_and_a_bad_floor_exits_2_before_writing(tmp_path, capsys):
    root = tmp_path / "runs"
    _write_runs(root, [("fedmoe_t", "standard_hetero_t", (70.0, 60.0, 14.0), None),
                       ("fedavg_t", "standard_hetero_t", (65.0, 50.0, 12.0), None),
                       ("fedmoe_td", "standard_hetero_td", (78.0, 56.0, 14.0), None)])
    (root / "fedavg_t" / "summary.json").write_text((root / "fedavg_t" / "summary.json").read_text().replace(
        '"method": "fedavg"', '"method": "fedavg_ft"'))
    summary = json.loads((root / "fedmoe_td" / "summary.json").read_text())
    summary["test_clients"] = {"0": {"task": "tc", "score": 78.0}}  # above its own floor, 70
    (root / "fedmoe_td" / "summary.json").write_text(json.dumps(summary))
    t = _baselines_file(tmp_path / "t.json", _clients("T", (64.7, 64.2), 63.4, 13.0))
    td = _baselines_file(tmp_path / "td.json", {**_clients("TD", (65.2, 79.4), 55.3, 13.1),
                                                "by_client": {"0": {"tc": {"naive_bayes": {"0": 70.0}}}}})
    assert reports.run_report(str(root), out=str(tmp_path / "a"), floor=[str(t), str(td)]) == 0
    text = (tmp_path / "a" / "report.md").read_text()
    t_table, td_table = text.split("### (b) Standard-Hetero-TD")[:2]
    assert "| *Floor: best trivial baseline* | *64.70* | *63.40* | *13.00* |" in t_table
    assert "| *Floor: best trivial baseline* | *79.40* | *55.30* | *13.10* |" in td_table.split("###")[0]
    assert "| FedAvg + FT (RC, TS); FedMoE (RC) |" in text  # Table 1 order
    assert "| FedMoE (TC) |" in text  # TD: 78.0 under the personalized NB's 79.4, RC 56.0 over 55.3
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["below_floor"] == {"standard_hetero_t": {"fedmoe": ["RC"], "fedavg_ft": ["RC", "TS"]},
                                     "standard_hetero_td": {"fedmoe": ["TC"]}}
    assert report["floor"]["standard_hetero_td"]["file"] == str(td)
    assert report["clients_above_floor"] == {"standard_hetero_td": {"fedmoe": {"TC": [1, 1], "RC": [0, 0],
                                                                               "TS": [0, 0]}}}
    assert "| FedMoE | 1/1 (100 %) | — | — |" in text.split("Client by client")[1]
    assert reports.run_report(str(root), out=str(tmp_path / "b"), floor=str(t)) == 0  # TD: no floor, a note
    text = (tmp_path / "b" / "report.md").read_text()
    assert "standard_hetero_td: no floor given" in text
    one_view, tables = text.split("## Table 1 analogue")[:2]
    assert tables.count("*Floor: best trivial baseline*") == 1
    # Table 1 in one view: the floor of the setting that has one, "—" for the other
    assert "| *Floor: best trivial baseline* | *64.7 / 63.4 / 13.0* | — |" in one_view
    assert reports.run_report(str(root), out=str(tmp_path / "c")) == 0  # without --floor: no floor row
    assert "Floor" not in (tmp_path / "c" / "report.md").read_text().split("## Beyond")[0]
    capsys.readouterr()
    old = _baselines_file(tmp_path / "old.json")
    for floor, says in ((str(tmp_path / "nowhere"), "experiments/baselines.py"),
                        ([str(td), str(old)], "are both the floor of standard_hetero_td")):
        assert reports.run_report(str(root), out=str(tmp_path / "d"), floor=floor) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --floor: ") and says in err[0]
        assert not (tmp_path / "d").exists()


def test_a_floor_measured_on_other_test_data_exits_2_before_anything_is_written(tmp_path, capsys):
    """The floor's baselines.json names the data it measured (source, folder, test examples per task;
    with the clients' scores also the number of clients and, for TD, the Dirichlet alpha); runs scored
    on other data would be judged against the wrong floor: one line, exit 2, no report and no export.
    Runs written without a config cannot be checked and pass; runs of another partition are another
    file's business."""
    root = tmp_path / "runs"
    data = {"source": "benchmark", "dir": "", "eval_examples_per_task": 600, "num_clients": 15, "alpha": 0.1}
    _write_runs(root, [("fedmoe", "standard_hetero_t", (70.0, 60.0, 14.0), data),
                       ("fedavg", "standard_hetero_t", (70.0, 60.0, 14.0), {**data, "source": "embedded"})])
    fields = dict(source="benchmark", data_dir="", examples_per_task={"train": 3000, "eval": 600})
    _baselines_file(tmp_path / "baselines.json", **fields)
    assert reports.floor_data_mismatches(str(tmp_path), [{"config": {"data": data}}, {}]) == []
    assert reports.floor_data_mismatches(str(tmp_path), [{"config": {"data": {**data, "dir": "x"}}}]) == [
        'data.dir: the floor\'s "", the runs\' "x"']
    td = _baselines_file(tmp_path / "td.json", _clients("TD", (65.2, 79.4), 55.3, 13.1, alpha=0.1), **fields)
    td_runs = [{"setting": "standard_hetero_td",
                "config": {"data": {**data, "alpha": 0.5, "num_clients": 30}}},
               {"setting": "standard_hetero_t", "config": {"data": {**data, "source": "embedded"}}}]
    assert reports.floor_data_mismatches(str(td), td_runs) == [
        "data.num_clients: the floor's 15, the runs' 30", "data.alpha: the floor's 0.1, the runs' 0.5"]
    capsys.readouterr()
    code = reports.run_report(str(root), out=str(tmp_path / "out"), floor=str(tmp_path),
                              export_runs=str(tmp_path / "exported"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --floor: ")
    assert 'data.source: the floor\'s "benchmark", the runs\' "benchmark", "embedded"' in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "exported").exists()
    with pytest.raises(reports.FloorMismatchError):  # the library entry point refuses too
        reports.build_report(str(root), str(tmp_path / "out"), floor=str(tmp_path))
    assert not (tmp_path / "out").exists()
    (root / "fedavg" / "summary.json").unlink()
    assert reports.run_report(str(root), out=str(tmp_path / "out"), floor=str(tmp_path)) == 0
    assert np.isclose(json.loads((tmp_path / "out" / "report.json").read_text())[
        "floor"]["standard_hetero_t"]["TC"]["value"], 64.7)


def test_clients_above_their_own_floor_by_hand(tmp_path):
    """Seed 0's TC client 0 has baselines 50 and 70 (its floor 70), client 1 40 and 30 (floor 40); seed 1
    was not scored. FedMoE seed 0: client 0 at 70 (not above: equal), client 1 at 41 (above); its seed 1
    run is left out: 1 of 2. FedAvg seed 0: 80 and 10: 1 of 2. An RC client the file does not know
    is left out; a setting whose file has no client scores gets no table."""
    doc = {"baselines": POOLED, "clients": {**_clients("T", (64.7, 64.2), 63.4, 13.0), "by_client": {
        "0": {"tc": {"naive_bayes": {"0": 50.0, "1": 40.0},
                     "naive_bayes_client_prior": {"0": 70.0, "1": 30.0}},
              "rc": {"rarest_context_word": {"5": 10.0}}, "ts": {}}}}}
    (tmp_path / "t.json").write_text(json.dumps(doc))

    class Run:
        def __init__(self, seed, tc, rc=None):
            clients = {"0": {"task": "tc", "score": tc[0]}, "1": {"task": "tc", "score": tc[1]}}
            if rc is not None:
                clients["9"] = {"task": "rc", "score": rc}
            self.summary = {"seed": seed, "test_clients": clients}

    groups = {"standard_hetero_t": {"fedmoe": [Run(0, (70.0, 41.0), rc=99.0), Run(1, (99.0, 99.0))],
                                    "fedavg": [Run(0, (80.0, 10.0))]},
              "standard_hetero_td": {"fedmoe": [Run(0, (99.0, 99.0))]}}
    floors = {"standard_hetero_t": {"file": str(tmp_path / "t.json")},
              "standard_hetero_td": {"file": str(_baselines_file(tmp_path / "old.json"))}}
    got = reports.clients_above_floor(groups, floors)
    assert got == {"standard_hetero_t": {"fedmoe": {"TC": [1, 2], "RC": [0, 0], "TS": [0, 0]},
                                         "fedavg": {"TC": [1, 2], "RC": [0, 0], "TS": [0, 0]}}}
    lines = reports.render_clients_above_floor(got)
    assert "| FedMoE | 1/2 (50 %) | — | — |" in lines and "#### Standard-Hetero-T" in lines
    assert reports.render_clients_above_floor({}) == []


def test_the_floor_is_the_mean_over_the_seeds_its_runs_used(tmp_path):
    """Seeds 0 and 1 of the file: TC naive Bayes 60 and 66 (mean 63), with the client's prior 76 and 79
    (77.5: the floor); RC 57 and 52 (54.5); TS lead 13 and 14 (13.5) over constant 4. Runs of seeds 0
    and 3: seed 3 was not scored, so the file's own mean over its seeds (79.4 / 55.3 / 13.1) stands,
    and the report says which seed to score."""
    def seed(nb, prior, rc, lead):
        return {"tc": {"naive_bayes": nb, "naive_bayes_client_prior": prior},
                "rc": {"rarest_context_word": rc}, "ts": {"lead": lead, "constant": 4.0}}

    clients = {**_clients("TD", (65.2, 79.4), 55.3, 13.1),
               "by_seed": {"0": seed(60.0, 76.0, 57.0, 13.0), "1": seed(66.0, 79.0, 52.0, 14.0)}}
    td = str(_baselines_file(tmp_path / "td.json", clients))
    got = reports.floors_by_setting([td], ["standard_hetero_td"], {"standard_hetero_td": [1, 0]})
    assert got["standard_hetero_td"] == {
        "TC": {"baseline": "naive_bayes_client_prior", "value": 77.5},
        "RC": {"baseline": "rarest_context_word", "value": 54.5}, "TS": {"baseline": "lead", "value": 13.5},
        "file": td, "seeds": ["0", "1"], "unscored_seeds": []}
    got = reports.floors_by_setting([td], ["standard_hetero_td"], {"standard_hetero_td": [0, 3]})
    assert got["standard_hetero_td"]["TC"]["value"] == 79.4 and got["standard_hetero_td"]["seeds"] is None
    assert got["standard_hetero_td"]["unscored_seeds"] == ["3"]
    root = tmp_path / "runs"
    _write_runs(root, [("fedmoe_0", "standard_hetero_td", (78.0, 56.0, 14.0), None),
                       ("fedmoe_3", "standard_hetero_td", (78.0, 56.0, 14.0), None)])
    summary = json.loads((root / "fedmoe_3" / "summary.json").read_text())
    (root / "fedmoe_3" / "summary.json").write_text(json.dumps({**summary, "seed": 3}))
    assert reports.run_report(str(root), out=str(tmp_path / "out"), floor=td) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "the floor file did not score seed(s) 3 of its runs" in text
    assert "| *Floor: best trivial baseline* | *79.40* | *55.30* | *13.10* |" in text
