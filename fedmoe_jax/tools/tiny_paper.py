"""The paper path on a tiny model: every input `configs/paper.py` reads, made offline in seconds.

`make_tiny_paper_inputs(out)` writes
  out/moe/       a Hugging Face Switch checkpoint (config.json, model.safetensors, spiece.model) of a
                 randomly initialised 16-expert tiny model: the role of google/switch-base-32
  out/baseline/  its 8-expert sibling: the role of google/switch-base-8 (full-model baselines)
  out/tfds/      AG News / SQuAD v1.1 / XSum stand-ins prepared as TFDS array_record
                 (`fedmoe_jax.data.tiny_tfds`)
so the paper config runs end to end (HF loading, TFDS loading, absolute GB budgets, Stage 1, Stage 2,
evaluation) where the real checkpoints and datasets cannot be downloaded. `paper_command` is the run
command: the paper config with its paths and `TINY_OVERRIDES`, which only shrink sizes (rounds, local
steps, sequence lengths, evaluation examples); the model learns nothing in it, it is a plumbing check.
"""

from __future__ import annotations

import os
import shlex

import jax
import jax.numpy as jnp

from fedmoe_jax.checkpoints import save_hf_switch
from fedmoe_jax.data import embedded_tokenizer
from fedmoe_jax.data.tiny_tfds import write_tiny_tfds
from fedmoe_jax.models import SwitchTransformer, get_config

MOE_EXPERTS, BASELINE_EXPERTS = 16, 8  # configs/paper.py: baseline_num_experts = 8
# Sizes only: the paper's 100 rounds of 50 local steps over 512-token inputs take hours even on this model.
TINY_OVERRIDES = (
    "num_rounds=2", "local_steps=2", "stage1.rounds=1", "stage1.local_steps=2",
    "data.max_input_len=64", "data.max_target_len=16", "max_eval_examples=8", "eval.full_every=0",
    "eval.batch_size=32", "eval.unseen_local_steps=1",
)


def tiny_model_config(num_experts: int, vocab_size: int):
    """A switch-tiny model with `num_experts` experts and HF's absolute expert capacity (64 tokens per
    expert per sequence, as switch-base)."""
    return get_config("switch-tiny-8", vocab_size=vocab_size, num_experts=num_experts, expert_capacity=64)


def make_tiny_paper_inputs(out: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write the tiny checkpoints and datasets under `out`; returns `{"moe", "baseline", "tfds"}` paths."""
    out = os.fspath(out)
    tokenizer = embedded_tokenizer()
    paths = {"moe": os.path.join(out, "moe"), "baseline": os.path.join(out, "baseline"),
             "tfds": os.path.join(out, "tfds")}
    ids = jnp.ones((1, 8), jnp.int32)
    for i, (name, experts) in enumerate((("moe", MOE_EXPERTS), ("baseline", BASELINE_EXPERTS))):
        cfg = tiny_model_config(experts, tokenizer.vocab_size)
        params = SwitchTransformer(cfg).init(jax.random.key(seed + i), ids, ids)["params"]
        save_hf_switch(cfg, jax.device_get(params), paths[name], tokenizer=tokenizer)
    write_tiny_tfds(paths["tfds"])
    return paths


def paper_overrides(out: str | os.PathLike) -> list[str]:
    """`--config.KEY=VALUE` flags pointing `configs/paper.py` at `out`'s inputs, at tiny sizes."""
    out = os.fspath(out)
    return [f"--config.model.path={os.path.join(out, 'moe')}",
            f"--config.model.baseline_path={os.path.join(out, 'baseline')}",
            f"--config.data.dir={os.path.join(out, 'tfds')}",
            *(f"--config.{o}" for o in TINY_OVERRIDES)]


def paper_command(out: str | os.PathLike, workdir: str, setting: str = "standard_hetero_t,fedmoe") -> str:
    """The shell command that runs the paper config on `out`'s inputs into `workdir`."""
    return shlex.join(["python", "-m", "fedmoe_jax.main", f"--config=configs/paper.py:{setting}",
                       f"--workdir={workdir}", *paper_overrides(out)])


__all__ = ["TINY_OVERRIDES", "make_tiny_paper_inputs", "paper_command", "paper_overrides",
           "tiny_model_config"]
