"""The CPU-scale benchmark, built to be learnable by a ~10M-parameter model: three tasks of the paper's
three types from different sources.

- TC (like AG News): `topic: <WordNet definition>` -> one of ten coarse classes (`COARSE_CLASSES`:
  the 45 lexicographer categories grouped into quality, action, person, organism, artifact, event,
  substance, place, group, abstraction).
- RC (like SQuAD): the embedded benchmark's WordNet task, unchanged (definition + example sentence(s)
  -> the word as it appears there); labelled with the coarse class of its synset.
- TS (like XSum): `summarize: <Debian long description>` -> the package's one-line synopsis
  (`fedmoe_jax.data.debian`); labelled with the package's archive section.

WordNet examples split 80/10/10 by synset (as the embedded benchmark), Debian ones by source package.
Same file format as `fedmoe_jax/data/embedded/` (JSON lines per task and split, `spiece.model`
trained on all three tasks' training texts, `manifest.json` with SHA-256 sums; format 2: label
names per task), so `load_embedded_benchmark(data_dir=...)` reads it. Rebuild, byte for byte from
the pinned sources (WordNet 3.0 from Debian's `wordnet-base`; the Debian files are downloaded into
`--debian_dir` unless there, and checked against `debian.SOURCES`):

    python -m fedmoe_jax.data.benchmark build --debian_dir=runs/debian_sources --out=fedmoe_jax/data/benchmark
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence

from fedmoe_jax.data import debian, wordnet
from fedmoe_jax.data.tasks import SPLITS, TASKS
from fedmoe_jax.data.tokenizer import SPIECE_FILE

# The 45 lexicographer categories in ten one-word classes: naive Bayes on 3,000 definitions reaches
# ~63 % (vs ~52 % on the 45 categories), so a small model has something to learn beyond it
COARSE_CLASSES = {
    **{name: "quality" for name in ("adj.all", "adj.pert", "adj.ppl", "adv.all")},
    **{name: "action" for name in wordnet.LEXNAMES if name.startswith("verb.")},
    "noun.person": "person",
    **{name: "organism" for name in ("noun.animal", "noun.plant", "noun.body")},
    "noun.artifact": "artifact",
    **{name: "event" for name in ("noun.act", "noun.event", "noun.process", "noun.phenomenon")},
    **{name: "substance" for name in ("noun.substance", "noun.food")},
    **{name: "place" for name in ("noun.location", "noun.object")},
    "noun.group": "group",
    **{name: "abstraction" for name in ("noun.Tops", "noun.attribute", "noun.cognition", "noun.communication",
                                        "noun.feeling", "noun.motive", "noun.possession", "noun.quantity",
                                        "noun.relation", "noun.shape", "noun.state", "noun.time")},
}
COARSE_NAMES = tuple(sorted(set(COARSE_CLASSES.values())))
DEFAULT_OUT = "fedmoe_jax/data/benchmark"
DEFAULT_DEBIAN_DIR = "runs/debian_sources"
# Recorded in the shipped manifest (which keys the pretrained models' cache), so kept as first written;
# the tools read --debian-dir as --debian_dir (`cli_common.tool_command`).
BUILD_COMMAND = ("python -m fedmoe_jax.data.benchmark build "
                 f"--debian-dir {DEFAULT_DEBIAN_DIR} --out {DEFAULT_OUT}")
DEBIAN_NOTICE_FILE = "DEBIAN_NOTICE"


def coarse_examples(examples: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, list[dict]]]:
    """The WordNet TC and RC records with coarse classes: TC's target and label, RC's label."""
    out = {}
    for task in ("tc", "rc"):
        out[task] = {}
        for split, records in examples[task].items():
            rows = []
            for r in records:
                name = COARSE_CLASSES[wordnet.LEXNAMES[r["label"]]]
                row = {**r, "label": COARSE_NAMES.index(name)}
                if task == "tc":
                    row["target"] = name
                rows.append(row)
            out[task][split] = rows
    return out


def debian_notice(sources: dict[str, str]) -> str:
    lines = ["The TS files (ts_*.jsonl.gz) hold package descriptions and sections from the Debian archive",
             "(Debian 12 \"bookworm\", main), read from these files of a Debian mirror:", ""]
    lines += [f"  {debian.SOURCES[name][0]}  sha256 {debian.SOURCES[name][1]}" for name in sorted(sources)]
    lines += ["", "Each description is part of its package's control data and is distributed by Debian under",
              "the licence of that package (its /usr/share/doc/<package>/copyright); they are redistributed",
              "here unchanged in wording (joined into one line, cut to the first "
              f"{debian.MAX_INPUT_WORDS} words)."]
    return "\n".join(lines) + "\n"


def build(wordnet_dir: str | os.PathLike = wordnet.DEFAULT_WORDNET_DIR,
          debian_dir: str | os.PathLike = DEFAULT_DEBIAN_DIR, out_dir: str | os.PathLike = DEFAULT_OUT,
          license_file: str | os.PathLike = wordnet.DEFAULT_LICENSE_FILE,
          vocab_size: int = wordnet.DEFAULT_VOCAB_SIZE, mirror: str = debian.DEFAULT_MIRROR,
          allow_changed_sources: bool = False) -> dict:
    """Write the benchmark (data files, spiece.model, licences, manifest) to `out_dir`; return the
    manifest. Everything is computed first and written last: a failure leaves `out_dir` untouched."""
    synsets = wordnet.read_synsets(wordnet_dir)
    examples = coarse_examples(wordnet.build_examples(synsets))
    paths = debian.fetch_sources(debian_dir, mirror, allow_changed_sources)
    examples["ts"], ts_labels = debian.build_ts_examples(
        debian.read_descriptions(paths["Translation-en.xz"], paths["Packages.xz"]))
    files = {wordnet.data_file_name(t, s): wordnet.encode_records(examples[t][s])
             for t in TASKS for s in SPLITS}
    files[wordnet.LICENSE_FILE] = wordnet.license_text(license_file, wordnet_dir).encode("utf-8")
    files[DEBIAN_NOTICE_FILE] = debian_notice(paths).encode("utf-8")
    files[SPIECE_FILE] = wordnet.train_tokenizer(examples, vocab_size)
    sources = {}
    wordnet_files = [os.path.join(wordnet_dir, name) for name in wordnet.DATA_FILES.values()]
    for path in [*wordnet_files, *paths.values()]:
        sources[os.path.basename(path)] = {"bytes": os.path.getsize(path), "sha256": debian.sha256_file(path)}
    manifest = {
        "format": 2,
        "source": {"name": "WordNet 3.0 (TC, RC) and Debian bookworm package descriptions (TS)",
                   "version": wordnet.read_version(wordnet_dir), "files": sources},
        "rebuild": BUILD_COMMAND,
        "label_names": {"tc": list(COARSE_NAMES), "rc": list(COARSE_NAMES), "ts": ts_labels},
        "vocab_size": vocab_size,
        "sizes": {t: {s: len(examples[t][s]) for s in SPLITS} for t in TASKS},
        "files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                  for name, data in sorted(files.items())},
    }
    files[wordnet.MANIFEST_FILE] = (json.dumps(manifest, sort_keys=True, indent=1) + "\n").encode("ascii")
    os.makedirs(out_dir, exist_ok=True)
    for name, data in sorted(files.items()):
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    return manifest


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("wordnet_dir", wordnet.DEFAULT_WORDNET_DIR, "Folder with data.noun etc.",
                        flag_values=fv)
    flags.DEFINE_string("debian_dir", DEFAULT_DEBIAN_DIR, "Folder holding (or receiving) Translation-en.xz "
                        "and Packages.xz.", flag_values=fv)
    flags.DEFINE_string("mirror", debian.DEFAULT_MIRROR, "Debian mirror to download them from.",
                        flag_values=fv)
    flags.DEFINE_bool("allow_changed_sources", False, "Build from Debian files whose SHA-256 differs from "
                      "the pinned one.", flag_values=fv)
    flags.DEFINE_string("out", DEFAULT_OUT, "Output folder.", flag_values=fv)
    flags.DEFINE_string("license_file", wordnet.DEFAULT_LICENSE_FILE, "wordnet-base's copyright.",
                        flag_values=fv)
    flags.DEFINE_integer("vocab_size", wordnet.DEFAULT_VOCAB_SIZE, "SentencePiece pieces.", lower_bound=8,
                         flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fedmoe_jax.data.benchmark build [--debian_dir=D] [--out=O] ...`."""
    from fedmoe_jax.cli_common import tool_command

    _, fv = tool_command(argv, "fedmoe_jax.data.benchmark", ["build"], _define_flags,
                         "build: the benchmark from WordNet and Debian's package descriptions")
    return wordnet.run_build(lambda: build(fv.wordnet_dir, fv.debian_dir, fv.out, fv.license_file,
                                           fv.vocab_size, fv.mirror, fv.allow_changed_sources), fv.out)


if __name__ == "__main__":
    sys.exit(main())
