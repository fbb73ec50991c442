"""The experiment config schema and its validation (no JAX compute)."""

import importlib.util
import json
import os

import ml_collections
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_jax.algorithms.registry import method_names
from fedmoe_jax.experiment import prepare_workdir
from fedmoe_jax.experiment.config import (
    SETTINGS,
    ConfigError,
    default_config,
    flatten,
    parse_setting_arg,
    validate,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(name: str, *args):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


@pytest.mark.parametrize("name,args", [("base", ()), ("tiny", ()), ("tiny", ("scaffold",)),
                                       ("cpu", ("enforced_hetero_td,local",)),
                                       ("cpu", ("standard_hetero_t",))])
def test_shipped_configs_validate(name, args):
    validate(load_config(name, *args))


def test_pretraining_config_is_not_an_experiment():
    """configs/pretrain.py has no method: validate points at the pretraining command instead."""
    with pytest.raises(ConfigError, match="no method.*python -m fedmoe_jax.pretrain"):
        validate(load_config("pretrain"))


def test_paper_config_needs_its_paths():
    c = load_config("paper", "standard_hetero_td,fedprox")
    assert (c.setting, c.method, c.model.name, c.model.baseline_num_experts) == (
        "standard_hetero_td", "fedprox", "switch-base-32", 8)
    with pytest.raises(ConfigError, match="data.dir"):
        validate(c)
    c.data.dir, c.model.path = "/data", "/ckpt/32"
    with pytest.raises(ConfigError, match="baseline_path"):
        validate(c)
    c.model.baseline_path = "/ckpt/8"
    validate(c)


def test_paper_config_runs_as_the_paper_did():
    """Stage 1 as long as a local round, no loss tie-break, whole test sets, and alpha placing
    Stage 1's sub-MoEs of switch-base-32 near the paper's 78 experts (50-114) under the memory model."""
    import numpy as np

    from fedmoe_jax.algorithms.memory import MemoryModel, max_expert_totals
    from fedmoe_jax.models import get_config

    c = load_config("paper", "standard_hetero_t")
    assert c.stage1.local_steps == c.local_steps and not c.stage2.loss_tie_break
    assert c.data.eval_examples_per_task == 0 and c.eval.test_examples == 0
    model = get_config(c.model.name)
    memory = MemoryModel(model, c.batch_size, c.data.max_input_len, c.data.max_target_len)
    budgets = np.arange(c.memory.budget_low, c.memory.budget_high + 0.5, c.memory.budget_step) * 1e9
    # the largest sub-MoE under alpha * M (as in the search when the budget binds), per budget level
    experts = np.clip(max_expert_totals(memory, c.memory.mem_fraction * budgets), model.num_moe_layers,
                      model.num_moe_layers * model.num_experts)
    assert 70 <= experts.mean() <= 86 and experts.min() >= 45 and experts.max() <= 120


def test_parse_setting_arg():
    assert parse_setting_arg("enforced_hetero_t") == ("enforced_hetero_t", None)
    assert parse_setting_arg("standard_hetero_td, fedmoe_no_stage1") == ("standard_hetero_td",
                                                                         "fedmoe_no_stage1")
    for bad in ("standard", "standard_hetero_t,fedsgd", "a,b,c"):
        with pytest.raises(ConfigError, match="SETTING"):
            parse_setting_arg(bad)


@pytest.mark.parametrize("key,value,match", [
    ("method", "fedsgd", "method"),
    ("setting", "hetero", "setting"),
    ("cohort_size", 31, "cohort_size"),
    ("cohort_size", 0, "cohort_size"),
    ("data.num_clients", 2, "num_clients"),
    ("stage2.num_references", 30, "num_references"),
    ("random_moe.experts_per_layer", 17, "experts_per_layer"),
    ("model.baseline_num_experts", 0, "baseline_num_experts"),
    ("memory.budget_low", 0.9, "budget_low"),  # above budget_high 0.7
    ("memory.budget_high", 1.5, "budget_low|budget_high"),
    ("memory.mem_fraction", 0.0, "mem_fraction"),
    ("loss.label_smoothing", 1.0, "label_smoothing"),
    ("learning_rate", 0.0, "learning_rate"),
    ("learning_rate", float("inf"), "learning_rate=inf is not finite"),
    ("weight_decay", float("nan"), "weight_decay=nan is not finite"),
    ("data.task_ratios", (1.0, float("inf"), 1.0), "task_ratios=.* is not finite"),
    ("optimizer", "sgd", "optimizer"),
    ("data.source", "hub", "source"),
    ("model.init", "hub", "init"),
    ("model.remat", "all", "model.remat"),
    ("data.task_ratios", (1.0, 0.0, 1.0), "task_ratios"),
    ("decoding.num_beams", 0, "decoding.num_beams"),
    ("decoding.length_penalty", (1.0, 2.0), "decoding.length_penalty.*three"),
    ("decoding.length_penalty", (1.0, float("nan"), 1.0), "length_penalty=.* is not finite"),
])
def test_inconsistent_values_are_named(key, value, match):
    c = default_config()
    node, leaf = c, key.split(".")
    for part in leaf[:-1]:
        node = node[part]
    node[leaf[-1]] = value
    with pytest.raises(ConfigError, match=match) as info:
        validate(c)
    assert "\n" not in str(info.value)


def test_num_references_bound_only_for_fedmoe_methods():
    """K of Eq. 5 must leave K <= N-1 other clients for FedMoE's recommendation; other methods
    do not use it (a 3-client `local` run needs no override)."""
    c = default_config()
    c.data.num_clients, c.cohort_size, c.stage2.num_references = 3, 3, 3
    for method in ("local", "fedavg", "random_moe"):
        c.method = method
        validate(c)
    for method in ("fedmoe", "fedmoe_no_stage1", "fedmoe_no_stage2"):
        c.method = method
        with pytest.raises(ConfigError, match=r"num_references=3 is invalid.*1\.\.data\.num_clients-1 \(2\)"):
            validate(c)


def test_unknown_missing_and_mistyped_keys():
    c = default_config()
    c.data.unlock()
    c.data.num_clinets = 30
    with pytest.raises(ConfigError, match="unknown config key.*data.num_clinets"):
        validate(c)
    c = ml_collections.ConfigDict(default_config().to_dict())
    del c["stage2"]
    with pytest.raises(ConfigError, match="lacks key.*stage2.patience"):
        validate(c)
    c = ml_collections.ConfigDict(default_config().to_dict(), type_safe=False)
    c.seed = 1.5
    with pytest.raises(ConfigError, match="config.seed=1.5 has type float"):
        validate(c)
    c = ml_collections.ConfigDict(default_config().to_dict(), type_safe=False)
    c.num_rounds = True
    with pytest.raises(ConfigError, match="num_rounds"):
        validate(c)


SCHEMA = flatten(default_config())
_bad_values = st.one_of(st.integers(-10**6, -1), st.floats(allow_nan=True), st.text(max_size=5),
                        st.booleans(), st.none(), st.lists(st.integers(), max_size=3))


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(sorted(SCHEMA)), value=_bad_values)
def test_random_values_never_crash_the_validator(key, value):
    """Any value in any field: either accepted (and then consistent) or a one-line ConfigError."""
    c = ml_collections.ConfigDict(default_config().to_dict(), type_safe=False)
    node, parts = c, key.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    try:
        validate(c)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    # accepted: the stored value must have the default's type and pass the documented rules
    default, value = SCHEMA[key], flatten(c)[key]
    assert type(value) is type(default) or (isinstance(default, float) and isinstance(value, int)
                                            and not isinstance(value, bool))
    assert value == value  # NaN is never accepted


def test_methods_and_settings_listed():
    assert set(method_names()) >= {"fedmoe", "random_moe", "fedprox", "scaffold", "fedavg", "local",
                            "fedmoe_no_stage1", "fedmoe_no_stage2"}
    assert set(SETTINGS) == {"standard_hetero_t", "standard_hetero_td", "enforced_hetero_t",
                             "enforced_hetero_td"}


def test_prepare_workdir_refuses_a_different_run_and_keeps_its_files(tmp_path):
    c = default_config()
    assert prepare_workdir(c, str(tmp_path)) is True
    saved = (tmp_path / "config.json").read_bytes()
    c.seed, c.model.name = 3, "switch-tiny-8"
    with pytest.raises(ConfigError, match="model.name.*seed|seed.*model.name") as info:
        prepare_workdir(c, str(tmp_path))
    assert "new --workdir" in str(info.value)
    assert (tmp_path / "config.json").read_bytes() == saved
    c = default_config()
    c.num_rounds, c.eval.test_examples = 99, 5  # resumable keys may change
    c.model.remat = "full"  # resumable keys inside a defining group; their siblings still define
    c.model.build_pretrained = False
    assert prepare_workdir(c, str(tmp_path)) is False
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_rounds"] == 99 and saved["model"]["remat"] == "full"
    c.model.dispatch = "capacity"  # the default is "dropless": the run's function changes
    with pytest.raises(ConfigError, match="model.dispatch"):
        prepare_workdir(c, str(tmp_path))

    # A run written before a key existed (here: loss.z_loss_weight) resumes while the key keeps its
    # default, and is refused once it does not.
    path = tmp_path / "config.json"
    old = json.loads(path.read_text())
    del old["loss"]["z_loss_weight"]
    path.write_text(json.dumps(old))
    c = default_config()
    c.num_rounds = 99
    assert prepare_workdir(c, str(tmp_path)) is False
    path.write_text(json.dumps(old))
    c.loss.z_loss_weight = 0.5
    with pytest.raises(ConfigError, match="loss.z_loss_weight"):
        prepare_workdir(c, str(tmp_path))


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        prepare_workdir(default_config(), str(blocker / "run"))


def test_every_field_is_documented_and_config_help_lists_them():
    """`--config_help` (describe_config) prints every field, its value and the schema's comment."""
    from fedmoe_jax.experiment.config import default_config, describe_config, field_docs, flatten

    docs, keys = field_docs(), set(flatten(default_config()))
    assert set(docs) == keys and all(docs.values()), sorted(k for k in keys if not docs.get(k))
    config = default_config()
    config.num_rounds = 7
    text = describe_config(config)
    assert "num_rounds = 7  [may change on resume]\n    federated rounds (Stage 2)" in text
    assert "seed = 0\n    run seed" in text and text.index("method =") < text.index("data.source =")
