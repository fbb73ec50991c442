"""Paper-scale dry run: do Stage 1 and a Stage 2 round fit one accelerator? Compilation only.

    python experiments/paper_dryrun.py --out=results/paper_dryrun.json
    python experiments/paper_dryrun.py --out=/tmp/d.json --device_memory_gb=40 --remat=full

Lowers and compiles, with abstract inputs (`jax.ShapeDtypeStruct`; no weights, parameter shapes from
`jax.eval_shape`), the programs of a `configs/paper.py` run at switch-base-32 dims (vocab 32128,
512 input / 64 target tokens, batch 8): the Stage 1 LoRA round and measurement (`stage1_program`) for
the clients whose budgets admit Stage 1, and one Stage 2 round (`make_round_step`, as the trainer
calls it) of a FedMoE cohort whose sub-MoEs are `--round_width` slots wide. Each sub-cohort size is
chosen as a run chooses it (`fit_under_cap` against `--device_memory_gb`). Writes JSON with the
per-device peak bytes of XLA's memory analysis of the chosen programs (`stage1_peak_gb`,
`round_peak_gb`), the sub-cohorts (`chunk_size`) and `device_memory_gb`. On CPU this is the CPU
compiler's estimate (BENCHMARKS.md, "Paper scale: dry run"); on a GPU, the GPU compiler's.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "", "Where the JSON is written (required).")
flags.DEFINE_string("setting", "standard_hetero_t,fedmoe", "Argument of configs/paper.py:get_config.")
flags.DEFINE_float("device_memory_gb", 80.0, "Memory per device the programs are sized for (GB, 1e9 bytes).")
flags.DEFINE_string("model", "", "NAMED_CONFIGS model (default: the config's, switch-base-32).")
flags.DEFINE_integer("vocab_size", 32128, "Vocabulary (T5's SentencePiece: 32128).")
flags.DEFINE_integer("input_len", 0, "Input tokens (0: the config's data.max_input_len, 512).")
flags.DEFINE_integer("target_len", 0, "Target tokens (0: the config's data.max_target_len, 64).")
flags.DEFINE_integer("batch_size", 0, "Training batch (0: the config's, 8).")
flags.DEFINE_integer("local_steps", 0, "Stage 2 local steps (0: the config's).")
flags.DEFINE_integer("stage1_local_steps", 0, "Stage 1 local steps (0: the config's stage1.local_steps).")
flags.DEFINE_integer("stage1_clients", 0, "Stage 1 cohort (0: the clients whose budgets admit Stage 1).")
flags.DEFINE_integer("eval_steps", 0, "Stage 1 validation batches per client (0: max_eval_examples / "
                     "eval_batch_size of the config).")
flags.DEFINE_integer("cohort", 0, "Stage 2 cohort (0: the config's cohort_size).")
flags.DEFINE_integer("round_width", 0, "Expert slots S of the Stage 2 sub-MoEs (0: all E experts, the "
                     "widest a FedMoE cohort can need).")
flags.DEFINE_string("remat", "", "SwitchConfig.remat of every program: none, full or dots ('': the "
                    "config's).")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one line and exit 2 for a bad flag."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0])


def settings():
    """The paper config, the model config and the dims, from the flags (exit 2 on bad values)."""
    from configs.paper import get_config as paper_config
    from fedmoe_jax.experiment import runtime_overrides
    from fedmoe_jax.models import get_config

    if not FLAGS.out:
        fail("--out=FILE.json is required")
    if not FLAGS.device_memory_gb > 0:
        fail(f"--device_memory_gb={FLAGS.device_memory_gb} must be > 0")
    for name in ("vocab_size", "input_len", "target_len", "batch_size", "local_steps", "stage1_local_steps",
                 "stage1_clients", "eval_steps", "cohort", "round_width"):
        if getattr(FLAGS, name) < 0:
            fail(f"--{name}={getattr(FLAGS, name)} must be >= 0")
    try:
        config = paper_config(FLAGS.setting)
    except (ValueError, KeyError) as e:
        fail(f"--setting={FLAGS.setting!r}: {e}")
    if FLAGS.remat:
        config.model.remat = FLAGS.remat
    try:
        cfg = get_config(FLAGS.model or config.model.name, vocab_size=FLAGS.vocab_size,
                         **runtime_overrides(config))
    except (ValueError, TypeError) as e:
        fail(f"--model / --remat: {str(e).splitlines()[0]}")
    if FLAGS.round_width > cfg.num_experts:
        fail(f"--round_width={FLAGS.round_width} exceeds the model's {cfg.num_experts} experts")
    dims = dict(
        input_len=FLAGS.input_len or config.data.max_input_len,
        target_len=FLAGS.target_len or config.data.max_target_len,
        batch=FLAGS.batch_size or config.batch_size,
        steps=FLAGS.local_steps or config.local_steps,
        stage1_steps=FLAGS.stage1_local_steps or config.stage1.local_steps,
        eval_steps=FLAGS.eval_steps or math.ceil((config.max_eval_examples or 64) / config.eval_batch_size),
        cohort=FLAGS.cohort or config.cohort_size,
        width=FLAGS.round_width or cfg.num_experts,
    )
    return config, cfg, dims


def stage1_cohort(config, cfg, dims) -> int:
    """Clients whose budgets admit Stage 1 (`stage1_eligible`), or `--stage1_clients`."""
    from fedmoe_jax.algorithms.fedmoe.stage1 import stage1_eligible
    from fedmoe_jax.algorithms.memory import MemoryModel
    from fedmoe_jax.experiment import client_budgets

    if FLAGS.stage1_clients:
        return FLAGS.stage1_clients
    memory = MemoryModel(cfg, dims["batch"], dims["input_len"], dims["target_len"])
    return int(stage1_eligible(memory, client_budgets(config, memory), config.stage1.rank).sum())


def fitted(fit, tried: dict) -> tuple[int | None, float, bool]:
    """`(chunk, peak bytes, fits)` of `fit()` (-> (chunk, program)); the smallest tried if none fits."""
    from fedmoe_jax.federated.loop import MemoryCapExceeded, program_bytes

    try:
        chunk, program = fit()
        return chunk, program_bytes(program), True
    except MemoryCapExceeded as e:
        print(f"warning: {e}", file=sys.stderr)
        chunk = min(tried, key=tried.get)
        return chunk, tried[chunk], False


def dry_run(config, cfg, dims, cap: int) -> dict:
    """Compile the Stage 1 programs and a Stage 2 round under `cap` bytes; the JSON's content."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fedmoe_jax.algorithms import FedMoE
    from fedmoe_jax.algorithms.fedmoe.stage1 import (
        abstract_stage1_args,
        make_lora_measure,
        make_lora_round,
        stage1_program,
    )
    from fedmoe_jax.experiment import loss_config
    from fedmoe_jax.federated.loop import make_round_step
    from fedmoe_jax.federated.optimizers import make_optimizer
    from fedmoe_jax.federated.submodel import narrow_config

    s = config.stage1
    out: dict = {"chunk_size": {}, "cohort": {}, "peak_gb": {}, "fits": {}, "tried_gb": {}, "compile_s": {}}

    def record(name, c, chunk, need, ok, tried, seconds):
        out["cohort"][name], out["chunk_size"][name] = c, chunk or c
        out["peak_gb"][name], out["fits"][name] = need / 1e9, ok
        out["tried_gb"][name] = {str(k or c): v / 1e9 for k, v in tried.items()}
        out["compile_s"][name] = round(seconds, 1)

    c1 = stage1_cohort(config, cfg, dims)
    train_args, measure_args = abstract_stage1_args(cfg, s.rank, c1, dims["stage1_steps"], dims["batch"],
                                                    dims["input_len"], dims["target_len"], dims["eval_steps"],
                                                    config.eval_batch_size)
    builds = {"stage1_train": (lambda chunk: make_lora_round(cfg, s.rank, s.alpha, s.learning_rate,
                                                              loss_config(config), None, chunk), train_args),
              "stage1_measure": (lambda chunk: make_lora_measure(cfg, s.rank, s.alpha, None, chunk),
                                 measure_args)}
    for name, (build, args) in builds.items():
        tried, start = {}, time.time()
        fit = lambda b=build, a=args, n=name, t=tried: stage1_program(b, a, None, "auto", cap, n, t)  # noqa: E731
        chunk, need, ok = fitted(fit, tried)
        record(name, c1, chunk, need, ok, tried, time.time() - start)

    # one validating Stage 2 round as FederatedTrainer calls it for FedMoE (mesh None: one device;
    # sub-MoEs S slots wide; the cohort validated inside the round, no trained sub-MoE returned)
    c, width, k = dims["cohort"], dims["width"], dims["steps"]
    optimizer = make_optimizer(config.optimizer, config.learning_rate, config.weight_decay)
    round_step = make_round_step(cfg, optimizer, loss_config(config),
                                 return_clients=FedMoE.needs_client_params, memory_cap=cap,
                                 eval_max_length=dims["target_len"])
    params = train_args[0]
    indices = np.broadcast_to(np.arange(width, dtype=np.int32), (c, cfg.num_moe_layers, width)).copy()
    valid = np.ones(indices.shape, bool)
    def batches(steps, batch):
        i = lambda *shape: jax.ShapeDtypeStruct((c, steps, batch) + shape, jnp.int32)  # noqa: E731
        return {"inputs": i(dims["input_len"]), "input_mask": i(dims["input_len"]),
                "targets": i(dims["target_len"]), "target_mask": i(dims["target_len"]), "example_mask": i()}

    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), c))
    args = (params, indices, valid, batches(k, dims["batch"]), jax.ShapeDtypeStruct((c, k), bool),
            jax.ShapeDtypeStruct((c,), jnp.float32), keys, None,
            batches(dims["eval_steps"], config.eval_batch_size))
    key, start = narrow_config(cfg, valid), time.time()
    tried = round_step.memory_needs.setdefault((key, c, True), {})
    # fit_under_cap stops at the first size that fits: the last one tried
    chunk, need, ok = fitted(lambda: (round_step.fit(key, c, args), list(tried)[-1])[::-1], tried)
    record("round", c, chunk, need, ok, tried, time.time() - start)

    out.update(
        stage1_peak_gb=max(out["peak_gb"]["stage1_train"], out["peak_gb"]["stage1_measure"]),
        round_peak_gb=out["peak_gb"]["round"],
        device_memory_gb=cap / 1e9,
        round_width=width,
        model={"name": FLAGS.model or config.model.name, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
               "num_experts": cfg.num_experts, "num_moe_layers": cfg.num_moe_layers, "dtype": cfg.dtype,
               "remat": cfg.remat, "params": int(sum(x.size for x in jax.tree.leaves(params)))},
        dims={k: v for k, v in dims.items() if k not in ("cohort", "width")},
        backend=jax.default_backend(),
        device=str(jax.devices()[0].device_kind),
        jax_version=jax.__version__,
    )
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    config, cfg, dims = settings()
    start = time.time()
    out = dry_run(config, cfg, dims, int(FLAGS.device_memory_gb * 1e9))
    out["seconds"] = round(time.time() - start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("stage1_peak_gb", "round_peak_gb", "chunk_size", "fits",
                                          "device_memory_gb", "backend", "seconds")}))


if __name__ == "__main__":
    app.run(main, flags_parser=parse)
