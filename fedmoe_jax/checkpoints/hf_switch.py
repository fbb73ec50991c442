"""Hugging Face SwitchTransformers checkpoints (safetensors) <-> fedmoe_jax parameters.

`load_hf_switch(path)` reads a local checkpoint directory (`config.json` + `model.safetensors`, or
sharded safetensors with `model.safetensors.index.json`), maps HF names to our tree, transposes
`nn.Linear` weights (`[out, in]` -> `[in, out]`) and stacks the experts of each MoE layer
(`wi [E, D, F]`, `wo [E, F, D]`, router `[D, E]`). `save_hf_switch` writes a directory that
`transformers.SwitchTransformersForConditionalGeneration.from_pretrained` loads.
Nothing is downloaded: prepare the directory on a machine with network access, e.g.
`huggingface-cli download google/switch-base-32 --local-dir DIR`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from fedmoe_jax.data.tokenizer import SPIECE_FILE
from fedmoe_jax.models.switch import SwitchConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPE = "switch_transformers"

# HF config keys copied one to one.
_SAME_KEYS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers",
    "num_experts", "expert_capacity", "router_bias", "router_jitter_noise", "router_z_loss_coef",
    "router_aux_loss_coef", "relative_attention_num_buckets", "relative_attention_max_distance",
    "dropout_rate", "layer_norm_epsilon", "dense_act_fn", "tie_word_embeddings", "pad_token_id",
    "eos_token_id", "decoder_start_token_id",
)


def _sparse_step(num_layers: int, num_sparse: int) -> int:
    """HF's derivation of the sparse step from the number of sparse layers."""
    return num_layers // num_sparse if num_sparse > 0 else num_layers


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> SwitchConfig:
    """SwitchConfig from a Hugging Face `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(
            f"config.json has model_type={model_type!r}; expected {MODEL_TYPE!r} "
            "(a Switch Transformers checkpoint such as google/switch-base-32)"
        )
    if hf.get("dense_act_fn", "relu") in ("gated-gelu", "gated-silu"):
        raise ValueError(f"gated dense_act_fn {hf['dense_act_fn']!r} is not supported by HF Switch")
    kwargs: dict[str, Any] = {k: hf[k] for k in _SAME_KEYS if k in hf and hf[k] is not None}
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    num_layers = int(hf.get("num_layers", 12))
    num_dec = int(hf.get("num_decoder_layers") or num_layers)
    kwargs["num_decoder_layers"] = num_dec
    kwargs["encoder_sparse_step"] = _sparse_step(num_layers, int(hf.get("num_sparse_encoder_layers",
                                                                        3)))
    kwargs["decoder_sparse_step"] = _sparse_step(num_dec, int(hf.get("num_sparse_decoder_layers",
                                                                     3)))
    kwargs.update(overrides)
    return SwitchConfig(**kwargs)


def config_to_hf(config: SwitchConfig) -> dict[str, Any]:
    """Hugging Face `config.json` dict for a config HF can represent (else ValueError)."""
    if config.gated_ffn:
        raise ValueError("HF SwitchTransformers has no gated FFN; set gated_ffn=False to export")
    if config.top_k != 1:
        raise ValueError("HF SwitchTransformers routes top-1 only; set top_k=1 to export")
    if config.expert_capacity is None:
        raise ValueError("HF SwitchTransformers needs an absolute expert_capacity to export")
    hf: dict[str, Any] = {k: getattr(config, k) for k in _SAME_KEYS}
    n_enc, n_dec = len(config.encoder_moe_blocks), len(config.decoder_moe_blocks)
    hf.update(
        model_type=MODEL_TYPE,
        architectures=["SwitchTransformersForConditionalGeneration"],
        num_sparse_encoder_layers=n_enc,
        num_sparse_decoder_layers=n_dec,
        is_encoder_decoder=True,
        router_dtype="float32",
        torch_dtype=config.param_dtype,
    )
    back = config_from_hf(hf)
    if (back.encoder_moe_blocks, back.decoder_moe_blocks) != (
        config.encoder_moe_blocks, config.decoder_moe_blocks
    ):
        raise ValueError(
            "this MoE placement (sparse steps "
            f"{config.encoder_sparse_step}/{config.decoder_sparse_step}) cannot be expressed by "
            "HF's num_sparse_*_layers; use a sparse step that divides the number of layers"
        )
    return hf


def _hf_names(config: SwitchConfig) -> dict[tuple[str, ...], list[tuple[str, str]]]:
    """Our parameter path -> list of (HF tensor name, kind) it is built from.

    Kinds: 'copy', 'linear' (transpose), 'qkv' (transpose, split heads), 'out' (transpose, merge
    heads), 'experts' (transpose each expert, stack over experts).
    """
    names: dict[tuple[str, ...], list[tuple[str, str]]] = {("shared", "embedding"): [
        ("shared.weight", "copy")]}
    for stack in ("encoder", "decoder"):
        n_blocks = config.num_layers if stack == "encoder" else config.num_decoder_layers
        step = config.encoder_sparse_step if stack == "encoder" else config.decoder_sparse_step
        for i in range(n_blocks):
            ours = (stack, f"block_{i}")
            hf = f"{stack}.block.{i}.layer"
            attn = [("attention", f"{hf}.0.SelfAttention", f"{hf}.0.layer_norm", "attention_norm")]
            if stack == "decoder":
                attn.append(("cross_attention", f"{hf}.1.EncDecAttention", f"{hf}.1.layer_norm",
                             "cross_attention_norm"))
            for mod, hf_mod, hf_norm, norm in attn:
                for p in ("q", "k", "v"):
                    names[ours + (mod, p, "kernel")] = [(f"{hf_mod}.{p}.weight", "qkv")]
                names[ours + (mod, "o", "kernel")] = [(f"{hf_mod}.o.weight", "out")]
                names[ours + (norm, "scale")] = [(f"{hf_norm}.weight", "copy")]
            if i == 0:
                names[ours + ("attention", "relative_attention_bias", "embedding")] = [
                    (f"{hf}.0.SelfAttention.relative_attention_bias.weight", "copy")]
            ff = f"{hf}.{2 if stack == 'decoder' else 1}"
            names[ours + ("mlp_norm", "scale")] = [(f"{ff}.layer_norm.weight", "copy")]
            if SwitchConfig.is_sparse(i, step):
                names[ours + ("mlp", "router", "kernel")] = [
                    (f"{ff}.mlp.router.classifier.weight", "linear")]
                if config.router_bias:
                    names[ours + ("mlp", "router", "bias")] = [
                        (f"{ff}.mlp.router.classifier.bias", "copy")]
                for w in ("wi", "wo"):
                    names[ours + ("mlp", "experts", w)] = [
                        (f"{ff}.mlp.experts.expert_{e}.{w}.weight", "experts")
                        for e in range(config.num_experts)
                    ]
            else:
                for w in ("wi", "wo"):
                    names[ours + ("mlp", w, "kernel")] = [(f"{ff}.mlp.{w}.weight", "linear")]
        names[(stack, "final_norm", "scale")] = [(f"{stack}.final_layer_norm.weight", "copy")]
    if not config.tie_word_embeddings:
        names[("lm_head", "kernel")] = [("lm_head.weight", "linear")]
    return names


def _to_ours(tensors: list[np.ndarray], kind: str, config: SwitchConfig) -> np.ndarray:
    h, dk = config.num_heads, config.d_kv
    if kind == "copy":
        return tensors[0]
    if kind == "linear":
        return tensors[0].T
    if kind == "qkv":  # [H*dk, D] -> [D, H, dk]
        return tensors[0].T.reshape(-1, h, dk)
    if kind == "out":  # [D, H*dk] -> [H, dk, D]
        return tensors[0].T.reshape(h, dk, -1)
    if kind == "experts":  # E x [out, in] -> [E, in, out]
        return np.stack([t.T for t in tensors])
    raise AssertionError(kind)


def _to_hf(value: np.ndarray, kind: str) -> list[np.ndarray]:
    if kind == "copy":
        return [value]
    if kind == "linear":
        return [value.T]
    if kind == "qkv":
        return [value.reshape(value.shape[0], -1).T]
    if kind == "out":
        return [value.reshape(-1, value.shape[-1]).T]
    if kind == "experts":
        return [w.T for w in value]
    raise AssertionError(kind)


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise ValueError(
                f"checkpoint {path} is incomplete: {INDEX_FILE} names missing shard(s) "
                f"{', '.join(missing)}; download all shards"
            )
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, WEIGHTS_FILE)
    if os.path.exists(single):
        return [single]
    if any(f.endswith(".bin") for f in os.listdir(path)):
        raise ValueError(
            f"checkpoint {path} has only PyTorch .bin weights; convert them to safetensors "
            "(transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise ValueError(f"checkpoint {path} has no {WEIGHTS_FILE} or {INDEX_FILE}")


def load_hf_switch(path: str | os.PathLike, **config_overrides: Any) -> tuple[SwitchConfig, dict]:
    """Read a local HF Switch checkpoint directory -> `(SwitchConfig, params)` (numpy leaves).

    `config_overrides` change run-time fields (e.g. `dispatch`, `dropout_rate`) but not shapes.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint directory {path} does not exist")
    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(cfg_file):
        raise ValueError(f"checkpoint directory {path} has no {CONFIG_FILE}")
    with open(cfg_file) as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    config = config_from_hf(hf_config, **config_overrides)
    tensors: dict[str, np.ndarray] = {}
    for file in _weight_files(path):
        try:
            with safe_open(file, framework="numpy") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"cannot read {file}: {e}") from None
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
        tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    for stack in ("encoder", "decoder"):
        own = tensors.get(f"{stack}.embed_tokens.weight")
        if own is not None and "shared.weight" in tensors and not np.array_equal(
            own, tensors["shared.weight"]
        ):
            raise ValueError(
                f"checkpoint {path} has a {stack} input embedding different from shared.weight; "
                "only checkpoints whose encoder and decoder share one input embedding are supported"
            )
    if not config.tie_word_embeddings and "lm_head.weight" not in tensors:
        raise ValueError(f"checkpoint {path} has untied embeddings but no lm_head.weight")
    flat: dict[tuple[str, ...], np.ndarray] = {}
    missing: list[str] = []
    for ours, sources in _hf_names(config).items():
        absent = [name for name, _ in sources if name not in tensors]
        if absent:
            missing.extend(absent)
            continue
        kind = sources[0][1]
        flat[ours] = _to_ours([tensors[name] for name, _ in sources], kind, config)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"checkpoint {path} is incomplete: missing {shown}")
    _check_shapes(flat, config)
    from flax.traverse_util import unflatten_dict

    return config, unflatten_dict(flat)


def _check_shapes(flat: Mapping[tuple[str, ...], np.ndarray], config: SwitchConfig) -> None:
    import jax

    from fedmoe_jax.models.switch import SwitchTransformer

    expected = jax.eval_shape(
        lambda: SwitchTransformer(config).init(
            jax.random.key(0), np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int32)
        )["params"]
    )
    from flax.traverse_util import flatten_dict

    for key, shape in flatten_dict(expected).items():
        got = flat.get(key)
        if got is None:
            raise ValueError(f"checkpoint has no tensor for {'/'.join(key)}")
        if tuple(got.shape) != tuple(shape.shape):
            raise ValueError(
                f"tensor {'/'.join(key)} has shape {tuple(got.shape)} but config.json implies "
                f"{tuple(shape.shape)}"
            )


def to_hf_state(config: SwitchConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our parameters as Hugging Face SwitchTransformers tensors (name -> float32 array), in memory."""
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(dict(params))
    out: dict[str, np.ndarray] = {}
    for ours, sources in _hf_names(config).items():
        if ours not in flat:
            raise ValueError(f"params have no {'/'.join(ours)}; are they for this config?")
        kind = sources[0][1]
        value = np.asarray(flat[ours], dtype=np.float32)
        for (name, _), tensor in zip(sources, _to_hf(value, kind)):
            out[name] = np.ascontiguousarray(tensor)
    if not config.tie_word_embeddings:
        # transformers 5 unties the input embeddings too when tie_word_embeddings is False.
        for stack in ("encoder", "decoder"):
            out[f"{stack}.embed_tokens.weight"] = out["shared.weight"].copy()
    return out


def save_hf_switch(config: SwitchConfig, params: Mapping[str, Any], path: str | os.PathLike,
                   tokenizer: Any = None) -> None:
    """Write `config.json` + `model.safetensors` that HF's SwitchTransformers loads, and with a
    `tokenizer` (`fedmoe_jax.data.Tokenizer`) its `spiece.model` too, as on the Hub: a directory our
    `model.init="hf"` path (and HF's T5 tokenizer) loads whole."""
    path = os.fspath(path)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is "
                         f"{config.vocab_size}")
    hf_config = config_to_hf(config)
    os.makedirs(path, exist_ok=True)
    out = to_hf_state(config, params)
    tmp = os.path.join(path, WEIGHTS_FILE + ".tmp")
    save_file(out, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, WEIGHTS_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        with open(os.path.join(path, SPIECE_FILE), "wb") as f:
            f.write(tokenizer.processor.serialized_model_proto())
