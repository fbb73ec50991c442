"""The package's layers: nothing imports upward (lazy imports inside functions included).

models < checkpoints, data < federated (the engine) < algorithms < pretrain < experiment < tools < main;
`errors`, `files` and `cli_common` are shared helpers below everything.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fedmoe_jax"
LAYERS = {
    "errors": 0, "files": 0, "cli_common": 0,
    "models": 1,
    "checkpoints": 2, "data": 2,
    "federated": 3,
    "algorithms": 4,
    "pretrain": 5,
    "experiment": 6,
    "tools": 7,
    "main": 8, "__init__": 8,
}


def layer_of(module: str) -> tuple[str, int]:
    """`fedmoe_jax.federated.loop` -> ("federated", 3)."""
    part = module.split(".")[1] if "." in module else "__init__"
    if part not in LAYERS:
        raise AssertionError(f"fedmoe_jax.{part} has no layer: add it to LAYERS in {__file__}")
    return part, LAYERS[part]


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """`(line, module)` of every `fedmoe_jax` import in the file, at any depth."""
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    package = ".".join(relative.parts[:-1] if relative.name != "__init__" else relative.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "fedmoe_jax":  # `from fedmoe_jax import x`: x is the module
                found += [(node.lineno, f"fedmoe_jax.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return [(line, m) for line, m in found if m == "fedmoe_jax" or m.startswith("fedmoe_jax.")]


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        own, own_layer = layer_of(module)
        for line, imported in imports(path):
            if imported == "fedmoe_jax":
                continue
            other, other_layer = layer_of(imported)
            if other_layer > own_layer:
                where = path.relative_to(PACKAGE.parent)
                problems.append(f"{where}:{line} ({own}) imports {imported} ({other})")
    return problems


def test_nothing_imports_upward():
    assert upward_imports() == []


def test_every_subpackage_and_module_has_a_layer():
    for path in PACKAGE.iterdir():
        if path.name.startswith((".", "__pycache__")) or (path.is_file() and path.suffix != ".py"):
            continue
        if path.is_dir() and not (path / "__init__.py").exists():
            continue  # data folders (shipped models, the embedded benchmark)
        layer_of(f"fedmoe_jax.{path.stem}")


def test_the_check_finds_an_upward_import(tmp_path, monkeypatch):
    """The walker itself: a models module importing the engine is reported, lazily or not."""
    fake = tmp_path / "fedmoe_jax"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "bad.py").write_text("def f():\n    from fedmoe_jax.federated import loop\n")
    (fake / "models" / "good.py").write_text("from fedmoe_jax.errors import ConfigError\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    problems = upward_imports()
    assert len(problems) == 1 and "models/bad.py:2" in problems[0] and "(federated)" in problems[0]
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("fedmoe_jax.unknown")
