"""Values and flags: config values parsed from `--grid` / `--set` / `--exclude` flags and JSON, written
back as `--config.KEY=` values and run-directory names; `SpecError`, the one-line error of a bad spec."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_SAFE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
_MAX_NAME = 200


class SpecError(ValueError):
    """An invalid sweep spec; the message is one line naming the problem."""


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
