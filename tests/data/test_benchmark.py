"""The CPU-scale benchmark builder (WordNet TC / RC with coarse classes, Debian TS): deterministic, read
by the embedded loader, and the shipped copy pinned to its sources."""

import filecmp
import os
import pathlib

import numpy as np
from test_debian import PACKAGES, TRANSLATION, write_xz
from test_wordnet import _write_wordnet

import fedmoe_jax.data
from fedmoe_jax.data import benchmark, debian, load_embedded_benchmark, wordnet
from fedmoe_jax.data.embedded import load_manifest

SHIPPED = pathlib.Path(fedmoe_jax.data.__file__).parent / "benchmark"


def test_coarse_classes_cover_every_lexicographer_category():
    assert set(benchmark.COARSE_CLASSES) == set(wordnet.LEXNAMES)
    assert len(benchmark.COARSE_NAMES) == 10 and "person" in benchmark.COARSE_NAMES


def test_build_is_deterministic_and_loads(tmp_path):
    src = _write_wordnet(tmp_path / "wordnet", extra=60)
    deb = tmp_path / "debian"
    deb.mkdir()
    write_xz(deb / "Translation-en.xz", TRANSLATION)
    write_xz(deb / "Packages.xz", PACKAGES)
    args = dict(license_file=src / "copyright", vocab_size=150, allow_changed_sources=True)
    manifest = benchmark.build(src, deb, tmp_path / "a", **args)
    code = benchmark.main(["build", "--wordnet_dir", str(src), "--debian_dir", str(deb), "--out",
                           str(tmp_path / "b"), "--license_file", str(src / "copyright"),
                           "--vocab_size", "150", "--allow_changed_sources"])
    assert code == 0
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted([*manifest["files"], "manifest.json"]) and "DEBIAN_NOTICE" in names
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", names, shallow=False)
    assert mismatch == errors == []
    data = load_embedded_benchmark(data_dir=tmp_path / "a")
    train = data["tc"]["train"]
    assert set(train.targets) <= set(benchmark.COARSE_NAMES) and train.label_names == benchmark.COARSE_NAMES
    assert all(train.label_names[label] == t for label, t in zip(train.labels, train.targets))
    ts = [r for split in data["ts"].values() for r in split.targets]
    assert sorted(ts) == ["Alpha tool for counting sheep", "Orphan package without a Packages entry",
                          "documentation for alpha"]
    assert data["ts"]["train"].label_names == ("doc", "unknown", "utils")
    assert sum(manifest["sizes"]["tc"].values()) == len(wordnet.read_synsets(src))


def test_pinned_sources_are_refused_when_changed(tmp_path, capsys):
    src = _write_wordnet(tmp_path / "wordnet")
    deb = tmp_path / "debian"
    deb.mkdir()
    write_xz(deb / "Translation-en.xz", TRANSLATION)
    write_xz(deb / "Packages.xz", PACKAGES)
    code = benchmark.main(["build", "--wordnet_dir", str(src), "--debian_dir", str(deb), "--out",
                           str(tmp_path / "o"), "--license_file", str(src / "copyright")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--allow_changed_sources" in err
    assert not (tmp_path / "o").exists()


def test_shipped_benchmark_is_pinned_to_its_sources():
    """The shipped files match their manifest (the loader checks every SHA-256), and the manifest names
    the pinned Debian files and the WordNet files the embedded benchmark is rebuilt from byte for byte
    (`benchmark.BUILD_COMMAND` rebuilds it; downloading the Debian files is left out of the suite)."""
    manifest = load_manifest(SHIPPED)
    for name, (_, sha256, size) in debian.SOURCES.items():
        assert manifest["source"]["files"][name] == {"bytes": size, "sha256": sha256}
    wordnet_sources = load_manifest()["source"]["files"]
    for name in wordnet.DATA_FILES.values():
        assert manifest["source"]["files"][name] == wordnet_sources[name]
    data = load_embedded_benchmark(data_dir=SHIPPED)
    assert {t: len(data[t]["test"]) for t in data} == {t: manifest["sizes"][t]["test"] for t in data}
    assert np.isin(data["tc"]["test"].targets, benchmark.COARSE_NAMES).all()
