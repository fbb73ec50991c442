"""The error every layer raises for bad input, so the CLI can answer it with one line and exit 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """Invalid experiment input; the message is one line naming the problem and the fix."""


__all__ = ["ConfigError"]
