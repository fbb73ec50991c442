"""setup.cfg declares compatible ranges, constraints.txt pins the tested set inside them: an install
into an existing research environment is not forced onto exact versions, and `make` (CI) installs
exactly what was tested."""

import configparser
import os

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requirements(section_key: str) -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    section, key = section_key.split(":")
    lines = [x.split("#")[0].strip() for x in cfg[section][key].splitlines()]
    return [Requirement(x) for x in lines if x]


def pins() -> dict[str, Version]:
    out = {}
    for line in open(os.path.join(ROOT, "constraints.txt")):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, version = line.partition("==")
        assert version, f"constraints.txt: {line!r} is not an exact pin"
        out[canonicalize_name(name)] = Version(version)
    return out


def test_ranges_are_declared_and_the_tested_pins_satisfy_them():
    pinned = pins()
    declared = (requirements("options:install_requires") + requirements("options.extras_require:test")
                + requirements("options.extras_require:dev"))
    assert len(declared) > 20
    for req in declared:
        specs = list(req.specifier)
        assert specs and all(s.operator != "==" for s in specs), f"{req}: declare a range, not one version"
        name = canonicalize_name(req.name)
        assert name in pinned, f"constraints.txt does not pin {req.name} (make lock)"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pinned[name]}, outside setup.cfg's {req.specifier}"


def test_make_installs_with_the_constraints():
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    installs = [line for line in makefile.splitlines() if "$(PIP) install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs)


def test_make_demo_reads_only_committed_results():
    """`make demo` prints the full grid's plain words from a committed report: every results/ file the
    Makefile names is in the repository (a fresh clone has no other)."""
    import re

    makefile = open(os.path.join(ROOT, "Makefile")).read()
    named = set(re.findall(r"results/[\w./-]+\.md", makefile))
    assert named and all(os.path.isfile(os.path.join(ROOT, p)) for p in named), named
