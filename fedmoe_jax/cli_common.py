"""What the command lines (`fedmoe_jax.main`, `fedmoe_jax.pretrain`, `experiments/*.py`) share: bad input
(a flag, a config file, a --config.KEY=VALUE override) becomes one line on stderr and exit status 2,
never a usage dump."""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

USAGE_EXIT = 2
DISK_FULL_EXIT = 4


def fail(message: str) -> None:
    """One line on stderr, exit status 2."""
    message = re.sub(r"^[\w.]*ConfigError: ", "", message.strip())
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)


def exit_if_disk_full(error: BaseException) -> None:
    """When `error` says the disk is full (`files.is_disk_full`): one line on stderr (what was being
    written; free space and rerun), exit status 4. Otherwise return, for the caller to re-raise."""
    from fedmoe_jax.files import DiskFull, is_disk_full

    if not is_disk_full(error):
        return
    if not isinstance(error, DiskFull):
        error = DiskFull(getattr(error, "filename", None) or "the run's files", error)
    print(f"error: {error}", file=sys.stderr, flush=True)
    # writes still in flight in orbax's threads go on failing as the process ends, each printing a
    # traceback straight to the stderr descriptor: the line above has said it all
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # a stderr without a descriptor (captured): nothing to do
        pass
    sys.exit(DISK_FULL_EXIT)


def _unknown_key(e: BaseException, argv: list[str]) -> tuple[str, str | None]:
    """The dotted key of the --config.KEY=V override that named a missing key (`e`: its KeyError),
    and ml_collections' suggestion for it (dotted the same way) when it made one."""
    while isinstance(e, AttributeError | KeyError) and e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]  # ml_collections wraps the KeyError in an AttributeError
    text = str(e.args[0] if e.args else e)
    quoted = re.search(r"'([^']+)'", text)
    name = quoted.group(1) if quoted else text.strip()
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    key = next((k for k in overrides if k.rsplit(".", 1)[-1] == name), name)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    return key, (key[:len(key) - len(name)] + hint.group(1)) if hint else None


def config_problem(e: BaseException, argv: Sequence[str] = (), *, schema: str, example: str) -> str:
    """One line for a config file that failed to load or an override that failed to apply.

    `schema`: where the config's fields are listed (named for an unknown key); `example`: a config
    file to suggest when the --config file could not be loaded."""
    from fedmoe_jax.errors import ConfigError

    while e.__cause__ is not None and not isinstance(e, ConfigError):
        e = e.__cause__
    text = str(e).strip()
    if isinstance(e, ConfigError):
        return text
    if isinstance(e, AttributeError | KeyError):
        key, suggestion = _unknown_key(e, list(argv))
        if key in flags.FLAGS and key != "config":
            return f"unknown config key {key!r}: --{key} is an option of this command, not a config key"
        meant = f" (did you mean {suggestion!r}?)" if suggestion else ""
        return f"unknown config key {key!r}{meant}: check the --config.KEY=VALUE overrides against {schema}"
    if isinstance(e, OSError):
        reason = next((ln.strip() for ln in text.splitlines() if "Errno" in ln), text.splitlines()[0])
        return f"the --config file could not be loaded ({reason}); pass e.g. --config={example}"
    return f"the --config could not be loaded: {type(e).__name__}: {text.splitlines()[0] if text else ''}"


def loaded_config(holder: Any, argv: list[str], key: str, schema: str, example: str, workdir: str | None,
                  workdir_help: str) -> Any:
    """The `--config` of a command (`holder`: its `DEFINE_config_file` result) after the checks every
    command makes: no stray positional arguments, a config file that loads (`key`: a field to read
    from it), `--config` and `--workdir` given. Each failure is `fail` with one line. Also quiets
    the INFO chatter of absl and jax."""
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; pass options as --flag=value")
    try:
        config = holder.value
        if config is not None:
            config.get(key)  # a config file that failed to load raises here
    except Exception as e:  # noqa: BLE001
        fail(config_problem(e, sys.argv, schema=schema, example=example))
    if config is None:
        fail(f"--config is required, e.g. --config={example}")
    if not workdir:
        fail(f"--workdir is required ({workdir_help})")
    quiet_logs()
    return config


def quiet_logs() -> None:
    """Keep fedmoe_jax's INFO lines, drop the INFO chatter of absl and jax (orbax, rouge-score, backend
    probing) that absl's default verbosity shows."""
    logging.getLogger("fedmoe_jax").setLevel(logging.INFO)
    for noisy in ("absl", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def flags_parser(schema: str | None = None, example: str | None = None) -> Callable[[list[str]], list[str]]:
    """An absl `flags_parser` (for `app.run`) that answers bad flags and configs with `fail`; `schema` and
    `example` as in `config_problem`, for a command line with a --config (without: the error's own line)."""
    if schema is None:  # no --config: a failure is the exception's own first line
        problem = lambda e, argv: f"{type(e).__name__}: {(str(e).strip() or '?').splitlines()[0]}"
    else:
        problem = functools.partial(config_problem, schema=schema, example=example)

    def parse_flags(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            cause = e.__cause__ or e.__context__
            config_failed = isinstance(cause, AttributeError | KeyError | OSError | ValueError)
            if schema is not None and config_failed and "flag --" not in str(e):
                fail(problem(cause, argv))
            fail(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        except Exception as e:  # noqa: BLE001 - a config file that fails to load is bad input
            fail(problem(e, argv))
        return argv

    return parse_flags


__all__ = ["DISK_FULL_EXIT", "USAGE_EXIT", "config_problem", "exit_if_disk_full", "fail",
           "flags_parser", "loaded_config", "quiet_logs", "tool_command"]


def run_tool(argv: list[str], fn: Callable[[], Any], errors: tuple[type[BaseException], ...]) -> None:
    """The `main` of a tool script (absl): stray positional arguments are refused, logs quieted, `fn()`
    run; an exception of `errors` (bad input) becomes one line on stderr and exit status 2."""
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; pass options as --flag=value")
    quiet_logs()
    try:
        fn()
    except errors as e:
        fail(str(e))


def tool_command(argv: Sequence[str] | None, prog: str, commands: Sequence[str],
                 define: Callable[[flags.FlagValues], None], about: str) -> tuple[str, flags.FlagValues]:
    """`(command, flags)` of a data tool run as `python -m PROG COMMAND --flag=value ...`, in the absl
    flag style of the other command lines. The flags live in a private `FlagValues` (`define` adds
    them), so importing the tool's module defines nothing globally; `--help` lists them; a hyphen in a
    flag's name reads as an underscore (`--data-dir` is `--data_dir`). A bad flag or
    command: one line, exit status 2 (`fail`). `argv`: the arguments after the program (None: the
    process's)."""
    fv = flags.FlagValues()
    define(fv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv):
        print(f"usage: python -m {prog} {{{','.join(commands)}}} [--flag=value ...]\n\n{about}\n\n"
              f"flags:\n{fv.get_help()}")
        sys.exit(0)
    # --data-dir is read as --data_dir: commands written before the tools took absl flags keep working
    argv = [re.sub(r"^--([\w-]+)", lambda m: "--" + m.group(1).replace("-", "_"), a) for a in argv]
    try:
        rest = fv([prog, *argv])[1:]
    except flags.Error as e:
        fail(f"{e}; see python -m {prog} --help")
    if len(rest) != 1 or rest[0] not in commands:
        fail(f"python -m {prog} takes one command ({', '.join(commands)}) and --flag=value options, "
             f"not {' '.join(rest) or 'none'}")
    return rest[0], fv


def default_compilation_cache() -> str:
    """Where the CLIs keep JAX's persistent compilation cache unless told otherwise: `$FEDMOE_JAX_CACHE`,
    else JAX's own `$JAX_COMPILATION_CACHE_DIR`, else `$XDG_CACHE_HOME/fedmoe_jax/xla` (`~/.cache/...`).
    A later launch of the same shapes, flags and JAX version loads its programs instead of compiling."""
    for var in ("FEDMOE_JAX_CACHE", "JAX_COMPILATION_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "fedmoe_jax", "xla")


def use_compilation_cache(path: str) -> None:
    """Turn on JAX's persistent compilation cache in `path` ('' = off: nothing is read or written)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", path or None)
    jax.config.update("jax_enable_compilation_cache", bool(path))

