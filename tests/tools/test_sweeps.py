"""Sweeps: grid expansion, specs from files and flags, invalid specs, and the run mechanics (skip,
resume, failure, parallel workers, Ctrl-C) with a fake CLI; one sweep with the real CLI."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import xla_flags

from fedmoe_jax.tools import sweeps as sweep
from fedmoe_jax.tools.sweeps import SpecError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SWEEP_CLI = os.path.join(REPO, "experiments", "sweep.py")

CONFIG = '''
import ml_collections

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.method = "fedmoe"
    c.setting = arg or "standard_hetero_t"
    c.seed = 0
    c.num_rounds = 3
    c.flag = True
    c.fedprox = ml_collections.ConfigDict()
    c.fedprox.mu = 0.01
    c.data = ml_collections.ConfigDict()
    c.data.task_ratios = (1.0, 1.0, 1.0)
    return c
'''

# Mimics fedmoe_jax.main: appends its call to DIR/calls.jsonl; control.json (next to it) says which
# runs fail (exit 3), which crash on their first call leaving DIR/partial (a killed run), whether to
# sleep, and whether the first runs wait for a partner (to observe parallel workers).
FAKE_CLI = r'''
import json, os, sys, time
args = sys.argv[1:]
opt = lambda name: next(a.split("=", 1)[1] for a in args if a.startswith(name + "="))
workdir, config = opt("--workdir"), opt("--config")
over = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
here = os.path.dirname(os.path.abspath(__file__))
control = json.load(open(os.path.join(here, "control.json")))
os.makedirs(workdir, exist_ok=True)
call = {"argv": args, "affinity": sorted(os.sched_getaffinity(0)), "omp": os.environ.get("OMP_NUM_THREADS")}
with open(os.path.join(workdir, "calls.jsonl"), "a") as f:
    f.write(json.dumps(call) + "\n")
running, finished = os.path.join(here, "running"), os.path.join(here, "finished")
os.makedirs(running, exist_ok=True)
os.makedirs(finished, exist_ok=True)
me = os.path.join(running, str(os.getpid()))
open(me, "w").close()
concurrent = len(os.listdir(running))
if control.get("rendezvous"):
    t0 = time.time()
    while len(os.listdir(running)) < 2 and not os.listdir(finished) and time.time() - t0 < 30:
        time.sleep(0.02)
    concurrent = max(concurrent, len(os.listdir(running)))
matches = lambda rules: any(all(over.get(k) == v for k, v in r.items()) for r in rules)
try:
    print("progress 10%\rprogress 50%\r", end="", flush=True)
    if matches(control.get("fail", [])):
        print("RuntimeError: fake failure", file=sys.stderr)
        sys.exit(3)
    resumed = os.path.exists(os.path.join(workdir, "partial"))
    if matches(control.get("crash_first", [])) and not resumed:
        open(os.path.join(workdir, "partial"), "w").close()
        print("interrupted: stopped by SIGTERM after round 2")  # as main.py on a preemption
        sys.exit(143)
    time.sleep(control.get("sleep", 0))
    if matches(control.get("no_summary", [])):
        sys.exit(0)
    seed = int(over.get("seed", 0))
    setting = config.partition(":")[2] or "standard_hetero_t"
    summary = {"method": over.get("method", "fedmoe"), "setting": setting,
               "seed": seed, "test": {"tc_accuracy": 50.0 + seed, "rc_f1": 60.0 + seed,
                                      "ts_rouge2": 10.0},
               "comm_gib_per_transfer": 0.25, "peak_memory_gb": {"mean": 1.5, "max": 2.0},
               "experts_end": {"mean": 10.0 + seed, "min": 8, "max": 12}, "wall_seconds": 7.0,
               "resumed": resumed, "concurrent": concurrent, "config": over}
    with open(os.path.join(workdir, "summary.json.tmp"), "w") as f:
        json.dump(summary, f)
    os.replace(os.path.join(workdir, "summary.json.tmp"), os.path.join(workdir, "summary.json"))
    print("done")
finally:
    open(os.path.join(finished, str(os.getpid())), "w").close()
    os.remove(me)
'''


@pytest.fixture
def fake(tmp_path):
    """(config file, runner, control writer, root) for sweeps with the fake CLI."""
    cfg = tmp_path / "cfg.py"
    cfg.write_text(CONFIG)
    prog = tmp_path / "fake_cli.py"
    prog.write_text(FAKE_CLI)

    def control(**kw):
        (tmp_path / "control.json").write_text(json.dumps(kw))

    control()
    return str(cfg), [sys.executable, str(prog)], control, str(tmp_path / "root")


def calls(run_dir):
    with open(os.path.join(run_dir, "calls.jsonl")) as f:
        return [json.loads(line) for line in f]


def summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def read_csv(root):
    with open(os.path.join(root, "results.csv")) as f:
        return list(csv.DictReader(f))


def statuses(root):
    with open(os.path.join(root, "sweep.json")) as f:
        return {r["name"]: r for r in json.load(f)["runs"]}


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, SWEEP_CLI, "--noprogress", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


# ---------------------------------------------------------------------------------------------------
# Values, grids, names


def test_parse_value_json_else_string():
    assert sweep.parse_value("20") == 20 and isinstance(sweep.parse_value("20"), int)
    assert sweep.parse_value("0.1") == 0.1
    assert sweep.parse_value("1e-4") == 1e-4
    assert sweep.parse_value("true") is True
    assert sweep.parse_value("False") is False and sweep.parse_value("True") is True  # --config.K=False
    assert sweep.parse_value("None") is None and sweep.parse_value("false") is False
    assert sweep.parse_value("[1, 2]") == [1, 2]
    assert sweep.parse_value("fedmoe") == "fedmoe"
    assert sweep.parse_value('"0"') == "0"
    assert sweep.parse_value("runs/a b") == "runs/a b"


def test_flag_parsing_splits_top_level_commas():
    assert sweep.parse_grid_flag("method=fedmoe,random_moe") == ("method", ["fedmoe", "random_moe"])
    assert sweep.parse_grid_flag("seed=0,1,2") == ("seed", [0, 1, 2])
    assert sweep.parse_grid_flag("data.task_ratios=[1,1,1],[2,1,1]") == ("data.task_ratios",
                                                                          [[1, 1, 1], [2, 1, 1]])
    assert sweep.parse_grid_flag('name="a,b",c') == ("name", ["a,b", "c"])
    assert sweep.parse_set_flag("model.path=/x,y") == ("model.path", "/x,y")
    assert sweep.parse_exclude_flag("method=local,fedprox.mu=0.1") == {"method": "local", "fedprox.mu": 0.1}
    for bad in ("seed=", "seed", "=1", "fed prox=1"):
        with pytest.raises(SpecError):
            sweep.parse_grid_flag(bad)


def test_cli_values_are_what_ml_collections_parses():
    assert sweep.format_cli_value(True) == "true"
    assert sweep.format_cli_value(0.01) == "0.01"
    assert sweep.format_cli_value(3) == "3"
    assert sweep.format_cli_value("fedmoe") == "fedmoe"
    assert sweep.format_cli_value([1.0, 2.0]) == "(1.0, 2.0)"
    assert sweep.format_cli_value(["a"]) == "('a',)"


def test_expand_is_the_cartesian_product_less_excluded(fake):
    cfg, runner, _, root = fake
    spec = sweep.spec_from_dict({
        "config": cfg, "args": ["standard_hetero_t", "enforced_hetero_t"],
        "grid": {"method": ["fedmoe", "local"], "seed": [0, 1, 2], "fedprox.mu": [0.01, 0.1]},
        "set": {"num_rounds": 20}, "exclude": [{"method": "local", "fedprox.mu": 0.1},
                                               {"arg": "enforced_hetero_t", "seed": 2}],
        "root": root, "runner": runner})
    runs = sweep.expand(spec)
    # 2 args x 2 x 3 x 2 = 24; minus local+mu=0.1 (2 args x 3 seeds = 6); minus enforced+seed 2 (4, one
    # of them already gone) -> 24 - 6 - 3 = 15
    assert len(runs) == 15
    assert len({r.workdir for r in runs}) == 15
    first = runs[0]
    assert first.arg == "standard_hetero_t"
    assert first.params == {"method": "fedmoe", "seed": 0, "fedprox.mu": 0.01}
    assert first.name == os.path.join("standard_hetero_t", "fedprox.mu=0.01,method=fedmoe,seed=0")
    assert first.workdir == os.path.join(root, first.name)
    assert first.command == [*runner, f"--config={cfg}:standard_hetero_t", f"--workdir={first.workdir}",
                             "--config.num_rounds=20", "--config.method=fedmoe", "--config.seed=0",
                             "--config.fedprox.mu=0.01"]
    assert not any(r.params["method"] == "local" and r.params["fedprox.mu"] == 0.1 for r in runs)
    assert not any(r.arg == "enforced_hetero_t" and r.params["seed"] == 2 for r in runs)
    # Reordering the grid keys changes the run order, never the names.
    reordered = sweep.spec_from_dict({**spec.to_dict(), "grid": dict(reversed(list(spec.grid.items())))})
    assert sorted(r.name for r in sweep.expand(reordered)) == sorted(r.name for r in runs)


def test_run_names_are_filesystem_safe_and_distinct():
    assert sweep.run_name({"seed": 1, "lr": 1e-4, "flag": False}) == "flag=false,lr=0.0001,seed=1"
    assert sweep.run_name({}) == "default"
    odd = [sweep.run_name({"path": v}) for v in ("a/b", "a_b", "a b", "..", [1, 1, 1], [1, 1, 2])]
    assert len(set(odd)) == len(odd)
    for name in odd:
        assert "/" not in name and " " not in name and name not in (".", "..")
    assert odd[1] == "path=a_b"
    assert len(sweep.run_name({"k": "x" * 500})) <= 200


def test_spec_file_and_flags_give_the_same_runs(fake, tmp_path):
    cfg, runner, _, root = fake
    d = {"config": cfg, "args": ["standard_hetero_t", "enforced_hetero_t"],
         "grid": {"method": ["fedmoe", "random_moe"], "seed": [0, 1, 2], "fedprox.mu": [0.01, 0.1],
                  "data.task_ratios": [[1, 1, 1], [2, 1, 1]]},
         "set": {"num_rounds": 20, "flag": False}, "exclude": [{"method": "random_moe", "fedprox.mu": 0.1}],
         "root": root, "runner": runner}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(d))
    from_file = sweep.load_spec(str(path))
    from_flags = sweep.spec_from_flags(
        cfg, ["standard_hetero_t", "enforced_hetero_t"],
        ["method=fedmoe,random_moe", "seed=0,1,2", "fedprox.mu=0.01,0.1", "data.task_ratios=[1,1,1],[2,1,1]"],
        ["num_rounds=20", "flag=false"], ["method=random_moe,fedprox.mu=0.1"], root=root,
        runner=" ".join(runner))
    assert from_file == from_flags
    assert [(r.name, r.command) for r in sweep.expand(from_file)] == \
        [(r.name, r.command) for r in sweep.expand(from_flags)]
    # A config with its :ARG inline is the same as "args": [ARG].
    inline = sweep.spec_from_dict({**{k: v for k, v in d.items() if k != "args"},
                                   "config": f"{cfg}:standard_hetero_t"})
    assert (inline.config, inline.args) == (cfg, ["standard_hetero_t"])


def test_invalid_specs_raise_one_line_errors(fake):
    cfg, runner, _, root = fake
    base = {"config": cfg, "grid": {"seed": [0, 1]}, "root": root, "runner": runner}
    cases = [
        ({**base, "grids": {}}, "unknown spec key(s) grids"),
        ({**base, "grid": {"seed": []}}, "grid axis 'seed' must be a non-empty list"),
        ({**base, "grid": {"seed": 0}}, "grid axis 'seed' must be a non-empty list"),
        ({**base, "grid": {"seed": [0, 0]}}, "duplicate values"),
        ({**base, "runner": ["/nonexistent/prog"]}, "runner program '/nonexistent/prog' not found"),
        ({**base, "runner": []}, "runner must be a program"),
        ({**base, "set": {"seed": 3}}, "both in 'grid' and in 'set'"),
        ({**base, "exclude": [{"method": "local"}]}, "names method, not a grid key"),
        ({**base, "exclude": [{"seed": 5}]}, "matches no run"),
        ({**base, "exclude": [{"seed": 0}, {"seed": 1}]}, "remove every run"),
        ({**base, "grid": {"seed": [1, "1"]}}, "share the run name"),
        ({**base, "args": ["a", ""]}, "'args' must be a list of strings"),
        ({**base, "config": "c.py:a", "args": ["b"]}, "has an ':ARG' and 'args' is given too"),
        ({k: v for k, v in base.items() if k != "config"}, "spec needs 'config'"),
    ]
    for d, message in cases:
        with pytest.raises(SpecError, match=re.escape(message)) as e:
            sweep.spec_from_dict(d)
        assert "\n" not in str(e.value)


def test_config_overrides_are_checked_before_launching(fake):
    cfg, runner, _, root = fake
    config = sweep.load_config(cfg, "enforced_hetero_t")
    assert config.setting == "enforced_hetero_t"
    out = sweep.apply_overrides(config, {"fedprox.mu": 1, "data.task_ratios": [2, 1, 1], "flag": False})
    assert out.fedprox.mu == 1.0 and out.data.task_ratios == (2, 1, 1) and out.flag is False
    assert config.fedprox.mu == 0.01  # a copy
    for overrides, message in [({"fedprox.muu": 0.1}, "no key 'fedprox.muu'"),
                               ({"nope.mu": 1}, "no key 'nope'"), ({"num_rounds": "ten"}, "num_rounds='ten'"),
                               ({"seed": True}, "integer"), ({"seed": 0.5}, "seed=0.5"),
                               ({"seed.x": 1}, "no key 'seed.x'")]:
        with pytest.raises(SpecError, match=re.escape(message)):
            sweep.apply_overrides(config, overrides)
    spec = sweep.spec_from_dict({"config": cfg, "grid": {"method": ["fedmoe", "bad"]}, "root": root,
                                 "runner": runner})

    def validator(c):
        if c.method == "bad":
            raise ValueError("config.method='bad' is invalid: use one of fedmoe, local")

    with pytest.raises(SpecError, match="run method=bad: config.method='bad' is invalid"):
        sweep.run_sweep(spec, validator=validator, progress=False)
    assert not os.path.exists(root)  # nothing launched, nothing written
    with pytest.raises(SpecError, match="could not be loaded: TypeError"):
        sweep.load_config(_no_arg_config(cfg), "x")
    with pytest.raises(SpecError, match="not found"):
        sweep.load_config(cfg + "x", None)


def _no_arg_config(cfg):
    path = os.path.join(os.path.dirname(cfg), "noarg.py")
    with open(path, "w") as f:
        f.write("import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict()\n")
    return path


def test_core_shares():
    assert sweep.core_shares(1, [0, 1]) is None
    assert sweep.core_shares(2, [0, 1]) == [[0], [1]]
    assert sweep.core_shares(3, [0, 1]) == [[0], [1], [0]]
    assert sweep.core_shares(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3, 4]]
    env = sweep.child_env(2, [2, 3], base={"OMP_NUM_THREADS": "7"})
    assert env["OMP_NUM_THREADS"] == "7" and env["MKL_NUM_THREADS"] == "2"
    assert "MKL_NUM_THREADS" not in sweep.child_env(1, None, base={})


# ---------------------------------------------------------------------------------------------------
# Running with the fake CLI


@pytest.mark.parametrize("argv, message", [
    (["--spec={spec_bad_key}"], "unknown spec key(s) workers"),
    (["--spec={spec_empty_axis}"], "grid axis 'seed' must be a non-empty list"),
    (["--config={cfg}", "--grid=seed=0,1", "--root={root}", "--runner=/nonexistent/prog"],
     "runner program '/nonexistent/prog' not found"),
    (["--config={cfg}", "--grid=fedprox.muu=0.1", "--root={root}", "--runner={runner}"],
     "config has no key 'fedprox.muu'"),
    (["--spec={spec_empty_axis}", "--grid=seed=1"], "give either --spec or --grid, not both"),
    (["--config={cfg}", "--grid=seed=1", "--workers=0", "--root={root}", "--runner={runner}"],
     "workers must be >= 1"),
    (["--config={cfg}", "--grid=seed=1", "--workers=x"], "invalid literal"),
])
def test_cli_invalid_spec_exits_2_with_one_line(fake, tmp_path, argv, message):
    cfg, runner, _, root = fake
    good = {"config": cfg, "grid": {"seed": [0]}, "root": root, "runner": runner}
    (tmp_path / "bad_key.json").write_text(json.dumps({**good, "workers": 2}))
    (tmp_path / "empty_axis.json").write_text(json.dumps({**good, "grid": {"seed": []}}))
    fmt = {"spec_bad_key": tmp_path / "bad_key.json", "spec_empty_axis": tmp_path / "empty_axis.json",
           "cfg": cfg, "root": root, "runner": " ".join(runner)}
    proc = cli(*[a.format(**fmt) for a in argv])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not os.path.exists(root)


def test_skip_resume_and_failures_with_two_workers(fake, tmp_path):
    cfg, runner, control, root = fake
    control(fail=[{"seed": "3"}], crash_first=[{"seed": "2"}], rendezvous=True)
    flags = [f"--config={cfg}:standard_hetero_t", "--grid=seed=0,1,2,3", "--set=num_rounds=5",
             f"--root={root}", f"--runner={' '.join(runner)}", "--workers=2"]
    first = cli(*flags)
    assert first.returncode == 1, first.stderr
    dirs = {s: os.path.join(root, "standard_hetero_t", f"seed={s}") for s in range(4)}
    recs = statuses(root)
    st = {s: recs[os.path.join("standard_hetero_t", f"seed={s}")] for s in range(4)}
    assert [st[s]["status"] for s in range(4)] == ["done", "done", "interrupted", "failed"]
    assert (st[2]["returncode"], st[2]["error"]) == (143, "interrupted: stopped by SIGTERM after round 2")
    assert (st[3]["returncode"], st[3]["error"]) == (3, "RuntimeError: fake failure")
    assert "seed=3 failed (exit 3): RuntimeError: fake failure" in first.stderr
    # Two workers: two runs at a time, never more, each pinned to its own share of the cores.
    shares = sweep.core_shares(2)
    concurrency = [summary(dirs[s])["concurrent"] for s in (0, 1)]
    assert max(concurrency) == 2, concurrency
    all_calls = [c for s in range(4) for c in calls(dirs[s])]
    assert {tuple(c["affinity"]) for c in all_calls} == {tuple(s) for s in shares}
    assert {c["omp"] for c in all_calls} == {str(len(shares[0]))}
    assert calls(dirs[0])[0]["argv"] == [f"--config={cfg}:standard_hetero_t", f"--workdir={dirs[0]}",
                                         "--config.num_rounds=5", "--config.seed=0"]

    # Second invocation, now from an equivalent spec file and one worker: finished runs are
    # skipped, the crashed one resumes (it sees its partial marker), the failing one fails again.
    control(fail=[{"seed": "3"}], crash_first=[{"seed": "2"}])
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"config": cfg, "args": ["standard_hetero_t"], "grid": {"seed": [0, 1, 2, 3]},
                                "set": {"num_rounds": 5}, "root": root, "runner": runner}))
    second = cli(f"--spec={spec}", "--workers=1")
    assert second.returncode == 1, second.stderr
    assert "different command" not in second.stderr
    assert "1 done, 2 skipped (finished before), 1 failed" in second.stdout
    assert [len(calls(dirs[s])) for s in range(4)] == [1, 1, 2, 2]
    assert summary(dirs[2])["resumed"] is True and summary(dirs[0])["resumed"] is False
    recs = statuses(root)
    assert [recs[os.path.join("standard_hetero_t", f"seed={s}")]["status"] for s in range(4)] == \
        ["skipped", "skipped", "done", "failed"]
    with open(os.path.join(dirs[3], "log.txt")) as f:
        log = f.read()
    assert log.count("=== sweep ") == 2 and log.count("fake failure") == 2

    rows = read_csv(root)
    assert [r["seed"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed"]
    assert [r["arg"] for r in rows] == ["standard_hetero_t"] * 4
    assert [r["setting"] for r in rows[:3]] == ["standard_hetero_t"] * 3
    assert [float(r["tc_acc"]) for r in rows[:3]] == pytest.approx([50.0, 51.0, 52.0])
    assert [float(r["rc_f1"]) for r in rows[:3]] == pytest.approx([60.0, 61.0, 62.0])
    assert float(rows[0]["ts_rouge2"]) == pytest.approx(10.0)
    assert (float(rows[1]["comm_gib"]), float(rows[1]["peak_mem_gb_max"]), float(rows[1]["experts_end_mean"]),
            float(rows[1]["wall_s"])) == (0.25, 2.0, 11.0, 7.0)
    assert rows[3]["tc_acc"] == "" and rows[3]["error"] == "RuntimeError: fake failure"
    with open(os.path.join(root, "results.md")) as f:
        md = f.read()
    assert "| standard_hetero_t | 3/4 | 51.00 ± 1.00 | 61.00 ± 1.00 | 10.00 ± 0.00 |" in md
    assert "seed=3`: failed: RuntimeError: fake failure" in md

    # --collect-only rebuilds the same tables from the run directories, without running anything.
    with open(os.path.join(root, "results.csv")) as f:
        table = f.read()
    os.remove(os.path.join(root, "results.csv"))
    collected = cli("--collect-only", f"--root={root}")
    assert collected.returncode == 0, collected.stderr
    with open(os.path.join(root, "results.csv")) as f:
        assert f.read() == table
    assert [len(calls(dirs[s])) for s in range(4)] == [1, 1, 2, 2]


def test_rerun_changed_command_and_missing_summary(fake, capsys):
    cfg, runner, control, root = fake
    control(no_summary=[{"seed": "1"}])
    spec = sweep.spec_from_dict({"config": cfg, "grid": {"seed": [0, 1]}, "set": {"num_rounds": 5},
                                 "root": root, "runner": runner})
    report = sweep.run_sweep(spec, progress=False)
    assert report.exit_code == 1 and [r["status"] for r in report.records] == ["done", "failed"]
    assert report.records[1]["error"] == "exited 0 without writing summary.json; last line: progress 50%"
    # Changing a fixed override keeps the run names: finished runs are skipped with a warning...
    control()
    changed = sweep.spec_from_dict({**spec.to_dict(), "set": {"num_rounds": 8}})
    report = sweep.run_sweep(changed, progress=False)
    assert report.exit_code == 0 and [r["status"] for r in report.records] == ["skipped", "done"]
    assert "1 finished run(s) were made by a different command" in capsys.readouterr().err
    # ... and run again with rerun=True.
    report = sweep.run_sweep(changed, rerun=True, progress=False)
    assert [r["status"] for r in report.records] == ["done", "done"]
    assert len(calls(os.path.join(root, "seed=0"))) == 2
    assert calls(os.path.join(root, "seed=0"))[1]["argv"][2] == "--config.num_rounds=8"
    assert calls(os.path.join(root, "seed=0"))[1]["omp"] == os.environ.get("OMP_NUM_THREADS")  # 1 worker


def test_ctrl_c_stops_the_running_children(fake):
    cfg, runner, control, root = fake
    control(sleep=120)
    proc = subprocess.Popen([sys.executable, SWEEP_CLI, "--noprogress", f"--config={cfg}",
                             "--grid=seed=0,1,2", f"--root={root}", f"--runner={' '.join(runner)}",
                             "--workers=2", "--grace=5"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a terminal's Ctrl-C, also when the suite runs with SIGINT ignored (`&`)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    running = os.path.join(os.path.dirname(runner[1]), "running")
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.isdir(running) and len(os.listdir(running)) == 2):
        time.sleep(0.05)
    children = [int(p) for p in os.listdir(running)]
    assert len(children) == 2
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    recs = statuses(root)
    assert sorted(r["status"] for r in recs.values()) == ["interrupted", "interrupted", "pending"]
    assert "2 interrupted, 1 not started" in out
    assert not os.path.exists(os.path.join(root, ".sweep.lock"))


def test_a_running_sweep_locks_its_root(fake):
    cfg, runner, _, root = fake
    spec = sweep.spec_from_dict({"config": cfg, "grid": {"seed": [0]}, "root": root, "runner": runner})
    os.makedirs(root)
    lock = os.path.join(root, ".sweep.lock")
    with open(lock, "w") as f:
        f.write(str(os.getpid()))  # a live process
    with pytest.raises(SpecError, match="another sweep"):
        sweep.run_sweep(spec, progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    with open(lock, "w") as f:
        f.write(dead)  # a stale lock is taken over
    assert sweep.run_sweep(spec, progress=False).exit_code == 0
    assert not os.path.exists(lock)


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "configs", "sweeps"))))
def test_example_specs_are_valid(name, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = sweep.load_spec(os.path.join("configs", "sweeps", name))
    runs = sweep.expand(spec)
    sweep.check_configs(spec, runs, sweep.fedmoe_validator())
    assert len(runs) >= 2 and spec.root.startswith("runs/")


def test_sweep_with_the_real_cli(tmp_path, monkeypatch):
    """Two seeds of configs/tiny.py (one round each) through fedmoe_jax.main, vectorized in one
    process (`--seeds`, RunGroup), then skipped."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("XLA_FLAGS", xla_flags(1))  # one CPU device per run (this process has 8)
    monkeypatch.setenv("FEDMOE_JAX_CACHE", os.path.join(REPO, ".jax_cache"))
    root = str(tmp_path / "tiny")
    spec = sweep.spec_from_flags("configs/tiny.py", grid=["seed=0,1"], set=["num_rounds=1"], root=root,
                                 vectorize_seeds=True)
    assert spec.runner == list(sweep.default_runner())
    report = sweep.run_sweep(spec, workers=2, progress=False, validator=sweep.fedmoe_validator())
    assert "--seeds=0,1" in report.records[0]["command"]
    assert report.exit_code == 0, report.records
    rows = read_csv(root)
    assert [r["seed"] for r in rows] == ["0", "1"] and [r["status"] for r in rows] == ["done", "done"]
    for seed, row in zip((0, 1), rows):
        s = summary(os.path.join(root, f"seed={seed}"))
        assert (s["method"], s["setting"], s["seed"]) == ("fedmoe", "standard_hetero_t", seed)
        assert row["setting"] == "standard_hetero_t"
        for col, key in (("tc_acc", "tc_accuracy"), ("rc_f1", "rc_f1"), ("ts_rouge2", "ts_rouge2")):
            assert float(row[col]) == pytest.approx(s["test"][key])
        assert s["comm_gib_per_transfer"] > 0
        assert float(row["comm_gib"]) == pytest.approx(s["comm_gib_per_transfer"])
        assert float(row["experts_end_mean"]) == pytest.approx(s["experts_end"]["mean"])
        assert float(row["peak_mem_gb_max"]) == pytest.approx(s["peak_memory_gb"]["max"])
    log = open(os.path.join(root, "seed=0", "log.txt")).read()
    assert "x2 runs" in log or "seed 1" in log  # one process ran both seeds
    # Again: both finished, nothing runs.
    again = sweep.run_sweep(spec, workers=2, progress=False)
    assert [r["status"] for r in again.records] == ["skipped", "skipped"]


SEEDS_FAKE_CLI = r'''
import json, os, sys
args = sys.argv[1:]
opt = lambda name: next(a.split("=", 1)[1] for a in args if a.startswith(name + "="))
template, seeds = opt("--workdir"), [int(s) for s in opt("--seeds").split(",")]
over = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
for seed in seeds:
    workdir = template.replace("{seed}", str(seed))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "calls.jsonl"), "a") as f:
        f.write(json.dumps({"argv": args}) + "\n")
    summary = {"method": over.get("method", "fedmoe"), "setting": opt("--config").partition(":")[2],
               "seed": seed, "test": {"tc_accuracy": 50.0 + seed}, "wall_seconds": 1.0}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f)
print("done", seeds)
'''


def test_vectorized_seeds_run_as_one_process_per_grid_point(fake, tmp_path):
    cfg, _, _, root = fake
    prog = tmp_path / "seeds_cli.py"
    prog.write_text(SEEDS_FAKE_CLI)
    spec = sweep.spec_from_dict({"config": cfg, "args": ["standard_hetero_t", "enforced_hetero_t"],
                                 "grid": {"method": ["fedmoe", "fedprox"], "seed": [0, 1, 2]},
                                 "set": {"num_rounds": 2}, "root": root,
                                 "runner": [sys.executable, str(prog)], "vectorize_seeds": True})
    runs = sweep.expand(spec)
    jobs = sweep.jobs(spec, runs)
    assert len(runs) == 12 and len(jobs) == 4 and all(len(j.runs) == 3 for j in jobs)
    job = jobs[0]
    assert f"--workdir={root}/standard_hetero_t/method=fedmoe,seed={{seed}}" in job.command
    assert "--seeds=0,1,2" in job.command and "--config.num_rounds=2" in job.command
    assert not any(a.startswith("--config.seed") for a in job.command)
    # without the flag, one process per run
    assert len(sweep.jobs(sweep.spec_from_dict({**spec.to_dict(), "vectorize_seeds": False}), runs)) == 12

    report = sweep.run_sweep(spec, workers=2, progress=False, validate=False)
    assert report.exit_code == 0 and report.counts()["done"] == 12
    for run in runs:
        assert summary(run.workdir)["seed"] == run.params["seed"]
        assert len(calls(run.workdir)) == 1  # each seed's directory written by its group's one process
    # the group's output is in the first seed's log; the others point to it
    first = os.path.join(root, "standard_hetero_t", "method=fedmoe,seed=0", "log.txt")
    assert "done [0, 1, 2]" in open(first).read()
    other = open(os.path.join(root, "standard_hetero_t", "method=fedmoe,seed=2", "log.txt")).read()
    assert "seeds vectorized" in other and first in other
    again = sweep.run_sweep(spec, workers=1, progress=False, validate=False)
    assert again.counts()["skipped"] == 12


def test_vectorize_seeds_needs_a_seed_axis(fake):
    cfg, runner, _, root = fake
    with pytest.raises(SpecError, match="seed"):
        sweep.spec_from_dict({"config": cfg, "grid": {"method": ["fedmoe"]}, "root": root,
                              "runner": runner, "vectorize_seeds": True})
    with pytest.raises(SpecError, match="true or false"):
        sweep.spec_from_dict({"config": cfg, "grid": {"seed": [0, 1]}, "root": root, "runner": runner,
                              "vectorize_seeds": "yes"})


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "configs", "sweeps"))))
def test_shipped_specs_expand_to_valid_configs(name, monkeypatch):
    """Every spec in configs/sweeps/ loads, expands and gives configs the experiment validator accepts."""
    from fedmoe_jax.experiment import validate

    monkeypatch.chdir(REPO)  # specs name their config relative to the repository
    spec = sweep.load_spec(os.path.join("configs", "sweeps", name))
    runs = sweep.expand(spec)
    assert runs and len({r.name for r in runs}) == len(runs)
    sweep.check_configs(spec, runs, validate)
    if name == "cpu_reproduction.json":  # the grid: 4 settings x 9 methods x 3 seeds on the benchmark
        assert len(runs) == 108
        assert {"fedmoe", "fedavg_ft"} <= {r.params["method"] for r in runs}
        # seed outside method: a grid stopped part-way holds whole seeds of its first setting, every
        # method paired, rather than three seeds of a few methods
        assert [(r.arg, r.params["seed"]) for r in runs[:9]] == [("standard_hetero_t", 0)] * 9
        assert len({r.params["method"] for r in runs[:9]}) == 9


def test_more_seeds_spec_runs_exactly_the_next_paired_seeds(fake):
    """From a recorded grid (3 settings x 4 methods x seeds 0-2) and a report's wanted directions, the
    spec runs the next seed of FedMoE and of the baselines named in each wanted setting, nothing else;
    one above the grid's own seeds even where a setting has fewer; same config and overrides."""
    from fedmoe_jax.tools.sweeps.more_seeds import MORE_SEEDS_DIR, more_seeds_spec, spec_document
    from fedmoe_jax.tools.sweeps.results import write_sweep_json

    cfg, runner, _, root = fake
    grid = sweep.spec_from_dict({
        "config": cfg, "args": ["standard_hetero_t", "standard_hetero_td", "enforced_hetero_t"],
        "grid": {"seed": [0, 1, 2], "method": ["fedmoe", "random_moe", "fedprox", "scaffold"]},
        "set": {"num_rounds": 20}, "root": root, "runner": runner})
    os.makedirs(root)
    write_sweep_json(grid, [])
    enforced = [{"baseline": "fedprox", "task": "RC"}, {"baseline": "scaffold", "task": "TS"},
                {"baseline": "fedprox", "task": "TS"}]
    wanted = {"standard_hetero_t": [{"baseline": "random_moe", "task": "TC"}], "enforced_hetero_t": enforced}
    spec = more_seeds_spec(root, wanted, {"standard_hetero_t": [0, 1], "enforced_hetero_t": [0, 1, 2, 3]})
    assert spec.root == os.path.join(root, MORE_SEEDS_DIR, "seeds=3,4") and spec.set == {"num_rounds": 20}
    names = sorted(r.name for r in sweep.expand(sweep.spec_from_dict({**spec.to_dict(), "runner": runner})))
    assert names == sorted([
        "standard_hetero_t/method=fedmoe,seed=3", "standard_hetero_t/method=random_moe,seed=3",
        "enforced_hetero_t/method=fedmoe,seed=4", "enforced_hetero_t/method=fedprox,seed=4",
        "enforced_hetero_t/method=scaffold,seed=4"])
    assert "runner" not in spec_document(spec)
    assert more_seeds_spec(root, {}, {}) is None
    with pytest.raises(SpecError, match="runs no method fedavg"):
        more_seeds_spec(root, {"standard_hetero_t": [{"baseline": "fedavg"}]}, {"standard_hetero_t": [0]})
    with pytest.raises(SpecError, match="has no ARG 'enforced_hetero_td'"):
        more_seeds_spec(root, {"enforced_hetero_td": [{"baseline": "fedprox"}]}, {"enforced_hetero_td": [0]})
    with pytest.raises(SpecError, match="sweep.json not found"):
        more_seeds_spec(os.path.join(root, "elsewhere"), wanted, {})

    # a grid with another axis and an exclude over it: the axis is kept, the exclude too where it applies
    ablation = sweep.spec_from_dict({**grid.to_dict(), "grid": {**grid.grid, "fedprox.mu": [0.01, 0.1]},
                                     "exclude": [{"method": "fedmoe", "fedprox.mu": 0.1},
                                                 {"arg": "standard_hetero_td", "seed": 2}]})
    write_sweep_json(ablation, [])
    spec = more_seeds_spec(root, {"standard_hetero_t": [{"baseline": "fedprox"}]}, {"standard_hetero_t": [0]})
    assert spec.exclude == [{"method": "fedmoe", "fedprox.mu": 0.1}]
    assert sorted(r.name for r in sweep.expand(spec)) == [
        "standard_hetero_t/fedprox.mu=0.01,method=fedmoe,seed=3",
        "standard_hetero_t/fedprox.mu=0.01,method=fedprox,seed=3",
        "standard_hetero_t/fedprox.mu=0.1,method=fedprox,seed=3"]
