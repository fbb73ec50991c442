"""configs/paper.py end to end on a tiny Hugging Face checkpoint and tiny TFDS data the test makes
(`fedmoe_jax.tools.tiny_paper`): HF loading with its own spiece.model, TFDS loading, absolute GB budgets,
Stage 1, Stage 2 and the evaluation, through the CLI; and every missing input named at once."""

import json
import os

import pytest
from test_main import ROOT, cli

from fedmoe_jax.errors import ConfigError

PAPER = os.path.join(ROOT, "configs", "paper.py")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from fedmoe_jax.tools.tiny_paper import make_tiny_paper_inputs

    out = tmp_path_factory.mktemp("tiny_paper")
    return out, make_tiny_paper_inputs(out)


def paper_config(arg, **paths):
    import importlib.util

    from ml_collections import config_flags  # noqa: F401  (the loader main uses)

    spec = importlib.util.spec_from_file_location("paper_config", PAPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    for key, value in paths.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def test_the_paper_config_runs_end_to_end_on_tiny_inputs(inputs, tmp_path):
    from fedmoe_jax.tools.tiny_paper import paper_overrides

    out, _ = inputs
    workdir = tmp_path / "run"
    # fewer clients than the paper's 30, and no global-model or unseen-client test, only to keep the suite
    # short; everything else as documented
    res = cli(f"--config={PAPER}:standard_hetero_t,fedmoe", f"--workdir={workdir}", *paper_overrides(out),
              "--config.data.num_clients=6", "--config.cohort_size=3", "--config.eval.global_model=False",
              "--config.eval.unseen_local_steps=0")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.load(open(workdir / "summary.json"))
    assert summary["rounds"] == 2 and summary["model"] == "switch-base-32"
    assert summary["num_experts"] == 16 and set(summary["test"]) == {"tc_accuracy", "rc_f1", "ts_rouge2"}
    assert summary["stage1"]["measured"] == 6  # every client fine-tuned LoRA and was measured
    assert json.load(open(workdir / "config.json"))["data"]["source"] == "tfds"


def test_a_full_model_baseline_starts_from_the_baseline_checkpoint(inputs):
    from fedmoe_jax.experiment.build import build

    out, paths = inputs
    config = paper_config("standard_hetero_t,fedavg", model__path=paths["moe"],
                          model__baseline_path=paths["baseline"], data__dir=paths["tfds"])
    config.data.max_input_len, config.data.max_target_len = 64, 16
    exp = build(config, None, progress=False)
    assert exp.trainer.config.num_experts == 8  # switch-base-8's role
    assert exp.trainer.tokenizer.vocab_size == 4096  # the spiece.model save_hf_switch wrote beside it


def test_every_missing_input_is_named_at_once(tmp_path):
    from fedmoe_jax.experiment.build import build

    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "config.json").write_text("{}")
    config = paper_config("standard_hetero_t,fedmoe", model__path=str(tmp_path / "moe"),
                          model__baseline_path=str(tmp_path / "none"), data__dir=str(tmp_path / "tfds"))
    with pytest.raises(ConfigError) as info:
        build(config, None, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert f"model.path {tmp_path / 'moe'}: model.safetensors, spiece.model" in message
    assert f"data.dir {tmp_path / 'tfds'}: ag_news_subset, squad, xsum not prepared" in message
    assert "--data_dir=DIR" in message
