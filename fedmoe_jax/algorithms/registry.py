"""The methods an experiment can run, by name: one entry per method, from which the config schema,
the experiment builder and the reports take their lists.

A method is a factory from a `MethodContext` (the run's config, model, data, memory budgets and a way
to run Stage 1) to an `Algorithm`, whether it trains the full model or sub-MoEs, and its display
name. Adding a method is one module and one `register(Method(...))`; nothing else names methods.

Shape letters: N clients, L MoE layers, E experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from fedmoe_jax.algorithms.baselines import SCAFFOLD, FedProx, LocalOnly, RandomMoE
from fedmoe_jax.algorithms.fedmoe import FedMoE
from fedmoe_jax.federated.algorithm import Algorithm

PyTree = Any


@dataclasses.dataclass
class MethodContext:
    """What a method's factory may read: the run's config (an `ml_collections.ConfigDict`, read
    only), the model config `model_config` and initial `params`, the per-client `data`, the
    `memory` model and per-client `budgets <int>[N]` (bytes), and `run_stage1()`, which runs (or
    resumes) FedMoE's Stage 1 once and returns its result (maps `[N, L, E]`, probs, ...)."""

    config: Any
    model_config: Any
    params: PyTree
    data: Any
    memory: Any
    budgets: np.ndarray
    run_stage1: Callable[[], dict]


@dataclasses.dataclass(frozen=True)
class Method:
    """name: the `config.method` value; label: the display name in tables and figures; build: the
    factory; full_model: trains every expert of the full-model baseline model (`model.baseline_*`),
    not sub-MoEs; aggregates: False when clients train personal models without a server (its
    `Algorithm.aggregates`; such runs of several seeds go one after another); checks: extra config
    rules `config -> [(key, ok, fix)]` (`experiment.config.validate`); fine_tune_steps: `config -> k`,
    the local steps each client fine-tunes its final model on its own training data before the
    personalized test (`experiment.run.evaluate_final`; None: tested as trained)."""

    name: str
    label: str
    build: Callable[[MethodContext], Algorithm]
    full_model: bool = False
    aggregates: bool = True
    checks: Callable[[Any], list[tuple[str, bool, str]]] | None = None
    fine_tune_steps: Callable[[Any], int] | None = None


_REGISTRY: dict[str, Method] = {}


def register(method: Method, replace: bool = False) -> Method:
    """Add `method` (a `ValueError` if its name is taken, unless `replace`)."""
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is already registered; pass replace=True")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    """The entry of `name` (a `ValueError` listing the known methods if there is none)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; use one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_REGISTRY)


def method_labels() -> dict[str, str]:
    """`{name: display name}` of every registered method."""
    return {m.name: m.label for m in _REGISTRY.values()}


# ---------------------------------------------------------------------------------------------
# The paper's methods
# ---------------------------------------------------------------------------------------------
def _stage2_kwargs(ctx: MethodContext) -> dict:
    from fedmoe_jax.algorithms.memory import max_expert_totals

    c = ctx.config
    return dict(patience=c.stage2.patience, num_references=c.stage2.num_references,
                loss_tie_break=c.stage2.loss_tie_break, min_experts_per_layer=c.stage1.min_experts_per_layer,
                max_experts=max_expert_totals(ctx.memory, ctx.budgets))


def _fedmoe(adjust: bool) -> Callable[[MethodContext], Algorithm]:
    def build(ctx: MethodContext) -> Algorithm:
        stage1 = ctx.run_stage1()
        return FedMoE(stage1["maps"], adjust=adjust, initial_probs=stage1["probs"], **_stage2_kwargs(ctx))

    return build


def _fedmoe_no_stage1(ctx: MethodContext) -> Algorithm:
    """A random start of randomMoE's size; Stage 2 grows or prunes it."""
    maps = RandomMoE(ctx.config.random_moe.experts_per_layer).initial_expert_maps(
        ctx.model_config, ctx.data.num_clients, ctx.config.seed)
    return FedMoE(maps, **_stage2_kwargs(ctx))


def _references_checks(config: Any) -> list[tuple[str, bool, str]]:
    n = config.data.num_clients
    return [("stage2.num_references", config.stage2.num_references <= n - 1,
             f"use 1..data.num_clients-1 ({n - 1})")]


# Registration order is the row order of the paper's Table 1 (baselines first, FedMoE last), then the
# ablations: the reports list methods in it.
for _method in (
    Method("random_moe", "randomMoE", lambda ctx: RandomMoE(ctx.config.random_moe.experts_per_layer)),
    Method("fedprox", "FedProx", lambda ctx: FedProx(ctx.config.fedprox.mu), full_model=True),
    Method("scaffold", "SCAFFOLD", lambda ctx: SCAFFOLD(ctx.config.learning_rate, ctx.config.local_steps),
           full_model=True),
    Method("fedavg", "FedAvg", lambda ctx: Algorithm(), full_model=True),
    # The personalized-FL baseline the paper omits: FedAvg, then every client fine-tunes its copy of the
    # final global model (the same run as fedavg's with the same seed, so the pair isolates the fine-tuning)
    Method("fedavg_ft", "FedAvg + FT", lambda ctx: Algorithm(), full_model=True,
           fine_tune_steps=lambda config: config.fedavg_ft.local_steps or config.local_steps),
    Method("local", "Local only", lambda ctx: LocalOnly(), full_model=True, aggregates=False),
    Method("fedmoe", "FedMoE", _fedmoe(adjust=True), checks=_references_checks),
    Method("fedmoe_no_stage1", "FedMoE w/o stage1", _fedmoe_no_stage1, checks=_references_checks),
    Method("fedmoe_no_stage2", "FedMoE w/o stage2", _fedmoe(adjust=False), checks=_references_checks),
):
    register(_method)


def build_algorithm(name: str, ctx: MethodContext) -> Algorithm:
    """The `Algorithm` of method `name`, named after it."""
    method = get_method(name)
    algorithm = method.build(ctx)
    if algorithm.aggregates != method.aggregates:
        raise ValueError(f"method {name!r} is registered with aggregates={method.aggregates} but builds "
                         f"an algorithm with aggregates={algorithm.aggregates}; register it with the same")
    algorithm.name = name
    return algorithm


__all__ = ["Method", "MethodContext", "build_algorithm", "get_method", "method_labels", "method_names",
           "register", "unregister"]
