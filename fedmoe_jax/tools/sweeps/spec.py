"""The sweep spec (`SweepSpec`: config, args, grid, set, exclude, root, runner) from a JSON object,
a file or command-line flags, validated; its expansion into runs (`Run`, one per grid point, with
its directory and command) and processes (`Job`: a run, or the seeds of a grid point vectorized)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from fedmoe_jax.files import SUMMARY_FILE as SUMMARY
from fedmoe_jax.tools.sweeps.values import (
    SpecError,
    _canonical,
    _check_key,
    format_cli_value,
    format_name_value,
    parse_exclude_flag,
    parse_grid_flag,
    parse_set_flag,
    run_name,
)

SPEC_KEYS = ("config", "args", "grid", "set", "exclude", "root", "runner", "vectorize_seeds")
DEFAULT_ROOT = "runs/sweep"
_SAFE_ARG = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._,+-]*")  # an ARG is a directory of its own


def default_runner() -> tuple[str, ...]:
    return (sys.executable, "-m", "fedmoe_jax.main")


@dataclasses.dataclass
class SweepSpec:
    """What to run. `grid` and `set` map config keys (dotted) to values; `args` are the config
    file's `:ARG`s (empty: none); `exclude` entries drop the grid points matching all their items
    (key `arg` matches the config ARG); `runner` is the program and its leading arguments."""

    config: str
    args: list[str] = dataclasses.field(default_factory=list)
    grid: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    set: dict[str, Any] = dataclasses.field(default_factory=dict)
    exclude: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    root: str = DEFAULT_ROOT
    runner: list[str] = dataclasses.field(default_factory=lambda: list(default_runner()))
    # grid points that differ only in `seed` run as one process, rounds vectorized (`--seeds`)
    vectorize_seeds: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Run:
    """One grid point: `name` is its directory relative to the sweep root."""

    arg: str | None
    params: dict[str, Any]
    name: str
    workdir: str
    command: list[str]

    def finished(self) -> bool:
        return os.path.isfile(os.path.join(self.workdir, SUMMARY))


@dataclasses.dataclass
class Job:
    """One process: a single run, or (`vectorize_seeds`) the seeds of one grid point, whose output
    goes to the first run's log."""

    runs: list[Run]
    command: list[str]

    @property
    def log_dir(self) -> str:
        return self.runs[0].workdir


_SEED_SENTINEL = 987654321


def jobs(spec: SweepSpec, runs: Sequence[Run]) -> list[Job]:
    """The processes that run `runs`: one per run, or with `spec.vectorize_seeds` one per group of
    runs that differ only in their seed (`RUNNER ... --workdir=ROOT/.../seed={seed},... --seeds=S1,S2`)."""
    if not spec.vectorize_seeds:
        return [Job([r], r.command) for r in runs]
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        rest = {k: v for k, v in r.params.items() if k != "seed"}
        groups.setdefault((r.arg, _canonical(rest)), []).append(r)
    out = []
    for members in groups.values():
        if len(members) == 1:
            out.append(Job(members, members[0].command))
            continue
        first = members[0]
        template = run_name({**first.params, "seed": _SEED_SENTINEL}).replace(f"seed={_SEED_SENTINEL}",
                                                                              "seed={seed}")
        if first.arg is not None:
            template = os.path.join(os.path.dirname(first.name), template)
        if not all(isinstance(r.params["seed"], int) and not isinstance(r.params["seed"], bool)
                   and template.replace("{seed}", str(r.params["seed"])) == r.name for r in members):
            out.extend(Job([r], r.command) for r in members)  # seeds that are not plain integers
            continue
        rest = {k: v for k, v in first.params.items() if k != "seed"}
        seeds = "--seeds=" + ",".join(str(r.params["seed"]) for r in members)
        out.append(Job(members, _command(spec, first.arg, os.path.join(spec.root, template), rest, seeds)))
    return out


def _check_runner(runner: Sequence[str]) -> None:
    if not runner or not all(isinstance(a, str) and a for a in runner):
        raise SpecError("runner must be a program and its arguments, e.g. 'python -m fedmoe_jax.main'")
    prog = runner[0]
    ok = (os.path.isfile(prog) and os.access(prog, os.X_OK)) if os.sep in prog else bool(shutil.which(prog))
    if not ok:
        raise SpecError(f"runner program {prog!r} not found or not executable")


def spec_from_dict(d: Any, *, check_runner: bool = True) -> SweepSpec:
    """Validate a spec (as parsed from JSON); raise `SpecError` naming the first problem."""
    if not isinstance(d, dict):
        raise SpecError("a sweep spec is a JSON object with keys " + ", ".join(SPEC_KEYS))
    unknown = sorted(set(d) - set(SPEC_KEYS))
    if unknown:
        raise SpecError(f"unknown spec key(s) {', '.join(unknown)}; allowed: {', '.join(SPEC_KEYS)}")
    config = d.get("config")
    if not isinstance(config, str) or not config:
        raise SpecError("spec needs 'config': the config file, e.g. \"configs/cpu.py\"")
    args = d.get("args", [])
    args = [args] if isinstance(args, str) else args
    if ":" in config:
        if args:
            raise SpecError(f"config {config!r} has an ':ARG' and 'args' is given too; use one of them")
        config, arg = config.split(":", 1)
        args = [arg]
    if not isinstance(args, list) or not all(isinstance(a, str) and a for a in args):
        raise SpecError("'args' must be a list of strings (the config file's :ARG values; [] = none)")
    if len(set(args)) != len(args):
        raise SpecError(f"'args' has duplicates: {args}")
    grid = d.get("grid", {})
    if not isinstance(grid, dict):
        raise SpecError("'grid' must be an object: config key -> list of values")
    for key, values in grid.items():
        _check_key(key, "grid")
        if not isinstance(values, list) or not values:
            raise SpecError(f"grid axis {key!r} must be a non-empty list of values, got {values!r}")
        canon = [_canonical(v) for v in values]
        if len(set(canon)) != len(canon):
            raise SpecError(f"grid axis {key!r} has duplicate values: {values}")
    fixed = d.get("set", {})
    if not isinstance(fixed, dict):
        raise SpecError("'set' must be an object: config key -> value")
    for key in fixed:
        _check_key(key, "set")
        if key in grid:
            raise SpecError(f"{key!r} is both in 'grid' and in 'set'; keep one")
    exclude = d.get("exclude", [])
    exclude = [exclude] if isinstance(exclude, dict) else exclude
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e for e in exclude):
        raise SpecError("'exclude' must be a list of non-empty objects like {\"method\": \"local\"}")
    for entry in exclude:
        bad = sorted(set(entry) - set(grid) - {"arg"})
        if bad:
            raise SpecError(f"exclude entry {entry} names {', '.join(bad)}, not a grid key (or 'arg')")
    root = d.get("root", DEFAULT_ROOT)
    if not isinstance(root, str) or not root:
        raise SpecError("'root' must be a directory path")
    runner = d.get("runner", list(default_runner()))
    if isinstance(runner, str):
        runner = shlex.split(runner)
    if not isinstance(runner, list):
        raise SpecError("'runner' must be a command line string or a list of strings")
    if check_runner:
        _check_runner(runner)
    vectorize = d.get("vectorize_seeds", False)
    if not isinstance(vectorize, bool):
        raise SpecError("'vectorize_seeds' must be true or false")
    if vectorize and "seed" not in grid:
        raise SpecError("'vectorize_seeds' needs a 'seed' axis in 'grid'")
    spec = SweepSpec(config=config, args=list(args), grid={k: list(v) for k, v in grid.items()},
                     set=dict(fixed), exclude=[dict(e) for e in exclude], root=root, runner=list(runner),
                     vectorize_seeds=vectorize)
    expand(spec)  # name clashes and excludes that match nothing are spec errors too
    return spec


def load_spec(path: str) -> SweepSpec:
    try:
        with open(path) as f:
            d = json.load(f)
    except OSError as e:
        raise SpecError(f"cannot read spec {path}: {e.strerror}") from None
    except ValueError as e:
        raise SpecError(f"spec {path} is not valid JSON: {e}") from None
    return spec_from_dict(d)


def spec_from_flags(config: str, args: Sequence[str] = (), grid: Sequence[str] = (), set: Sequence[str] = (),
                    exclude: Sequence[str] = (), root: str | None = None,
                    runner: str | Sequence[str] | None = None, vectorize_seeds: bool = False) -> SweepSpec:
    """The spec given by command-line flags (one `--arg` per ARG: ARGs may contain commas)."""
    d: dict[str, Any] = {"config": config}
    if args:
        d["args"] = list(args)
    grid_d: dict[str, list[Any]] = {}
    for text in grid:
        key, values = parse_grid_flag(text)
        if key in grid_d:
            raise SpecError(f"--grid {key} given twice; list all its values in one flag")
        grid_d[key] = values
    d["grid"] = grid_d
    d["set"] = dict(parse_set_flag(t) for t in set)
    d["exclude"] = [parse_exclude_flag(t) for t in exclude]
    if root is not None:
        d["root"] = root
    if runner is not None:
        d["runner"] = runner
    d["vectorize_seeds"] = vectorize_seeds
    return spec_from_dict(d)


def _matches(entry: Mapping[str, Any], arg: str | None, params: Mapping[str, Any]) -> bool:
    point = {**params, "arg": arg}
    return all(_canonical(point.get(k)) == _canonical(v) for k, v in entry.items())


def _command(spec: SweepSpec, arg: str | None, workdir: str, params: Mapping[str, Any], *extra: str
             ) -> list[str]:
    """`RUNNER --config=FILE[:ARG] --workdir=DIR [EXTRA...] --config.k=v ...` (`set`, then `params`)."""
    config = spec.config + (f":{arg}" if arg is not None else "")
    command = [*spec.runner, f"--config={config}", f"--workdir={workdir}", *extra]
    return command + [f"--config.{k}={format_cli_value(v)}" for k, v in {**spec.set, **params}.items()]


def expand(spec: SweepSpec) -> list[Run]:
    """Every grid point (args outermost, then the grid axes in spec order), less the excluded."""
    runs, used = [], [False] * len(spec.exclude)
    keys = list(spec.grid)
    for arg in spec.args or [None]:
        for values in itertools.product(*(spec.grid[k] for k in keys)):
            params = dict(zip(keys, values))
            hits = [_matches(e, arg, params) for e in spec.exclude]
            used = [u or h for u, h in zip(used, hits)]
            if any(hits):
                continue
            name = run_name(params)
            if arg is not None:
                name = os.path.join(arg if _SAFE_ARG.fullmatch(arg) else format_name_value(arg), name)
            workdir = os.path.join(spec.root, name)
            runs.append(Run(arg, params, name, workdir, _command(spec, arg, workdir, params)))
    for entry, u in zip(spec.exclude, used):
        if not u:
            raise SpecError(f"exclude entry {entry} matches no run (a value misspelled?)")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SpecError(f"two grid points share the run name {dup!r} (values that print alike, e.g. 1 "
                        "and \"1\"); make them distinct")
    if not runs:
        raise SpecError("the exclude entries remove every run")
    return runs
