"""WordNet 3.0 -> the embedded three-task benchmark (TC, RC, TS), rebuilt byte for byte.

Parses the WordNet database files (`data.noun|verb|adj|adv`, format `man 5 wndb`) and derives three
text-to-text tasks mirroring the paper's, all labelled with the synset's lexicographer category
(`LEXNAMES`, 45 classes):

- TC (like AG News): `topic: <definition>` -> lexname, e.g. `noun.animal`.
- RC (like SQuAD): question = definition, context = the gloss's example sentence(s); answer = a
  word of the synset as it appears in the context (an exact span, possibly inflected: `loves`).
- TS (like XSum): `summarize: <word> (<part of speech>)` -> definition.

Splits are 80/10/10 by SHA-256 of the synset key (`n00001740`), shared by the three tasks, so a
synset's definition never crosses splits. Rebuild the shipped files with

    python -m fedmoe_jax.data.wordnet build --wordnet_dir=/usr/share/wordnet --out=fedmoe_jax/data/embedded
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence

from fedmoe_jax.data.tasks import SPLITS, TASKS, rc_prompt, tc_prompt, ts_prompt
from fedmoe_jax.data.tokenizer import SPIECE_FILE, train_sentencepiece

# Lexicographer file names, indexed by lex_filenum (`man 5 lexnames`).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip
DATA_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
SPLIT_PERCENT = {"train": 80, "validation": 10, "test": 10}
DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
DEFAULT_LICENSE_FILE = "/usr/share/doc/wordnet-base/copyright"
DEFAULT_VOCAB_SIZE = 4096  # the vocabulary of the CPU-scale model config `switch-small-16`
# Recorded in the shipped manifest (which keys the pretrained models' cache), so kept as first written;
# the tools read --wordnet-dir as --wordnet_dir (`cli_common.tool_command`).
BUILD_COMMAND = (
    "python -m fedmoe_jax.data.wordnet build --wordnet-dir /usr/share/wordnet --out fedmoe_jax/data/embedded"
)
MANIFEST_FILE = "manifest.json"
LICENSE_FILE = "WORDNET_LICENSE"
INSTALL_HINT = "install WordNet 3.0 with `apt-get install wordnet-base` or pass its directory"

_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # adjective syntactic markers: word(a), word(p), word(ip)
_TRAILING_EG = re.compile(r"[\s;:,]*(?:\bas in\s+)?\be\.g\.?[\s,]*$")
# An inflected form of a word: doubled consonant + ed/ing/er/est, or s/es/d/r/st/'s; a full token.
_SUFFIX = re.compile(r"(?:\w?(?:ed|ing|er|est)|s|es|d|r|st|'s)?(?!\w)")


@dataclasses.dataclass(frozen=True)
class Synset:
    """One synset of a data file: `pos` is the file's (n/v/a/r), `ss_type` adds `s` (satellite)."""

    offset: int
    pos: str
    ss_type: str
    lex_filenum: int
    words: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]

    @property
    def key(self) -> str:
        """Unique, stable id: the data file's part of speech and the byte offset, e.g. `n00001740`."""
        return f"{self.pos}{self.offset:08d}"

    @property
    def lexname(self) -> str:
        return LEXNAMES[self.lex_filenum]


def split_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """`definition; "example"; "example"` -> (definition, examples).

    The examples start at the first double quote outside parentheses (quotes inside them, as in
    `(e.g., "...")`, stay in the definition); every quoted string from there on is an example.
    """
    depth = 0
    for i, ch in enumerate(gloss):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif ch == '"' and depth == 0:
            definition = _TRAILING_EG.sub("", gloss[:i]).rstrip(" ;:,")
            examples = (" ".join(e.split()) for e in re.findall(r'"([^"]*)"', gloss[i:]))
            return " ".join(definition.split()), tuple(e for e in examples if e)
    return " ".join(gloss.split()).rstrip(" ;:,"), ()


def parse_data_line(line: str, pos: str) -> Synset | None:
    """One line of `data.<pos>` -> `Synset`; None for the licence header (lines starting with spaces)."""
    if not line.strip() or line.startswith(" "):
        return None
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    try:
        if not sep or len(fields) < 4 or fields[2] not in POS_NAMES:
            raise ValueError
        offset, lex_filenum, ss_type, w_cnt = int(fields[0]), int(fields[1]), fields[2], int(fields[3], 16)
        if len(fields) < 4 + 2 * w_cnt or not 0 <= lex_filenum < len(LEXNAMES) or w_cnt < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"not a WordNet data line: {line[:80]!r}") from None
    words = tuple(_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(w_cnt))
    definition, examples = split_gloss(gloss.strip())
    return Synset(offset, pos, ss_type, lex_filenum, words, definition, examples)


def read_synsets(wordnet_dir: str | os.PathLike) -> list[Synset]:
    """All synsets of `wordnet_dir/data.{noun,verb,adj,adv}`, in file order."""
    synsets = []
    for pos, path in _data_paths(wordnet_dir).items():
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    synset = parse_data_line(line, pos)
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
                if synset is not None:
                    synsets.append(synset)
    return synsets


def read_version(wordnet_dir: str | os.PathLike) -> str:
    """The WordNet version named in the licence header of `data.noun` (e.g. `3.0`), or `unknown`."""
    with open(_data_paths(wordnet_dir)["n"], encoding="utf-8") as f:
        for line in f:
            if not line.startswith(" "):
                break
            match = re.search(r"WordNet (\d+(?:\.\d+)*) Copyright", line)
            if match:
                return match.group(1)
    return "unknown"


def find_answer(words: Sequence[str], context: str) -> tuple[str, list[str]] | None:
    """The first occurrence in `context` of one of `words` (or an inflected form) as whole tokens.

    Words match as written or with a capital first letter; one-letter words are ignored (`A`
    would match the article). Returns (answer, all distinct matches in order), or None.
    """
    variants = sorted({v for w in words if len(w) > 1 for v in (w, w[:1].upper() + w[1:])})
    matches = []
    for v in variants:
        start = context.find(v)
        while start >= 0:
            before = context[start - 1] if start else " "
            suffix = None if before.isalnum() or before == "_" else _SUFFIX.match(context, start + len(v))
            if suffix is not None:
                matches.append((start, start - suffix.end(), context[start : suffix.end()]))
            start = context.find(v, start + 1)
    if not matches:
        return None
    spans = list(dict.fromkeys(text for _, _, text in sorted(matches)))
    return spans[0], spans


def split_of(key: str) -> str:
    """Deterministic split of a synset key: 80/10/10 by SHA-256 (not Python's salted `hash`)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("ascii")).digest()[:8], "big") % 100
    for split, percent in SPLIT_PERCENT.items():
        if bucket < percent:
            return split
        bucket -= percent
    raise AssertionError("split percentages must sum to 100")


def build_examples(synsets: Iterable[Synset]) -> dict[str, dict[str, list[dict]]]:
    """Records `{id, input, target, label[, references]}` per task and split, sorted by id."""
    out: dict[str, dict[str, list[dict]]] = {t: {s: [] for s in SPLITS} for t in TASKS}
    for syn in synsets:
        if not syn.definition:
            continue
        split, label = split_of(syn.key), syn.lex_filenum
        out["tc"][split].append(
            {"id": syn.key, "input": tc_prompt(syn.definition), "target": syn.lexname, "label": label}
        )
        ts_input = ts_prompt(f"{syn.words[0]} ({POS_NAMES[syn.ss_type]})")
        out["ts"][split].append({"id": syn.key, "input": ts_input, "target": syn.definition, "label": label})
        context = "; ".join(syn.examples)
        answer = find_answer(syn.words, context) if context else None
        if answer is not None:
            target, references = answer
            out["rc"][split].append(
                {
                    "id": syn.key,
                    "input": rc_prompt(syn.definition, context),
                    "target": target,
                    "references": references,
                    "label": label,
                }
            )
    for per_split in out.values():
        for records in per_split.values():
            records.sort(key=lambda r: r["id"])
    return out


def data_file_name(task: str, split: str) -> str:
    return f"{task}_{split}.jsonl.gz"


def encode_records(records: Sequence[dict]) -> bytes:
    """JSON lines (sorted keys, ASCII) gzipped reproducibly: mtime 0, empty file name, level 9."""
    text = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(text.encode("ascii"))
    return buf.getvalue()


def decode_records(data: bytes) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(data).decode("ascii").splitlines()]


def license_text(license_file: str | os.PathLike, wordnet_dir: str | os.PathLike | None = None) -> str:
    """The WordNet 3.0 licence: the `License: WordNet3.0` paragraph of Debian's copyright file.

    Without that file (images that drop /usr/share/doc), the licence header of `wordnet_dir/data.noun`,
    which carries the same text line for line.
    """
    path = os.fspath(license_file)
    lines, inside = [], False
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.startswith("License: WordNet"):
                    inside = True
                elif inside and line.startswith(" "):
                    lines.append("" if line.strip() == "." else line[1:].rstrip())
                elif inside:
                    break
        if not lines:
            raise ValueError(
                f"{path!r} has no `License: WordNet3.0` paragraph; pass wordnet-base's copyright"
            )
    elif wordnet_dir is not None:
        with open(_data_paths(wordnet_dir)["n"], encoding="utf-8") as f:
            for line in f:
                if not line.startswith(" "):
                    break
                lines.append(re.sub(r"^\s*\d+ ?", "", line.rstrip()))
    if not lines:
        raise ValueError(f"licence file {path!r} does not exist; {INSTALL_HINT} (--license_file)")
    header = (
        "The data files and spiece.model in this folder are derived from WordNet 3.0 (Princeton\n"
        "University) and are distributed under the WordNet 3.0 license:\n\n"
    )
    return header + "\n".join(lines) + "\n"


def train_tokenizer(examples: dict[str, dict[str, list[dict]]], vocab_size: int) -> bytes:
    """SentencePiece model (bytes) trained on the distinct training inputs and targets, sorted."""
    texts = sorted({r[k] for t in TASKS for r in examples[t]["train"] for k in ("input", "target")})
    # Trained in memory: an empty model_prefix keeps the output path out of the model's TrainerSpec.
    buf = io.BytesIO()
    train_sentencepiece(texts, SPIECE_FILE, vocab_size, model_prefix="", model_writer=buf)
    return buf.getvalue()


def build(
    wordnet_dir: str | os.PathLike = DEFAULT_WORDNET_DIR,
    out_dir: str | os.PathLike = "fedmoe_jax/data/embedded",
    license_file: str | os.PathLike = DEFAULT_LICENSE_FILE,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> dict:
    """Write the benchmark (data files, spiece.model, licence, manifest) to `out_dir`; return the manifest.

    Everything is computed first and written last, so a failure leaves `out_dir` untouched.
    """
    out_dir = os.fspath(out_dir)
    synsets = read_synsets(wordnet_dir)
    examples = build_examples(synsets)
    files = {data_file_name(t, s): encode_records(examples[t][s]) for t in TASKS for s in SPLITS}
    files[LICENSE_FILE] = license_text(license_file, wordnet_dir).encode("utf-8")
    files[SPIECE_FILE] = train_tokenizer(examples, vocab_size)
    sources = {}
    for path in _data_paths(wordnet_dir).values():
        with open(path, "rb") as f:
            data = f.read()
        sources[os.path.basename(path)] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {
        "format": 1,
        "source": {"name": "WordNet", "version": read_version(wordnet_dir), "files": sources},
        "rebuild": BUILD_COMMAND,
        "label_names": list(LEXNAMES),
        "vocab_size": vocab_size,
        "sizes": {t: {s: len(examples[t][s]) for s in SPLITS} for t in TASKS},
        "files": {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in sorted(files.items())
        },
    }
    files[MANIFEST_FILE] = (json.dumps(manifest, sort_keys=True, indent=1) + "\n").encode("ascii")
    os.makedirs(out_dir, exist_ok=True)
    for name, data in sorted(files.items()):
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    return manifest


def _data_paths(wordnet_dir: str | os.PathLike) -> dict[str, str]:
    wordnet_dir = os.fspath(wordnet_dir)
    if not os.path.isdir(wordnet_dir):
        raise ValueError(f"WordNet directory {wordnet_dir!r} does not exist; {INSTALL_HINT}")
    paths = {pos: os.path.join(wordnet_dir, name) for pos, name in DATA_FILES.items()}
    for path in paths.values():
        if not os.path.isfile(path):
            raise ValueError(f"WordNet data file {path!r} is missing; {INSTALL_HINT}")
    return paths


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("wordnet_dir", DEFAULT_WORDNET_DIR, "Folder with data.noun etc.", flag_values=fv)
    flags.DEFINE_string("out", "fedmoe_jax/data/embedded", "Output folder.", flag_values=fv)
    flags.DEFINE_string("license_file", DEFAULT_LICENSE_FILE, "Debian copyright of wordnet-base.",
                        flag_values=fv)
    flags.DEFINE_integer("vocab_size", DEFAULT_VOCAB_SIZE, "SentencePiece vocabulary.", lower_bound=8,
                         flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fedmoe_jax.data.wordnet build [--wordnet_dir=D] [--out=O] ...`."""
    from fedmoe_jax.cli_common import tool_command

    _, fv = tool_command(argv, "fedmoe_jax.data.wordnet", ["build"], _define_flags,
                         "build: the embedded benchmark from the WordNet database files")
    return run_build(lambda: build(fv.wordnet_dir, fv.out, fv.license_file, fv.vocab_size), fv.out)


def run_build(build_fn, out: str) -> int:
    """A builder command's end: `build_fn()` -> manifest; one summary line, or on bad input (ValueError,
    OSError) one `error:` line on stderr and status 2."""
    try:
        manifest = build_fn()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{t} " + "/".join(str(n) for n in manifest["sizes"][t].values()) for t in TASKS)
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {out}: {sizes} (train/validation/test examples), {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
