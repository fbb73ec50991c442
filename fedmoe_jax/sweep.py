"""Sweeps: a grid of CLI runs (config args x any config keys), run by parallel worker processes,
skipped when finished, resumed when not, and collected into one results table.

    spec = spec_from_dict({"config": "configs/cpu.py", "args": ["standard_hetero_t"],
                           "grid": {"method": ["fedmoe", "random_moe"], "seed": [0, 1, 2]},
                           "set": {"num_rounds": 20}, "root": "runs/sweep"})
    report = run_sweep(spec, workers=2)      # ROOT/sweep.json, ROOT/results.csv, ROOT/results.md

Each grid point is one run directory `ROOT/<arg>/<k1=v1,k2=v2,...>` (grid keys sorted; values that are
not filesystem-safe get a short hash) and one command
`RUNNER --config=FILE[:ARG] --workdir=DIR --config.k=v ...` (RUNNER defaults to
`python -m fedmoe_jax.main`). A run is finished when `DIR/summary.json` exists; otherwise the same
command is run again, which resumes it. Invalid specs raise `SpecError` (one line) before anything runs.

CPU threads: in JAX 0.10 the XLA:CPU runtime sizes its thread pool from the process's CPU affinity
mask; `--xla_cpu_multi_thread_eigen=false` and `intra_op_parallelism_threads=1` in XLA_FLAGS change
nothing (measured: same threads and CPU time). With several workers, each worker's runs are therefore
pinned to a disjoint share of the cores (`os.sched_setaffinity`), and OMP/BLAS thread counts are set
to the share size.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import datetime
import hashlib
import importlib.util
import io
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from fedmoe_jax.files import SUMMARY_FILE as SUMMARY
from fedmoe_jax.files import atomic_write

SPEC_KEYS = ("config", "args", "grid", "set", "exclude", "root", "runner", "vectorize_seeds")
DEFAULT_ROOT = "runs/sweep"
LOG = "log.txt"
SWEEP_JSON = "sweep.json"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
LOCK = ".sweep.lock"
EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 1, 2, 130
SIGNAL_EXITS = (128 + 2, 128 + 15)  # a run stopped by SIGINT / SIGTERM after checkpointing (main.py)
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_SAFE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
_SAFE_ARG = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._,+-]*")  # an ARG is a directory of its own
_MAX_NAME = 200


class SpecError(ValueError):
    """An invalid sweep spec; the message is one line naming the problem."""


def default_runner() -> tuple[str, ...]:
    return (sys.executable, "-m", "fedmoe_jax.main")


# ---------------------------------------------------------------------------------------------------
# Values and flags


PYTHON_LITERALS = {"True": True, "False": False, "None": None}  # as `--config.KEY=False` spells them


def parse_value(text: str) -> Any:
    """JSON where possible (`20`, `0.1`, `true`, `[1,2]`, `"0"`), Python's `True` / `False` / `None`,
    else the string itself."""
    if text in PYTHON_LITERALS:
        return PYTHON_LITERALS[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets and quotes: `a,[1,2],"x,y"` -> `a`, `[1,2]`, `"x,y"`."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _split_assignment(text: str, what: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise SpecError(f"{what} {text!r} is not KEY=VALUE")
    _check_key(key, what)
    return key, value


def parse_grid_flag(text: str) -> tuple[str, list[Any]]:
    """`--grid=seed=0,1,2` -> `("seed", [0, 1, 2])`; commas inside brackets or quotes do not split."""
    key, raw = _split_assignment(text, "--grid")
    if not raw.strip():
        raise SpecError(f"--grid {key}= has no values; give at least one, e.g. --grid={key}=0,1")
    return key, [parse_value(v.strip()) for v in split_top_level(raw)]


def parse_set_flag(text: str) -> tuple[str, Any]:
    """`--set=num_rounds=20` -> `("num_rounds", 20)` (the whole value is one value)."""
    key, raw = _split_assignment(text, "--set")
    return key, parse_value(raw.strip())


def parse_exclude_flag(text: str) -> dict[str, Any]:
    """`--exclude=method=local,fedprox.mu=0.1` -> `{"method": "local", "fedprox.mu": 0.1}`."""
    return dict(parse_set_flag(item) for item in split_top_level(text))


def format_cli_value(value: Any) -> str:
    """A value as ml_collections' `--config.KEY=` parsers read it (lists become tuple literals)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) or value is None:
        return repr(value)
    return repr(_to_python(value))


def _to_python(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_to_python(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    return value


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def format_name_value(value: Any) -> str:
    """A value in a run directory name: as on the command line when filesystem-safe, else a
    sanitised form plus a short hash of its JSON (so distinct values never share a name)."""
    text = format_cli_value(value) if isinstance(value, str | int | float | bool) else _canonical(value)
    if _SAFE.fullmatch(text):
        return text
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._")[:40] + "~" + _hash(_canonical(value))


def run_name(params: Mapping[str, Any]) -> str:
    """`k1=v1,k2=v2` over the grid keys, sorted (so reordering the spec does not rename runs)."""
    name = ",".join(f"{k}={format_name_value(params[k])}" for k in sorted(params)) or "default"
    if len(name) > _MAX_NAME:
        name = name[:_MAX_NAME - 8] + "~" + _hash(name)
    return name


def _check_key(key: str, what: str) -> None:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise SpecError(f"{what}: {key!r} is not a config key like 'seed' or 'fedprox.mu'")


# ---------------------------------------------------------------------------------------------------
# The spec


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


# ---------------------------------------------------------------------------------------------------
# Checking the config overrides before launching anything


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
    """`fedmoe_jax.config.validate` when it exists (the real CLI's own check), else None."""
    try:
        from fedmoe_jax.config import validate
    except ImportError:
        return None
    return validate


# ---------------------------------------------------------------------------------------------------
# Running


def core_shares(workers: int, cores: Sequence[int] | None = None) -> list[list[int]] | None:
    """Disjoint, near-equal core sets per worker slot (one shared core each when workers > cores);
    None when there is nothing to split (one worker, or no CPU affinity on this OS)."""
    if cores is None:
        if not hasattr(os, "sched_getaffinity"):
            return None
        cores = sorted(os.sched_getaffinity(0))
    if workers <= 1 or not cores:
        return None
    c = len(cores)
    if workers > c:
        return [[cores[i % c]] for i in range(workers)]
    return [list(cores[i * c // workers:(i + 1) * c // workers]) for i in range(workers)]


@contextlib.contextmanager
def _pinned(cores: Sequence[int] | None) -> Iterator[None]:
    """Pin the calling thread while a child is spawned: the child inherits the mask, no race."""
    if not cores:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def child_env(workers: int, share: Sequence[int] | None, base: Mapping[str, str] | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    if workers > 1:
        threads = len(share) if share else max(1, (os.cpu_count() or 1) // workers)
        for var in THREAD_ENV:
            env.setdefault(var, str(threads))
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # GPUs: do not grab 75 % each
    return env


def last_line(path: str, offset: int = 0) -> str:
    """The last non-empty line written after `offset` (tqdm's carriage returns split lines too)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    return lines[-1][:500] if lines else ""


@dataclasses.dataclass
class _Active:
    job: Job
    proc: subprocess.Popen
    log: io.BufferedWriter
    offset: int
    start: float


@dataclasses.dataclass
class SweepReport:
    records: list[dict]
    exit_code: int
    interrupted: bool = False

    def counts(self) -> dict[str, int]:
        return _counts(self.records)


def _counts(records: Sequence[dict]) -> dict[str, int]:
    out = {"total": len(records)}
    for status in ("done", "skipped", "failed", "interrupted", "pending"):
        out[status] = sum(r["status"] == status for r in records)
    return out


def _record(run: Run, status: str = "pending") -> dict:
    return {"name": run.name, "arg": run.arg, "params": run.params, "command": run.command,
            "status": status, "returncode": None, "error": "", "seconds": None}


def write_sweep_json(spec: SweepSpec, records: Sequence[dict]) -> None:
    doc = {"spec": spec.to_dict(), "updated": datetime.datetime.now().isoformat(timespec="seconds"),
           "counts": _counts(records), "runs": list(records)}
    atomic_write(os.path.join(spec.root, SWEEP_JSON), json.dumps(doc, indent=1) + "\n")


def read_sweep_json(root: str) -> dict | None:
    try:
        with open(os.path.join(root, SWEEP_JSON)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _lock(root: str) -> Iterator[None]:
    """One sweep at a time per root (two would run the same directories); a stale lock is taken."""
    path = os.path.join(root, LOCK)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
                os.kill(pid, 0)
            except (OSError, ValueError):
                with contextlib.suppress(OSError):
                    os.remove(path)
                continue
            raise SpecError(f"another sweep (pid {pid}) is running on {root}; wait for it, or remove {path} "
                            "if that process is not a sweep") from None
    else:
        raise SpecError(f"cannot take the lock {path}")
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


def _stop(active: Sequence[_Active], grace: float) -> None:
    """SIGTERM each run's process group, SIGKILL what is left after `grace` seconds."""
    def signal_all(sig):
        for a in active:
            if a.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(a.proc.pid, sig)

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        for a in active:
            with contextlib.suppress(subprocess.TimeoutExpired):
                a.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        pass
    signal_all(signal.SIGKILL)
    for a in active:
        a.proc.wait()
        a.log.close()


def run_sweep(spec: SweepSpec, workers: int = 1, *, rerun: bool = False, pin_cpus: bool = True,
              progress: bool = True, grace: float = 10.0, poll: float = 0.1,
              validator: Callable[[Any], None] | None = None, validate: bool = True) -> SweepReport:
    """Run every grid point not finished yet, `workers` at a time; write sweep.json and the tables.

    Finished runs (summary.json present) are skipped unless `rerun`; the others are (re)started with
    the same command, which resumes them. A failed run is recorded (exit code, last log line) and the
    others go on. Ctrl-C (KeyboardInterrupt) terminates the running children and returns with
    `interrupted=True`. Exit code: 0 all finished, 1 some failed, 130 interrupted."""
    from tqdm import tqdm

    if workers < 1:
        raise SpecError(f"workers must be >= 1, got {workers}")
    runs = expand(spec)
    if validate:
        check_configs(spec, runs, validator)
    os.makedirs(spec.root, exist_ok=True)
    shares = core_shares(workers) if pin_cpus else None
    records = {r.name: _record(r) for r in runs}
    previous = {r["name"]: r for r in (read_sweep_json(spec.root) or {}).get("runs", [])}
    changed = 0
    queue: deque[Job] = deque()
    active: dict[int, _Active] = {}
    interrupted = False
    with _lock(spec.root), tqdm(total=len(runs), unit="run", desc="sweep", disable=not progress,
                                dynamic_ncols=True) as bar:

        def show():
            c = _counts(list(records.values()))
            bar.set_postfix({"done": c["done"], "skipped": c["skipped"], "failed": c["failed"],
                             "running": len(active)})

        for run in runs:
            if run.finished() and not rerun:
                records[run.name]["status"] = "skipped"
                old = previous.get(run.name)
                changed += bool(old and old.get("command") and old["command"] != run.command)
                bar.update(1)
        queue.extend(jobs(spec, [r for r in runs if records[r.name]["status"] == "pending"]))
        if changed:
            tqdm.write(f"sweep: {changed} finished run(s) were made by a different command (changed 'set' or "
                       "runner?); skipped anyway: pass --rerun to run them again", file=sys.stderr)
        show()
        write_sweep_json(spec, list(records.values()))
        try:
            while queue or active:
                for slot in range(workers):
                    if slot in active or not queue:
                        continue
                    job = queue.popleft()
                    share = shares[slot] if shares else None
                    stamp = datetime.datetime.now().isoformat(timespec="seconds")
                    for run in job.runs[1:]:
                        os.makedirs(run.workdir, exist_ok=True)
                        with open(os.path.join(run.workdir, LOG), "ab") as other:
                            other.write(f"=== sweep {stamp}: seeds vectorized; output in "
                                        f"{os.path.join(job.log_dir, LOG)}\n".encode())
                    os.makedirs(job.log_dir, exist_ok=True)
                    log = open(os.path.join(job.log_dir, LOG), "ab")  # closed when the job ends or is stopped
                    log.write(f"=== sweep {stamp}: {shlex.join(job.command)}\n".encode())
                    log.flush()
                    offset = log.tell()
                    with _pinned(share):
                        proc = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=child_env(workers, share),
                                                start_new_session=True)
                    active[slot] = _Active(job, proc, log, offset, time.monotonic())
                    for run in job.runs:
                        records[run.name]["status"] = "running"
                        if len(job.runs) > 1:
                            records[run.name]["command"] = job.command
                    show()
                time.sleep(poll)
                for slot, a in list(active.items()):
                    rc = a.proc.poll()
                    if rc is None:
                        continue
                    del active[slot]
                    a.log.close()
                    for run in a.job.runs:
                        rec = records[run.name]
                        rec.update(returncode=rc, seconds=round(time.monotonic() - a.start, 2))
                        if rc == 0 and run.finished():
                            rec.update(status="done", error="")
                        else:
                            reason = last_line(os.path.join(a.job.log_dir, LOG), a.offset) or "(no output)"
                            if rc == 0:
                                reason = f"exited 0 without writing {SUMMARY}; last line: {reason}"
                            # stopped by SIGTERM / SIGINT after a checkpoint: resumable, not failed
                            status = "interrupted" if rc in SIGNAL_EXITS else "failed"
                            rec.update(status=status, error=reason)
                            tqdm.write(f"sweep: {run.name} {status} (exit {rc}): {reason}", file=sys.stderr)
                        bar.update(1)
                    show()
                    write_sweep_json(spec, list(records.values()))
        except KeyboardInterrupt:
            interrupted = True
            tqdm.write(f"sweep: interrupted; stopping {len(active)} process(es)", file=sys.stderr)
            _stop(list(active.values()), grace)
            for a in active.values():
                for run in a.job.runs:
                    finished = a.proc.returncode == 0 and run.finished()  # ended during the grace period
                    records[run.name].update(status="done" if finished else "interrupted",
                                             returncode=a.proc.returncode,
                                             seconds=round(time.monotonic() - a.start, 2))
            active.clear()
        finally:
            for rec in records.values():
                if rec["status"] == "running":  # an unexpected error while children ran
                    rec["status"] = "interrupted"
            if active:
                _stop(list(active.values()), grace)
            write_sweep_json(spec, list(records.values()))
            write_tables(spec, collect(spec, runs, list(records.values())))
    recs = list(records.values())
    failed = any(r["status"] == "failed" for r in recs)
    code = EXIT_INTERRUPTED if interrupted else EXIT_FAILED if failed else 0
    return SweepReport(recs, code, interrupted)


# ---------------------------------------------------------------------------------------------------
# Collecting results

SCORE_COLUMNS = (("tc_acc", "tc_accuracy"), ("rc_f1", "rc_f1"), ("ts_rouge2", "ts_rouge2"))
NUMBER_COLUMNS = ("comm_gib", "peak_mem_gb_mean", "peak_mem_gb_max", "experts_end_mean", "wall_s")


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d if isinstance(d, int | float) and not isinstance(d, bool) else None


def _read_summary(run: Run) -> dict | None:
    try:
        with open(os.path.join(run.workdir, SUMMARY)) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def collect(spec: SweepSpec, runs: Sequence[Run] | None = None,
            records: Sequence[dict] | None = None) -> list[dict]:
    """One row per run: arg, setting, the grid values, test scores in percent, cost numbers, status.

    Status is `done` when summary.json exists, else the run's record (failed / interrupted /
    pending), else `incomplete` (a directory without summary) or `pending`."""
    runs = expand(spec) if runs is None else runs
    if records is None:
        records = (read_sweep_json(spec.root) or {}).get("runs", [])
    by_name = {r["name"]: r for r in records}
    rows = []
    for run in runs:
        summary = _read_summary(run)
        rec = by_name.get(run.name, {})
        row: dict[str, Any] = {"arg": run.arg or ""}
        setting = (summary or {}).get("setting") or run.params.get("setting") or spec.set.get("setting") or ""
        row["setting"] = setting if isinstance(setting, str) else format_cli_value(setting)
        row.update({k: format_cli_value(v) for k, v in run.params.items()})
        for col, key in SCORE_COLUMNS:
            v = _get(summary, "test", key)
            row[col] = None if v is None else round(v, 6)  # summary.json scores are percent
        row["comm_gib"] = _get(summary, "comm_gib_per_transfer")
        row["peak_mem_gb_mean"] = _get(summary, "peak_memory_gb", "mean")
        row["peak_mem_gb_max"] = _get(summary, "peak_memory_gb", "max")
        row["experts_end_mean"] = _get(summary, "experts_end", "mean")
        row["wall_s"] = _get(summary, "wall_seconds")
        if summary is not None:
            status = "done"
        elif os.path.isfile(os.path.join(run.workdir, SUMMARY)):
            status = "bad summary"
        elif rec.get("status") in ("failed", "interrupted"):
            status = rec["status"]
        else:
            status = "incomplete" if os.path.isdir(run.workdir) else "pending"
        row["status"] = status
        row["error"] = rec.get("error", "") if status != "done" else ""
        row["dir"] = run.name
        rows.append(row)
    return rows


def _columns(spec: SweepSpec) -> list[str]:
    cols = ["arg"] if spec.args else []
    if "setting" not in spec.grid:
        cols.append("setting")
    cols += list(spec.grid)
    cols += [c for c, _ in SCORE_COLUMNS] + list(NUMBER_COLUMNS) + ["status"]
    return cols


def _cell(col: str, v: Any) -> str:
    if v is None:
        return ""
    if not isinstance(v, float):
        return str(v)
    fmt = {"comm_gib": ".4g", "peak_mem_gb_mean": ".3g", "peak_mem_gb_max": ".3g", "experts_end_mean": ".1f",
           "wall_s": ".0f"}.get(col, ".2f")
    return format(v, fmt)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return lines


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def write_tables(spec: SweepSpec, rows: Sequence[dict]) -> tuple[str, str]:
    """ROOT/results.csv (full precision, plus each run's dir and error) and ROOT/results.md (rounded;
    with a mean ± std over seeds table when `seed` is a grid axis)."""
    cols = _columns(spec)
    csv_path, md_path = os.path.join(spec.root, RESULTS_CSV), os.path.join(spec.root, RESULTS_MD)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols + ["dir", "error"])
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row[c] for c in cols + ["dir", "error"]])
    atomic_write(csv_path, buf.getvalue())

    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    lines = [f"# Sweep results: {spec.root}", "",
             f"`{spec.config}`; {len(rows)} run(s): " + ", ".join(f"{n} {s}" for s, n in counts.items())
             + ". Scores: test, percent (TC accuracy, RC F1, TS ROUGE-2).", ""]
    # The setting column says nothing new when the config ARG is the setting (configs/cpu.py:SETTING).
    md_cols = [c for c in cols if c != "setting" or "setting" in spec.grid
               or any(r["setting"] not in ("", r["arg"]) for r in rows)]
    lines += _md_table(md_cols, [[_cell(c, row.get(c)) for c in md_cols] for row in rows])
    if "seed" in spec.grid:
        group_cols = [c for c in md_cols[:md_cols.index("tc_acc")]
                      if c != "seed" and (c != "setting" or "setting" in spec.grid)]
        groups: dict[tuple, list[dict]] = {}
        for row in rows:
            groups.setdefault(tuple(row.get(c) for c in group_cols), []).append(row)
        agg = []
        for key, members in groups.items():
            done = [m for m in members if m["status"] == "done"]
            cells = [_mean_std([m[c] for m in done if m[c] is not None]) for c, _ in SCORE_COLUMNS]
            agg.append([*map(str, key), f"{len(done)}/{len(members)}", *cells])
        lines += ["", "## Mean ± std over seeds (finished runs)", ""]
        lines += _md_table([*group_cols, "seeds", *(c for c, _ in SCORE_COLUMNS)], agg)
    failed = [r for r in rows if r["status"] not in ("done", "pending")]
    if failed:
        lines += ["", "## Not finished", ""] + [f"- `{r['dir']}`: {r['status']}"
                                                 + (f": {r['error']}" if r["error"] else "") for r in failed]
    atomic_write(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


def spec_for_collect(root: str) -> SweepSpec:
    """The spec a previous sweep recorded in ROOT/sweep.json (for `--collect-only --root=ROOT`)."""
    doc = read_sweep_json(root)
    if not doc or "spec" not in doc:
        raise SpecError(f"{os.path.join(root, SWEEP_JSON)} not found or unreadable; give the sweep's spec")
    d = dict(doc["spec"])
    d["root"] = root
    return spec_from_dict(d, check_runner=False)


__all__ = [
    "Job", "SpecError", "SweepReport", "SweepSpec", "Run", "apply_overrides", "check_configs", "collect",
    "core_shares", "default_runner", "expand", "fedmoe_validator", "format_cli_value", "jobs", "load_config",
    "load_spec", "parse_value", "run_name", "run_sweep", "spec_for_collect", "spec_from_dict",
    "spec_from_flags", "write_tables",
]
