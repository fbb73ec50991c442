"""The pretraining command line:

    python -m fedmoe_jax.pretrain --config=configs/pretrain.py --workdir=runs/pretrain \
        [--config.model.num_experts=4] [--config.steps=3000] [--progress=false]

Prints one summary line; the workdir gets `pretrain.json` and `pretrain_loss.png`, the model lives in
the cache (`config.cache_dir`). Bad input exits with status 2 and one line on stderr; SIGTERM / SIGINT
checkpoint the pretraining and exit with 143 / 130, and the same command resumes it.

    python -m fedmoe_jax.pretrain --config=configs/pretrain.py --workdir=DIR --config.steps=30000 \
        --export_step=7000

exports the unfinished pretraining of that config at its checkpoint of step 7000 to DIR as a Hugging
Face model with its tokenizer (`cache.export_partial_step`), training nothing: a model to probe
(`--config.model.init=hf --config.model.path=DIR`) while the pretraining goes on.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from fedmoe_jax.cli_common import exit_if_disk_full, fail, flags_parser, loaded_config

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Pretraining config file, e.g. configs/pretrain.py (ml_collections).")
flags.DEFINE_string("workdir", None, "Report directory: pretrain.json, pretrain_loss.png.")
flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
flags.DEFINE_integer("export_step", 0, "Instead of pretraining: write this config's unfinished pretraining "
                     "at its checkpoint of this step to --workdir as a Hugging Face model (0: off).",
                     lower_bound=0)

SCHEMA, EXAMPLE = "configs/pretrain.py", "configs/pretrain.py"


def main(argv: list[str]) -> None:
    config = loaded_config(_CONFIG, argv, "steps", SCHEMA, EXAMPLE, FLAGS.workdir,
                           "where pretrain.json and the loss plot go")
    from fedmoe_jax.errors import ConfigError
    from fedmoe_jax.federated.preemption import RunInterrupted
    from fedmoe_jax.federated.run_checkpoint import CheckpointError
    from fedmoe_jax.pretrain.cli import export_pretraining, run_pretrain

    if "progress" in config:
        config.progress = config.progress and FLAGS.progress
    try:
        if FLAGS.export_step:
            export_pretraining(config, FLAGS.export_step, FLAGS.workdir)  # prints one line
            return
        run_pretrain(config, FLAGS.workdir)  # prints its own summary line
    except (ConfigError, CheckpointError) as e:
        fail(str(e))
    except RunInterrupted as e:  # SIGTERM / SIGINT: checkpointed at the next step
        print(f"interrupted: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_status)
    except Exception as e:
        exit_if_disk_full(e)  # one line, exit 4: free space, the same command resumes
        raise


def run(argv: list[str] | None = None) -> None:
    app.run(main, argv=argv, flags_parser=flags_parser(SCHEMA, EXAMPLE))


if __name__ == "__main__":
    run()
