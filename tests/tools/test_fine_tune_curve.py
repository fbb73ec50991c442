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
