"""Hugging Face SwitchTransformers import/export: logits and routing parity with PyTorch."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

from fedmoe_jax.checkpoints import (
    config_from_hf,
    config_to_hf,
    load_hf_switch,
    save_hf_switch,
    to_hf_state,
)
from fedmoe_jax.models import SwitchTransformer, cross_entropy, get_config

VOCAB = 96


def hf_model(expert_capacity=64, num_experts=4, tie=True, seed=0):
    torch.manual_seed(seed)
    config = SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=4,
        num_decoder_layers=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
        num_experts=num_experts, expert_capacity=expert_capacity, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, tie_word_embeddings=tie,
    )
    return SwitchTransformersForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(2, VOCAB, (3, 12))
    dec = rng.integers(2, VOCAB, (3, 9))
    enc_mask = np.ones_like(ids)
    enc_mask[1, 8:] = 0
    enc_mask[2, 5:] = 0
    dec_mask = np.ones_like(dec)
    dec_mask[2, 6:] = 0
    ids[enc_mask == 0] = 0
    dec[dec_mask == 0] = 0
    return ids, dec, enc_mask, dec_mask


def run_both(model, path, batch):
    ids, dec, enc_mask, dec_mask = batch
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec),
            attention_mask=torch.tensor(enc_mask), decoder_attention_mask=torch.tensor(dec_mask),
            output_router_logits=True,
        )
    config, params = load_hf_switch(path)
    ours, state = SwitchTransformer(config).apply(
        {"params": params}, jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(enc_mask),
        jnp.asarray(dec_mask), mutable=["intermediates"],
    )
    return config, params, ref, ours, state


def our_expert_choices(state, stack):
    inter = flatten_dict(state["intermediates"])
    keys = sorted(k for k in inter if k[0] == stack and k[-1] == "expert_index")
    return [np.asarray(inter[k][0])[..., 0] for k in keys]


@pytest.mark.parametrize("capacity", [64, 2], ids=["no-drops", "drops"])
def test_logits_and_routing_match_pytorch(tmp_path, batch, capacity):
    model = hf_model(expert_capacity=capacity)
    model.save_pretrained(tmp_path)
    config, _, ref, ours, state = run_both(model, tmp_path, batch)
    ids, dec, enc_mask, dec_mask = batch
    real = dec_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours.logits)[real], ref.logits.numpy()[real], atol=1e-4)
    dropped = float(ours.routing.dropped.sum())
    assert (dropped > 0) == (capacity == 2)
    for stack, hf_logits, mask in (("encoder", ref.encoder_router_logits, enc_mask),
                                   ("decoder", ref.decoder_router_logits, dec_mask)):
        choices = our_expert_choices(state, stack)
        assert len(choices) == len(hf_logits) == 2
        for ours_idx, theirs in zip(choices, hf_logits):
            m = mask.astype(bool)
            np.testing.assert_array_equal(ours_idx[m], theirs.argmax(-1).numpy()[m])


@pytest.mark.parametrize("capacity", [64, 2], ids=["no-drops", "drops"])
def test_gradients_match_pytorch(tmp_path, batch, capacity):
    """Training path parity: d(token CE)/d(every parameter) equals torch autograd through HF's model
    at the same weights (routing gates, capacity drops and cross-attention included)."""
    model = hf_model(expert_capacity=capacity)
    model.save_pretrained(tmp_path)
    ids, dec, enc_mask, dec_mask = batch
    labels = np.random.default_rng(1).integers(2, VOCAB, dec.shape)
    ref = model(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec),
                attention_mask=torch.tensor(enc_mask), decoder_attention_mask=torch.tensor(dec_mask))
    real = torch.tensor(dec_mask.astype(bool))
    torch.nn.functional.cross_entropy(ref.logits[real], torch.tensor(labels)[real]).backward()
    theirs = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}

    config, params = load_hf_switch(tmp_path)

    def loss(p):
        out = SwitchTransformer(config).apply({"params": p}, jnp.asarray(ids), jnp.asarray(dec),
                                              jnp.asarray(enc_mask), jnp.asarray(dec_mask))
        return cross_entropy(out.logits, jnp.asarray(labels), jnp.asarray(dec_mask))

    ours = to_hf_state(config, jax.grad(loss)(params))
    compared = 0
    for name, grad in ours.items():
        if name in theirs:  # experts that got no token have no torch gradient; ours are exactly 0
            np.testing.assert_allclose(grad, theirs[name], atol=1e-6, rtol=1e-4, err_msg=name)
            compared += 1
        else:
            assert "experts" in name and not np.any(grad), name
    assert compared > 0.9 * len(ours)


def test_untied_lm_head_and_sharded_checkpoint(tmp_path, batch):
    model = hf_model(tie=False, seed=1)
    # transformers 5 unties the input embeddings too; ours share one input embedding.
    with torch.no_grad():
        for stack in (model.encoder, model.decoder):
            stack.embed_tokens.weight.copy_(model.shared.weight)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    config, params, ref, ours, _ = run_both(model, tmp_path, batch)
    assert not config.tie_word_embeddings and "lm_head" in params
    real = batch[3].astype(bool)
    np.testing.assert_allclose(np.asarray(ours.logits)[real], ref.logits.numpy()[real], atol=1e-4)


def test_separate_input_embeddings_are_refused(tmp_path):
    hf_model(tie=False, seed=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="input embedding different"):
        load_hf_switch(tmp_path)


@pytest.mark.parametrize("tie", [True, False])
def test_save_then_transformers_loads_same_logits(tmp_path, batch, tie):
    config = get_config("switch-tiny-8", vocab_size=VOCAB, expert_capacity=3, tie_word_embeddings=tie)
    ids, dec, enc_mask, dec_mask = batch
    params = SwitchTransformer(config).init(jax.random.key(0), jnp.asarray(ids), jnp.asarray(dec))
    ours = SwitchTransformer(config).apply(params, jnp.asarray(ids), jnp.asarray(dec),
                                           jnp.asarray(enc_mask), jnp.asarray(dec_mask))
    save_hf_switch(config, params["params"], tmp_path)
    model = SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec),
                    attention_mask=torch.tensor(enc_mask), decoder_attention_mask=torch.tensor(dec_mask))
    real = dec_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours.logits)[real], ref.logits.numpy()[real], atol=1e-4)
    # and the files load back into the same parameters
    config2, params2 = load_hf_switch(tmp_path)
    assert config2 == config
    for (k, a), (k2, b) in zip(sorted(flatten_dict(params["params"]).items()),
                               sorted(flatten_dict(params2).items())):
        assert k == k2
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("name", ["switch-base-8", "switch-base-32", "switch-small-16", "switch-tiny-4"])
def test_config_round_trip(name):
    config = get_config(name)
    assert config_from_hf(config_to_hf(config)) == config


def test_switch_base_32_matches_published_config():
    hf = config_to_hf(get_config("switch-base-32"))
    published = {  # google/switch-base-32 config.json
        "d_model": 768, "d_ff": 3072, "d_kv": 64, "num_heads": 12, "num_layers": 12,
        "num_decoder_layers": 12, "num_sparse_encoder_layers": 6, "num_sparse_decoder_layers": 6,
        "num_experts": 32, "expert_capacity": 64, "vocab_size": 32128, "router_aux_loss_coef": 0.001,
        "router_z_loss_coef": 0.001, "router_jitter_noise": 0.01, "dense_act_fn": "relu",
        "relative_attention_num_buckets": 32, "router_bias": False,
    }
    assert {k: hf[k] for k in published} == published


def test_export_refuses_what_hf_cannot_represent():
    with pytest.raises(ValueError, match="top-1"):
        config_to_hf(get_config("switch-tiny-4", top_k=2))
    with pytest.raises(ValueError, match="gated"):
        config_to_hf(get_config("switch-tiny-4", gated_ffn=True))
    with pytest.raises(ValueError, match="placement"):
        config_to_hf(get_config("switch-tiny-4", num_layers=5, encoder_sparse_step=3))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    hf_model().save_pretrained(path)
    return path


def _copy(src, dst):
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def test_bad_checkpoint_directories(tmp_path, saved):
    with pytest.raises(ValueError, match="does not exist"):
        load_hf_switch(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_switch(empty)

    t5 = _copy(saved, tmp_path / "t5")
    cfg = json.loads((t5 / "config.json").read_text())
    (t5 / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    with pytest.raises(ValueError, match="model_type='t5'"):
        load_hf_switch(t5)

    no_weights = _copy(saved, tmp_path / "no_weights")
    os.remove(no_weights / "model.safetensors")
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_hf_switch(no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors"):
        load_hf_switch(no_weights)

    corrupt = _copy(saved, tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        load_hf_switch(corrupt)

    wrong = _copy(saved, tmp_path / "wrong_shape")
    (wrong / "config.json").write_text(json.dumps({**cfg, "d_ff": 64}))
    with pytest.raises(ValueError, match="shape"):
        load_hf_switch(wrong)

    fewer = _copy(saved, tmp_path / "missing_tensor")
    (fewer / "config.json").write_text(json.dumps({**cfg, "num_experts": 5}))
    with pytest.raises(ValueError, match="incomplete: missing .*expert_4"):
        load_hf_switch(fewer)


def test_missing_shard_is_named(tmp_path):
    hf_model().save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(ValueError, match=f"missing shard.*{shard}"):
        load_hf_switch(tmp_path)


def test_save_with_a_tokenizer_writes_its_spiece_model(tmp_path):
    from fedmoe_jax.data import embedded_tokenizer
    from fedmoe_jax.data.tokenizer import Tokenizer

    tok = embedded_tokenizer()
    config = get_config("switch-tiny-4", vocab_size=tok.vocab_size)
    params = SwitchTransformer(config).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                                            jnp.ones((1, 4), jnp.int32))["params"]
    save_hf_switch(config, params, tmp_path, tokenizer=tok)
    loaded = Tokenizer.from_pretrained(tmp_path)
    text = "a small federated mixture of experts"
    assert loaded.vocab_size == tok.vocab_size and loaded.encode(text) == tok.encode(text)
    with pytest.raises(ValueError, match="tokenizer has 4096 pieces but the model's vocabulary is 128"):
        save_hf_switch(config.replace(vocab_size=128), params, tmp_path / "small", tokenizer=tok)
