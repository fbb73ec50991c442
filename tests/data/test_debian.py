"""Debian package descriptions -> TS: the long-description format, filters, splits by source package,
and the pinned-source check, on hand-written archive files."""

import lzma

import pytest

from fedmoe_jax.data import debian

TRANSLATION = """Package: alpha
Description-md5: 1
Description-en: Alpha tool for counting sheep
 Alpha counts sheep in a field and reports the number of sheep it
 has seen, one line per sheep.
 .
 It also counts goats:
   goats, verbatim line
 and stops there.

Package: alpha-doc
Description-md5: 2
Description-en: documentation for alpha
 Alpha counts sheep in a field and reports the number of sheep it
 has seen, one line per sheep.
 .
 This package holds the manual of alpha with examples and a tutorial for new users.

Package: beta
Description-md5: 3
Description-en: Beta
 Beta has a one-word synopsis, so it is left out however long its long description is, as here.

Package: gamma
Description-md5: 4
Description-en: Gamma short
 Too short to summarise.

Package: delta
Description-md5: 5
Description-en: Delta shares its text with alpha
 Alpha counts sheep in a field and reports the number of sheep it
 has seen, one line per sheep.
 .
 It also counts goats:
   goats, verbatim line
 and stops there.

Package: orphan
Description-md5: 6
Description-en: Orphan package without a Packages entry
 Orphan is described here but absent from the Packages file, so it keeps its own name as source.
"""
PACKAGES = """Package: alpha
Version: 1
Section: utils

Package: alpha-doc
Source: alpha (1)
Section: doc

Package: beta
Section: games

Package: gamma
Section: games

Package: delta
Section: contrib/utils
"""


def write_xz(path, text):
    with lzma.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path


@pytest.fixture
def sources(tmp_path):
    return (write_xz(tmp_path / "Translation-en.xz", TRANSLATION),
            write_xz(tmp_path / "Packages.xz", PACKAGES))


def test_long_description_text_by_hand():
    lines = [" first line", " second line", " .", "   verbatim  kept", " last"]
    assert debian.long_description_text(lines) == "first line second line verbatim kept last"


def test_read_descriptions_joins_source_and_section(sources):
    got = {d.package: d for d in debian.read_descriptions(*sources)}
    assert list(got) == sorted(got)  # sorted by package
    assert (got["alpha-doc"].source, got["alpha-doc"].section) == ("alpha", "doc")
    assert (got["delta"].source, got["delta"].section) == ("delta", "utils")  # area "contrib/" dropped
    assert (got["orphan"].source, got["orphan"].section) == ("orphan", "unknown")
    assert got["alpha"].synopsis == "Alpha tool for counting sheep"
    assert got["alpha"].text.endswith("It also counts goats: goats, verbatim line and stops there.")


def test_ts_examples_filter_dedupe_split_and_label(sources):
    examples, names = debian.build_ts_examples(debian.read_descriptions(*sources))
    rows = {r["id"]: r for split in examples.values() for r in split}
    # beta: one-word synopsis; gamma: 3 words of long description; delta: alpha's text (alpha wins)
    assert sorted(rows) == ["alpha", "alpha-doc", "orphan"]
    assert names == ["doc", "unknown", "utils"]
    assert rows["alpha"]["label"] == 2 and rows["alpha-doc"]["label"] == 0
    assert rows["alpha"]["input"].startswith("summarize: Alpha counts sheep")
    assert rows["alpha"]["target"] == "Alpha tool for counting sheep"
    split = {r["id"]: s for s, recs in examples.items() for r in recs}
    assert split["alpha"] == split["alpha-doc"] == debian.split_of("alpha")  # one source, one split
    long = debian.Description("long", "long", "utils", "a synopsis", " ".join(["w"] * 300))
    (row,) = [r for recs in debian.build_ts_examples([long])[0].values() for r in recs]
    assert len(row["input"].split()) == 1 + debian.MAX_INPUT_WORDS  # "summarize:" + the first words


def test_split_of_is_80_10_10():
    counts = {s: 0 for s in ("train", "validation", "test")}
    for i in range(20_000):
        counts[debian.split_of(f"pkg{i}")] += 1
    assert abs(counts["train"] / 20_000 - 0.8) < 0.01 and abs(counts["test"] / 20_000 - 0.1) < 0.01


def test_fetch_sources_downloads_and_checks_the_pins(tmp_path, monkeypatch, sources):
    mirror = tmp_path / "mirror"
    for name, (path, _, _) in debian.SOURCES.items():
        (mirror / path).parent.mkdir(parents=True, exist_ok=True)
        (mirror / path).write_bytes((tmp_path / name).read_bytes())
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match="--allow_changed_sources") as e:  # not the pinned files
        debian.fetch_sources(dest, f"file://{mirror}")
    assert "\n" not in str(e.value)
    paths = debian.fetch_sources(dest, f"file://{mirror}", allow_changed=True)
    assert sorted(paths) == sorted(debian.SOURCES) and (dest / "Packages.xz").read_bytes() == (
        tmp_path / "Packages.xz").read_bytes()
    # present files are not fetched again; matching pins pass without allow_changed
    pins = {name: (p, debian.sha256_file(paths[name]), 0) for name, (p, _, _) in debian.SOURCES.items()}
    monkeypatch.setattr(debian, "SOURCES", pins)
    assert debian.fetch_sources(dest, "file:///nowhere") == paths
    with pytest.raises(ValueError, match="cannot download"):
        debian.fetch_sources(tmp_path / "empty", "file:///nowhere")
