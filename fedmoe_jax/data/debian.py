"""Debian package descriptions -> a summarisation task (TS): a package's long description -> its
one-line synopsis, labelled with the package's archive section.

Sources (Debian 12 "bookworm", `main`, from any Debian mirror; pinned by SHA-256 in `SOURCES`):
`i18n/Translation-en.xz` (Package, Description-md5, Description-en: the synopsis line and the long
description) and `binary-amd64/Packages.xz` (Package, Source, Section). A changed file on the mirror
(a point release) is refused, since it would change the benchmark, unless the caller allows it.

Each kept description becomes `{"id": package, "input": "summarize: <long description>", "target":
<synopsis>, "label": <section id>}`: the long description's paragraphs are joined into one line
(Debian policy 5.6.13: " ." separates paragraphs, lines indented further are verbatim) and cut to
`MAX_INPUT_WORDS` words. Kept: at least `MIN_LONG_WORDS` words of long description and
`MIN_SYNOPSIS_WORDS` of synopsis; one example per distinct long description (a family of packages
often shares one: the first package name wins). Splits are 80/10/10 by a SHA-256 of the *source*
package, so a family's descriptions never cross splits.

Shape of the data (2026-12-06 sources): 58,286 distinct descriptions from 33,426 source packages;
median 46 words of long description and 7 of synopsis.
"""

from __future__ import annotations

import dataclasses
import hashlib
import lzma
import os
import urllib.request
from collections.abc import Iterable, Mapping, Sequence

from fedmoe_jax.data.tasks import SPLITS, ts_prompt

DEFAULT_MIRROR = "http://deb.debian.org/debian"
# name -> (path under the mirror, SHA-256, bytes) of the files the shipped data was built from
SOURCES = {
    "Translation-en.xz": ("dists/bookworm/main/i18n/Translation-en.xz",
                          "a3d4a0bfd8e9242810b0885eda7c1a6e05dac15b333ddbaab03ba56f2dfa4bf0", 6107304),
    "Packages.xz": ("dists/bookworm/main/binary-amd64/Packages.xz",
                    "9e0b5aabb2465b3d2e7a7fe27f9913846277833f7a2826e7767acccff5b588c5", 8790396),
}
MIN_LONG_WORDS = 15
MIN_SYNOPSIS_WORDS = 2
MAX_INPUT_WORDS = 128
SPLIT_PERCENT = {"train": 80, "validation": 10, "test": 10}


@dataclasses.dataclass(frozen=True)
class Description:
    """One binary package's English description."""

    package: str
    source: str  # the source package (the binary package's own name when Packages names none)
    section: str  # archive section without its area: `games`, `libs`, ...
    synopsis: str
    text: str  # the long description, one line


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sources(folder: str | os.PathLike, mirror: str = DEFAULT_MIRROR,
                  allow_changed: bool = False) -> dict[str, str]:
    """The paths of `SOURCES` in `folder`, downloading those missing from `mirror`; each is checked
    against its pinned SHA-256 (`ValueError`, one line, on a mismatch unless `allow_changed`)."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, (path, sha256, _) in SOURCES.items():
        local = os.path.join(folder, name)
        if not os.path.exists(local):
            url = f"{mirror.rstrip('/')}/{path}"
            try:
                with urllib.request.urlopen(url, timeout=120) as response, open(local + ".part", "wb") as f:
                    f.write(response.read())
            except OSError as e:
                raise ValueError(f"cannot download {url} ({e}); put the file at {local} or pass --mirror"
                                 ) from None
            os.replace(local + ".part", local)
        actual = sha256_file(local)
        if actual != sha256 and not allow_changed:
            raise ValueError(f"{local} has SHA-256 {actual[:16]}..., not the {sha256[:16]}... the shipped "
                             "data was built from (the mirror changed it?); building from it changes the "
                             "benchmark: pass --allow_changed_sources to do so anyway")
        paths[name] = local
    return paths


def long_description_text(lines: Sequence[str]) -> str:
    """The long description's continuation lines (each starting with a space) as one line of words:
    " ." (an empty line) separates paragraphs, further-indented lines are verbatim text, kept as words."""
    words = []
    for line in lines:
        body = line[1:] if line.startswith(" ") else line
        if body.strip() == ".":
            continue
        words += body.split()
    return " ".join(words)


def _paragraphs(path: str | os.PathLike) -> Iterable[Mapping[str, str]]:
    from debian.deb822 import Deb822  # python-debian: the archive's own control-file format

    opener = lzma.open if os.fspath(path).endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from Deb822.iter_paragraphs(f, use_apt_pkg=False)


def read_descriptions(translation: str | os.PathLike, packages: str | os.PathLike) -> list[Description]:
    """Every package of `translation` with its source and section from `packages` (a package absent
    there keeps its own name as source and section `unknown`), sorted by package name."""
    meta = {}
    for p in _paragraphs(packages):
        if "Package" in p:
            meta[p["Package"]] = (p.get("Source", p["Package"]).split()[0], p.get("Section", "unknown"))
    out = []
    for p in _paragraphs(translation):
        if "Package" not in p or "Description-en" not in p:
            continue
        synopsis, *rest = p["Description-en"].split("\n")
        source, section = meta.get(p["Package"], (p["Package"], "unknown"))
        out.append(Description(p["Package"], source, section.split("/")[-1], " ".join(synopsis.split()),
                               long_description_text(rest)))
    return sorted(out, key=lambda d: d.package)


def split_of(source: str) -> str:
    """train / validation / test by a SHA-256 of the source package's name (80/10/10)."""
    bucket = int(hashlib.sha256(f"debian-source:{source}".encode()).hexdigest(), 16) % 100
    lo = 0
    for split in SPLITS:
        lo += SPLIT_PERCENT[split]
        if bucket < lo:
            return split
    raise AssertionError("split percentages must add up to 100")


def build_ts_examples(descriptions: Iterable[Description]) -> tuple[dict[str, list[dict]], list[str]]:
    """`({split: records sorted by id}, label_names)`: the kept descriptions as TS examples, labelled
    with their section's index in the sorted `label_names`."""
    seen, kept = set(), []
    for d in sorted(descriptions, key=lambda d: d.package):
        words = d.text.split()
        if len(words) < MIN_LONG_WORDS or len(d.synopsis.split()) < MIN_SYNOPSIS_WORDS or d.text in seen:
            continue
        seen.add(d.text)
        kept.append((d, " ".join(words[:MAX_INPUT_WORDS])))
    names = sorted({d.section for d, _ in kept})
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for d, text in kept:
        out[split_of(d.source)].append({"id": d.package, "input": ts_prompt(text), "target": d.synopsis,
                                        "label": names.index(d.section)})
    return out, names
