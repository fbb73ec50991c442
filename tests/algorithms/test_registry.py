"""The method registry: the paper's methods, and a method of one's own added without touching the
package, run end to end through the CLI and the report."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import xla_flags

from fedmoe_jax.algorithms.registry import (
    Method,
    MethodContext,
    build_algorithm,
    get_method,
    method_labels,
    method_names,
    register,
    unregister,
)
from fedmoe_jax.errors import ConfigError
from fedmoe_jax.experiment.config import default_config, validate
from fedmoe_jax.federated.algorithm import Algorithm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_papers_methods_are_registered_with_their_kind():
    # Table 1's rows (baselines, FedMoE), then the ablations
    assert method_names()[:9] == ("random_moe", "fedprox", "scaffold", "fedavg", "fedavg_ft", "local",
                                  "fedmoe", "fedmoe_no_stage1", "fedmoe_no_stage2")
    full = {name for name in method_names() if get_method(name).full_model}
    assert full >= {"fedprox", "scaffold", "fedavg", "fedavg_ft", "local"}
    assert not full & {"fedmoe", "random_moe"}
    assert [name for name in method_names() if get_method(name).fine_tune_steps] == ["fedavg_ft"]
    assert method_labels()["random_moe"] == "randomMoE"
    assert [name for name in method_names() if not get_method(name).aggregates] == ["local"]
    with pytest.raises(ValueError, match="unknown method 'fedmo'.*fedmoe"):
        get_method("fedmo")


def test_register_refuses_a_taken_name_and_validation_follows_the_registry():
    toy = Method("toy_registry", "Toy", lambda ctx: Algorithm())
    register(toy)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register(toy)
        config = default_config()
        config.method = "toy_registry"
        validate(config)  # a registered method is a valid config.method
        algorithm = build_algorithm("toy_registry", MethodContext(config, None, None, None, None, None, dict))
        assert isinstance(algorithm, Algorithm) and algorithm.name == "toy_registry"
    finally:
        unregister("toy_registry")
    with pytest.raises(ConfigError, match="config.method='toy_registry' is invalid"):
        validate(config)
    register(Method("toy_registry", "Toy", lambda ctx: Algorithm(), aggregates=False))
    try:  # the registry's word on a server must be the algorithm's (vectorized seeds rely on it)
        with pytest.raises(ValueError, match="aggregates=False but builds an algorithm with aggregates=True"):
            build_algorithm("toy_registry", MethodContext(config, None, None, None, None, None, dict))
    finally:
        unregister("toy_registry")


def test_method_checks_reach_validation():
    config = default_config()
    config.stage2.num_references = config.data.num_clients  # more references than other clients
    with pytest.raises(ConfigError, match="stage2.num_references"):
        validate(config)
    config.method = "fedprox"  # no references: the FedMoE rule does not apply
    validate(config)


TOY_METHOD = '''
    """A method of one's own: FedAvg that logs a field per round and one in the summary."""
    from fedmoe_jax.algorithms.registry import Method, register
    from fedmoe_jax.federated.algorithm import Algorithm


    class Toy(Algorithm):
        def round_log(self):
            return {"toy_round": 1}

        def summary_fields(self, history):
            return {"toy_rounds": sum(row.get("toy_round", 0) for row in history)}


    register(Method("toy", "Toy method", lambda ctx: Toy()))
'''


def test_a_method_of_ones_own_runs_through_the_cli_and_the_report(tmp_path):
    (tmp_path / "toy_method.py").write_text(textwrap.dedent(TOY_METHOD))
    (tmp_path / "run_toy.py").write_text("import toy_method  # noqa: F401\nfrom fedmoe_jax import main\n"
                                         "main.run()\n")
    report = os.path.join(ROOT, "experiments", "report.py")  # the real command line, in this process
    (tmp_path / "report_toy.py").write_text(f"import runpy\nimport sys\nimport toy_method  # noqa: F401\n"
                                            f"sys.argv[0] = {report!r}\n"
                                            f"runpy.run_path({report!r}, run_name='__main__')\n")
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
           "JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, ".jax_cache"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    workdir = tmp_path / "runs" / "standard_hetero_t" / "toy"
    tiny = os.path.join(ROOT, "configs", "tiny.py")
    proc = subprocess.run([sys.executable, str(tmp_path / "run_toy.py"), f"--config={tiny}:toy",
                           f"--workdir={workdir}", "--progress=false"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((workdir / "summary.json").read_text())
    assert [row["toy_round"] for row in rows] == [1, 1, 1]
    assert summary["method"] == "toy" and summary["toy_rounds"] == 3 and "test" in summary

    proc = subprocess.run([sys.executable, str(tmp_path / "report_toy.py"), str(tmp_path / "runs"),
                           f"--out={tmp_path / 'report'}", "--baseline-methods=toy"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Toy method" in (tmp_path / "report" / "report.md").read_text()
