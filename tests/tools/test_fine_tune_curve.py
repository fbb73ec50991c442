"""`experiments/fine_tune_curve.py`'s bad input: one line, exit status 2, nothing written. (The curve
itself is checked on a finished FedAvg + FT run in tests/experiment/test_experiment.py.)"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("args, says", [
    (["--steps=0,x"], "give integers >= 0"),
    (["--steps=-2"], "step counts >= 0"),
    ([], "has no config.json"),
    (["--learning_rate=0"], "learning_rate=0.0; use > 0"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, says):
    res = subprocess.run([sys.executable, "experiments/fine_tune_curve.py", f"--run={tmp_path / 'none'}",
                          f"--out={tmp_path / 'out'}", *args], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert res.returncode == 2 and says in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_model_folder_and_an_unwritable_out_are_one_line(tmp_path):
    """A Hugging Face model folder has a config.json too, but no run's; --out under a file cannot be made:
    both refused before anything is built or written."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"d_model": 128, "num_experts": 16}')
    (tmp_path / "file").write_text("")
    under_a_file = f"--out={tmp_path / 'file' / 'out'}"
    for args, says in (([f"--run={model}"], "is not a run's config"),
                       ([f"--run={model}", under_a_file], "is not a writable folder")):
        res = subprocess.run([sys.executable, "experiments/fine_tune_curve.py", *args], capture_output=True,
                             text=True, cwd=REPO, timeout=120)
        assert res.returncode == 2 and says in res.stderr, res.stderr[-2000:]
        assert len(res.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["file", "model"]
