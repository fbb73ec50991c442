"""Checking the config overrides before launching anything: each run's config file loaded (as
`config_flags` does), its overrides applied and, optionally, validated."""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedmoe_jax.tools.sweeps.spec import Run, SweepSpec
from fedmoe_jax.tools.sweeps.values import SpecError, _hash, _to_python


def load_config(path: str, arg: str | None):
    """`get_config(arg)` (or `get_config()`) of an ml_collections config file, as config_flags does."""
    if not os.path.isfile(path):
        raise SpecError(f"config file {path} not found")
    try:
        mod_spec = importlib.util.spec_from_file_location(f"_sweep_config_{_hash(path)}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module.get_config(arg) if arg is not None else module.get_config()
    except Exception as e:  # noqa: BLE001 - any failure of user code is a bad spec
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        where = f"{path}:{arg}" if arg is not None else path
        raise SpecError(f"config {where} could not be loaded: {type(e).__name__}: {first}") from None


def apply_overrides(config, overrides: Mapping[str, Any]):
    """A copy of `config` with `overrides` set; unknown keys and wrong types raise `SpecError`."""
    import ml_collections

    config = copy.deepcopy(config)
    for key, value in overrides.items():
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict | dict) or part not in node:
                raise SpecError(f"config has no key {'.'.join(parts[:i + 1])!r} (from {key!r}; misspelled?)")
            if i < len(parts) - 1:
                node = node[part]
        old = node[parts[-1]]
        if isinstance(old, int) and not isinstance(old, bool) and isinstance(value, bool):
            raise SpecError(f"{key}={value!r}: expected an integer like {old!r}")
        try:
            node[parts[-1]] = _to_python(value) if isinstance(old, tuple) else value
        except (TypeError, ValueError) as e:
            raise SpecError(f"{key}={value!r}: {str(e).splitlines()[0]}") from None
    return config


def check_configs(spec: SweepSpec, runs: Sequence[Run],
                  validator: Callable[[Any], None] | None = None) -> None:
    """Load the config once per arg and apply every run's overrides (and `validator`, which raises
    `ValueError` on an invalid config); the first problem raises `SpecError`."""
    base = {arg: load_config(spec.config, arg) for arg in spec.args or [None]}
    for run in runs:
        config = apply_overrides(base[run.arg], {**spec.set, **run.params})
        if validator is not None:
            try:
                validator(config)
            except ValueError as e:
                raise SpecError(f"run {run.name}: {str(e).splitlines()[0]}") from None


def fedmoe_validator() -> Callable[[Any], None] | None:
    """`fedmoe_jax.experiment.validate` when it exists (the real CLI's own check), else None."""
    try:
        from fedmoe_jax.experiment import validate
    except ImportError:
        return None
    return validate


def config_from_spec(spec: str, overrides: Sequence[str] = ()):
    """The config of "FILE[:ARG]" with `--set`-style "KEY=VALUE" `overrides` applied (what the tool
    scripts take); a file that fails to load or a bad override raises `SpecError`."""
    from fedmoe_jax.tools.sweeps.values import parse_set_flag

    path, _, arg = spec.partition(":")
    return apply_overrides(load_config(path, arg or None), dict(parse_set_flag(s) for s in overrides))

