"""The `pytorch_hf` contender of the round benchmark: the paper's own stack, client after client.

Hugging Face `SwitchTransformersForConditionalGeneration` (transformers + torch, eager, CPU or CUDA)
with S experts per MoE layer. Per client: its kept experts (and their router rows) and the dense
weights are copied in (`to_hf_state` of the gathered sub-MoE), K AdamW steps run on its batches
(label loss + HF's router z-loss and load-balancing loss, dropout on; the forward pass under
`torch.autocast` to bfloat16 when the preset's model computes in bfloat16, weights and AdamW in float32
as in the JAX contenders), and the trained tensors are
added to the round's sums: dense tensors weighted by examples, each expert and router row into its
global expert's sum (modular aggregation). Needs the test extras (torch, transformers).

Shape letters as in `fedmoe_jax.tools.benchmarks.workload`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import jax
import numpy as np

from fedmoe_jax.checkpoints.hf_switch import config_to_hf, to_hf_state
from fedmoe_jax.federated.submodel import gather_submodel
from fedmoe_jax.tools.benchmarks.workload import Workload

_EXPERT = re.compile(
    r"^(?P<stack>encoder|decoder)\.block\.(?P<block>\d+)\..*\.experts\.expert_(?P<slot>\d+)\.")
_ROUTER = re.compile(r"^(?P<stack>encoder|decoder)\.block\.(?P<block>\d+)\..*\.router\.classifier\.weight$")


def hf_capacity(w: Workload) -> int:
    """One absolute capacity for HF (it has no capacity factor): the encoder layers' capacity of our
    capacity-factor routing at S slots (the larger of encoder and decoder); with the dropless dispatch
    the sequence length, so that HF drops nothing either (it computes each expert's routed tokens)."""
    p, cfg = w.preset, w.preset.model
    tokens = max(p.input_len, p.target_len)
    if cfg.dispatch == "dropless":
        return int(tokens)
    if cfg.expert_capacity is not None:
        return int(cfg.expert_capacity)
    return int(min(tokens, math.ceil(cfg.capacity_factor * tokens * cfg.top_k / w.width)))


def torch_round(w: Workload, device: str = "cpu") -> Callable[[], dict[str, np.ndarray]]:
    """`round_fn() -> aggregated HF tensors` (global experts, keyed by HF names of an E-expert model)."""
    import torch
    import transformers

    narrow = w.narrow_config.replace(expert_capacity=hf_capacity(w), capacity_factor=None)
    hf_cfg = transformers.SwitchTransformersConfig(**{**config_to_hf(narrow), "output_router_logits": True})
    model = transformers.SwitchTransformersForConditionalGeneration(hf_cfg).to(device).train()
    cfg = w.preset.model
    layer_of = {name: i for i, name in enumerate(cfg.moe_layer_names)}  # (stack, block) -> L index
    gather = jax.jit(lambda p, idx: gather_submodel(p, cfg, idx))
    states = []  # per client: HF tensors of its gathered sub-MoE (prepared outside the timed round)
    for c in range(len(w.maps)):
        narrow_params = jax.device_get(gather(w.params, w.indices[c]))
        hf_state = to_hf_state(narrow, narrow_params)
        states.append({k: torch.from_numpy(np.array(v)) for k, v in hf_state.items()})
    batches = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in w.batches.items()}
    p = w.preset
    compute_bf16 = jax.numpy.dtype(cfg.dtype) == jax.numpy.bfloat16

    def expert_target(name: str, c: int) -> tuple[str, int] | None:
        """Global HF name of a slot tensor of client c (None for a padding slot)."""
        m = _EXPERT.match(name)
        if m is None:
            return None
        layer = layer_of[(m["stack"], int(m["block"]))]
        slot = int(m["slot"])
        if not w.valid[c, layer, slot]:
            return None
        e = int(w.indices[c, layer, slot])
        return name.replace(f"experts.expert_{slot}.", f"experts.expert_{e}."), layer

    def round_fn() -> dict[str, np.ndarray]:
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, float] = {}
        for c in range(len(w.maps)):
            model.load_state_dict(states[c], strict=False)
            opt = torch.optim.AdamW(model.parameters(), lr=p.learning_rate, weight_decay=0.01)
            for k in range(p.local_steps):
                with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=compute_bf16):
                    out = model(input_ids=batches["inputs"][c, k].long(),
                                attention_mask=batches["input_mask"][c, k].long(),
                                labels=batches["targets"][c, k].long(),
                                decoder_attention_mask=batches["target_mask"][c, k].long())
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            weight = float(w.weights[c])
            with torch.no_grad():
                for name, value in model.state_dict().items():
                    router = _ROUTER.match(name)
                    if router is not None:  # rows of the kept experts into their global rows
                        layer = layer_of[(router["stack"], int(router["block"]))]
                        for slot in np.flatnonzero(w.valid[c, layer]):
                            key = f"{name}#{int(w.indices[c, layer, slot])}"
                            sums[key] = sums.get(key, 0) + weight * value[slot]
                            counts[key] = counts.get(key, 0.0) + weight
                        continue
                    if _EXPERT.match(name):
                        target = expert_target(name, c)
                        if target is None:
                            continue
                        name = target[0]
                    sums[name] = sums.get(name, 0) + weight * value
                    counts[name] = counts.get(name, 0.0) + weight
        return {k: (v / counts[k]).cpu().numpy() for k, v in sums.items()}

    return round_fn

