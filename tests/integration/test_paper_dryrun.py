"""experiments/paper_dryrun.py at tiny dims: the JSON's keys, positive peaks, sub-cohorts under the cap."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--model=switch-tiny-8", "--vocab_size=128", "--input_len=16", "--target_len=8", "--batch_size=2",
        "--local_steps=2", "--stage1_local_steps=2", "--stage1_clients=8", "--eval_steps=2", "--cohort=4"]


@pytest.fixture(scope="module")
def dryrun():
    spec = importlib.util.spec_from_file_location("paper_dryrun",
                                                  os.path.join(ROOT, "experiments", "paper_dryrun.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_dryrun_tiny(dryrun, tmp_path):
    out = tmp_path / "dry.json"
    # a cap below the whole cohorts' programs, so both Stage 1 and the round pick sub-cohorts
    cap_gb = 0.006
    dryrun.main(dryrun.parse(["paper_dryrun.py", f"--out={out}", f"--device_memory_gb={cap_gb}"] + TINY))
    result = json.loads(out.read_text())
    for key in ("stage1_peak_gb", "round_peak_gb", "chunk_size", "device_memory_gb"):
        assert key in result
    assert result["device_memory_gb"] == pytest.approx(cap_gb)
    assert result["stage1_peak_gb"] > 0 and result["round_peak_gb"] > 0
    assert set(result["chunk_size"]) == {"stage1_train", "stage1_measure", "round"}
    assert result["cohort"] == {"stage1_train": 8, "stage1_measure": 8, "round": 4}
    for name, chunk in result["chunk_size"].items():
        assert result["fits"][name], result["tried_gb"]
        assert result["peak_gb"][name] <= cap_gb
        assert result["peak_gb"][name] == pytest.approx(result["tried_gb"][name][str(chunk)])
        assert result["cohort"][name] % chunk == 0
        # every larger sub-cohort tried did not fit
        assert all(gb > cap_gb for size, gb in result["tried_gb"][name].items() if int(size) > chunk)
    # the cap rejected a larger sub-cohort somewhere
    assert any(len(tried) > 1 for tried in result["tried_gb"].values()), result["tried_gb"]
    assert result["stage1_peak_gb"] == max(result["peak_gb"][k] for k in ("stage1_train", "stage1_measure"))


@pytest.mark.parametrize("argv, message", [
    (["--device_memory_gb=0"], "--device_memory_gb=0.0 must be > 0"),
    (["--round_width=9"], "--round_width=9 exceeds the model's 8 experts"),
    (["--model=switch-huge"], "unknown model config"),
])
def test_paper_dryrun_bad_flags_exit_2(dryrun, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        reset = ["--device_memory_gb=80", "--round_width=0"]  # absl keeps flags from the last parse
        dryrun.main(dryrun.parse(["paper_dryrun.py", f"--out={tmp_path / 'x.json'}"] + TINY + reset + argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    with pytest.raises(SystemExit) as e:
        dryrun.parse(["paper_dryrun.py", "--device_memory_gb=lots"])
    assert e.value.code == 2
