"""Side-by-side round benchmark: vectorized engine vs sequential JAX vs PyTorch + Hugging Face.

    python experiments/benchmark.py --preset=cpu-small --out=runs/bench/cpu.json --md=runs/bench/cpu.md
    python experiments/benchmark.py --preset=cpu-small --scaling=cohort:4,8,16,32 --contenders=vectorized
    python experiments/benchmark.py --preset=cpu-small --scaling=experts:8,16,32,64,128
    python experiments/benchmark.py --scaling=clients:30,1000,10000 --cohort=24 --method=fedmoe

Each contender runs in its own child process (so its peak RSS is its own) on the same workload
(`fedmoe_jax.tools.benchmarks`: same model, expert maps, batches, local steps and cohort); the machine's
matmul peak is measured in another. Prints and writes JSON (`client_steps_per_s` per contender,
`ratios`, `mfu`, `device`, per-contender details) and a Markdown table. With `--scaling`, the
vectorized round is timed over cohort sizes or global expert counts (kept experts per client fixed),
or the experiment pipeline's round over registered clients (`fedmoe_jax.tools.benchmarks.clients`).
Exit status 2 (one line on stderr) for a bad flag. See `fedmoe_jax.tools.benchmarks.cli`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from fedmoe_jax.cli_common import flags_parser, run_tool  # noqa: E402
from fedmoe_jax.tools.benchmarks import CONTENDERS, PRESETS  # noqa: E402
from fedmoe_jax.tools.benchmarks.cli import BenchmarkError, run_benchmark  # noqa: E402

flags.DEFINE_enum("preset", "cpu-small", sorted(PRESETS), "Workload preset (model dims, round shape).")
flags.DEFINE_list("contenders", list(CONTENDERS), "Contenders to time.")
flags.DEFINE_integer("rounds", 5, "Timed rounds per contender (median).")
flags.DEFINE_integer("warmup", 1, "Warm-up rounds per contender before timing.")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_integer("peak_n", 0, "Matmul size of the peak measurement, in the model's compute dtype "
                     "(0: 1024 on CPU, 8192 on accelerators, whose peak small products miss).")
flags.DEFINE_string("scaling", "", "cohort:4,8,16 or experts:8,16,32: time the vectorized round over these "
                    "sizes instead of the contenders; clients:30,1000,10000: time the experiment pipeline's "
                    "round (configs/tiny.py, --method) with that many registered clients, --cohort a round.")
flags.DEFINE_string("method", "fedmoe", "Method of --scaling=clients:... (a registered method name).")
flags.DEFINE_multi_string("model", [], "KEY=VALUE override of a SwitchConfig field of the preset, e.g. "
                          "dtype=bfloat16, dispatch=dropless, capacity_factor=1.25 (repeatable).")
flags.DEFINE_string("profile", "", "Also trace one round of each JAX contender with jax.profiler into "
                    "DIR/<contender> (TensorBoard / Perfetto) and report its XLA op time per category.")
flags.DEFINE_integer("cohort", 0, "Clients per round instead of the preset's (0: the preset's).")
flags.DEFINE_integer("experts", 0, "Global experts instead of the preset's (0: the preset's).")
flags.DEFINE_string("out", "", "JSON file.")
flags.DEFINE_string("md", "", "Markdown file.")
FLAGS = flags.FLAGS

_SETTINGS = ("preset", "contenders", "rounds", "warmup", "seed", "peak_n", "scaling", "model", "profile",
             "cohort", "experts", "method", "out", "md")


def main(argv: list[str]) -> None:
    run_tool(argv, lambda: run_benchmark(**{name: FLAGS[name].value for name in _SETTINGS}),
             (BenchmarkError,))


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser())
