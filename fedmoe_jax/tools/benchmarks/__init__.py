"""The side-by-side round benchmark: our vectorized engine vs the same work client after client.

Every contender trains the same round: C clients, each with its own sub-MoE (a random subset of
`kept` experts per MoE layer, gathered to the same S slots), K local AdamW steps on its own batches
`[K, B, S_in]` / `[K, B, T]`, then modular aggregation. Contenders:

- `vectorized`: `make_round_step` (the cohort vmapped, sharded over a `clients` mesh axis when there
  are several devices): one compiled program per round.
- `sequential_jax`: the same local training (`make_local_train`) jitted for one client and called
  client after client, then the same aggregation (how FedJAX's default backend and most simulators
  run a round). Its result equals the vectorized one (tested).
- `pytorch_hf`: Hugging Face `SwitchTransformersForConditionalGeneration` (torch, eager), each
  client's experts copied into an S-expert model, trained client after client with
  `torch.optim.AdamW`, then averaged (the paper's own stack; `torch_reference`).

Figures: client-steps per second (median over timed rounds after warm-up), round seconds, the first
(compiling) round, model FLOPs (`train_flops_per_step`: forward + backward = 3x the forward matmul
FLOPs of the useful work, top-k tokens per expert, no padding) and MFU against `matmul_peak`, the
FLOP/s of a large jitted matmul on the same machine.

Shape letters: C clients, K local steps, B batch, S_in / T input / target tokens, L MoE layers,
E experts, S slots.

Modules: `workload` (presets, the workload), `flops` (model FLOPs, matmul peak, MFU), `contenders`
(the JAX contenders, timing, client memory), `torch_reference` (the PyTorch contender; needs torch),
`profiling` (XLA op time per category), `cli` (`python experiments/benchmark.py`) and
`run_group` (seeds vectorized vs one after another, `python experiments/benchmark_runs.py`).
"""

from fedmoe_jax.tools.benchmarks.contenders import (
    CONTENDERS,
    client_training_bytes,
    sequential_round,
    time_rounds,
    vectorized_round,
)
from fedmoe_jax.tools.benchmarks.flops import figures, forward_flops, matmul_peak, train_flops_per_step
from fedmoe_jax.tools.benchmarks.profiling import OP_CATEGORIES, op_breakdown, op_category, profile_round
from fedmoe_jax.tools.benchmarks.workload import PRESETS, Preset, Workload, make_workload, optimizer

__all__ = ["CONTENDERS", "OP_CATEGORIES", "PRESETS", "Preset", "Workload", "client_training_bytes", "figures",
           "forward_flops", "make_workload", "matmul_peak", "op_breakdown", "op_category", "optimizer",
           "profile_round", "sequential_round", "time_rounds", "train_flops_per_step", "vectorized_round"]
