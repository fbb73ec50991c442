"""The CLIs' shared pieces: where the persistent compilation cache lives, and turning it off."""

import os

import jax

from fedmoe_jax.cli_common import default_compilation_cache, use_compilation_cache


def test_compilation_cache_location_by_precedence(monkeypatch, tmp_path):
    for var in ("FEDMOE_JAX_CACHE", "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_compilation_cache() == os.path.join(str(tmp_path), ".cache", "fedmoe_jax", "xla")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert default_compilation_cache() == "/xdg/fedmoe_jax/xla"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/jax")
    assert default_compilation_cache() == "/jax"
    monkeypatch.setenv("FEDMOE_JAX_CACHE", "/ours")
    assert default_compilation_cache() == "/ours"


def test_use_compilation_cache_on_and_off(tmp_path):
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
    try:
        use_compilation_cache(str(tmp_path))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path)
        assert jax.config.jax_enable_compilation_cache
        use_compilation_cache("")
        assert jax.config.jax_compilation_cache_dir is None and not jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_enable_compilation_cache", before[1])


def test_a_full_disk_is_one_line_and_exit_4(capsys):
    import errno

    import pytest

    from fedmoe_jax.cli_common import DISK_FULL_EXIT, exit_if_disk_full

    exit_if_disk_full(ValueError("not about disks"))  # returns: the caller re-raises
    error = OSError(errno.ENOSPC, "No space left on device")
    error.filename = "runs/x/metrics.jsonl"
    with pytest.raises(SystemExit) as done:
        exit_if_disk_full(error)
    assert done.value.code == DISK_FULL_EXIT == 4
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: the disk is full (No space left on device) while writing "
                           "runs/x/metrics.jsonl")


def test_tool_command_parses_absl_flags_privately(capsys):
    import pytest
    from absl import flags

    from fedmoe_jax.cli_common import tool_command

    def define(fv):
        flags.DEFINE_string("data_dir", None, "Where.", flag_values=fv)
        flags.DEFINE_integer("vocab_size", 8, "Pieces.", flag_values=fv)

    command, fv = tool_command(["build", "--data_dir=/x", "--vocab_size", "12"], "tool", ["build"], define,
                               "")
    assert (command, fv.data_dir, fv.vocab_size) == ("build", "/x", 12)
    _, fv = tool_command(["build", "--data-dir", "/y"], "tool", ["build"], define, "")  # older spelling
    assert fv.data_dir == "/y"
    assert "data_dir" not in flags.FLAGS  # importing or running a tool defines nothing globally
    for argv, says in ((["build", "--data_dirs=/x"], "Unknown command line flag 'data_dirs'"),
                       (["build", "--vocab_size=many"], "vocab_size"),
                       (["prepare"], "takes one command (build)"), ([], "not none")):
        with pytest.raises(SystemExit) as done:
            tool_command(argv, "tool", ["build"], define, "")
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and line.startswith("error: ") and says in line, line
    with pytest.raises(SystemExit) as done:
        tool_command(["--help"], "tool", ["build"], define, "build: makes it")
    out = capsys.readouterr().out
    assert done.value.code == 0 and "build: makes it" in out and "--data_dir" in out and "--vocab_size" in out
