"""WordNet parser and benchmark builder: handcrafted data lines, determinism, rebuild of the shipped files."""

import filecmp
import os
import pathlib
import random

import pytest

import fedmoe_jax.data
from fedmoe_jax.data import wordnet
from fedmoe_jax.data.tasks import SPLITS, TASKS

WORDNET_DIR = os.environ.get("WORDNET_DIR", wordnet.DEFAULT_WORDNET_DIR)
SHIPPED = pathlib.Path(fedmoe_jax.data.__file__).parent / "embedded"
HEADER = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.  \n"
)
COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/

Files: *
License: WordNet3.0
 Permission to use, copy, modify and distribute this database.
 .
 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.

Files: debian/*
License: GPL-2+
 Not this one.
"""
# (pos file, data line) pairs; offsets need not be byte offsets for the parser.
LINES = {
    "n": [
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04431553 n 0000 | that which "
        "is perceived or known or inferred to have its own distinct existence (living or nonliving)  ",
        '02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; "the '
        'dog barked all night"; "a domestic dog"  ',
        '13809207 24 n 01 part 0 000 | something determined in relation to something that includes it; "the '
        'party was fun"  ',
        '15000000 27 n 03 A 0 vitamin_A 0 retinol 0 000 | a fat-soluble vitamin; "A deficiency of '
        'vitamin A"  ',
        "15000001 14 n 0b w0 0 w1 0 w2 0 w3 0 w4 0 w5 0 w6 0 w7 0 w8 0 w9 0 w10 0 000 | eleven words (w_cnt "
        'is hex) (e.g., "w1" quoted in parentheses); "w10 is here"  ',
    ],
    "v": [
        "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 001 * 00005041 v 0000 02 + 02 00 "
        '+ 08 00 | draw air into, and expel out of, the lungs; "I can breathe better when the air is '
        'clean"; "The patient is respiring"  ',
        '01775164 37 v 01 love 0 000 01 + 08 00 | have a great affection or liking for; "She loves her '
        'husband deeply"  ',
    ],
    "a": [
        '00001740 00 a 01 able 0 000 | having the necessary means or skill; "Able to swim"  ',
        '00003700 00 a 01 ablaze(p) 0 000 | lighted up by or as if by fire; "the sky was aglow"  ',
        '00004000 00 s 02 galore(ip) 0 in_abundance(a) 0 000 | in great numbers: "there were daffodils '
        'galore"  ',
    ],
    "r": ['00001837 02 r 01 a_cappella 0 000 | without musical accompaniment; "they performed a cappella"  '],
}


def _write_wordnet(folder: pathlib.Path, extra: int = 0, seed: int = 0) -> pathlib.Path:
    """A WordNet folder with the handcrafted lines plus `extra` generated synsets per file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    vocab = "red green blue fish bird tree stone river cloud light small quick heavy sing run build".split()
    lex = {"n": (5, 13, 20), "v": (29, 38), "a": (0, 44), "r": (2,)}
    for pos, name in wordnet.DATA_FILES.items():
        lines = list(LINES[pos])
        for i in range(extra):
            word = rng.choice(vocab) + str(i)
            definition = " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 9)))
            example = f'; "the {word} is {rng.choice(vocab)}"' if i % 3 == 0 else ""
            head = f"{20000000 + i:08d} {rng.choice(lex[pos]):02d} {pos} 01 {word} 0 000"
            lines.append(f"{head} | {definition}{example}  ")
        (folder / name).write_text(HEADER + "".join(line + "\n" for line in lines))
    (folder / "copyright").write_text(COPYRIGHT)
    return folder


@pytest.fixture(scope="module")
def tiny_wordnet(tmp_path_factory):
    return _write_wordnet(tmp_path_factory.mktemp("wordnet"))


@pytest.fixture(scope="module")
def synsets(tiny_wordnet):
    return {s.key: s for s in wordnet.read_synsets(tiny_wordnet)}


def test_lexnames():
    assert len(wordnet.LEXNAMES) == 45 == len(set(wordnet.LEXNAMES))
    assert wordnet.LEXNAMES[:4] == ("adj.all", "adj.pert", "adv.all", "noun.Tops")
    assert wordnet.LEXNAMES[5] == "noun.animal" and wordnet.LEXNAMES[29] == "verb.body"
    assert wordnet.LEXNAMES[43:] == ("verb.weather", "adj.ppl")


def test_parse_lines(synsets):
    assert len(synsets) == sum(len(v) for v in LINES.values())
    entity = synsets["n00001740"]
    assert (entity.offset, entity.pos, entity.ss_type, entity.lexname) == (1740, "n", "n", "noun.Tops")
    assert entity.words == ("entity",) and entity.examples == ()
    assert entity.definition.endswith("distinct existence (living or nonliving)")
    dog = synsets["n02084071"]
    assert dog.words == ("dog", "domestic dog") and dog.lexname == "noun.animal"
    assert dog.definition == "a member of the genus Canis"
    assert dog.examples == ("the dog barked all night", "a domestic dog")
    breathe = synsets["v00001740"]  # verb frames after the pointers are skipped
    assert breathe.words == ("breathe", "take a breath", "respire", "suspire")
    assert breathe.definition == "draw air into, and expel out of, the lungs" and len(breathe.examples) == 2
    eleven = synsets["n15000001"]
    assert eleven.words == tuple(f"w{i}" for i in range(11))
    assert eleven.definition == 'eleven words (w_cnt is hex) (e.g., "w1" quoted in parentheses)'
    assert eleven.examples == ("w10 is here",)


def test_parse_adjectives(synsets):
    assert synsets["a00003700"].words == ("ablaze",)  # marker (p) removed
    galore = synsets["a00004000"]
    assert (galore.pos, galore.ss_type, galore.key) == ("a", "s", "a00004000")  # satellite
    assert galore.words == ("galore", "in abundance")  # markers (ip), (a) removed, underscores -> spaces
    assert galore.definition == "in great numbers" and galore.examples == ("there were daffodils galore",)


def test_parse_errors(tmp_path):
    assert wordnet.parse_data_line("  1 This software and database ...", "n") is None
    for bad in ["00001740 03 n 02 entity 0 000 | two words announced, one given", "00001740 03 n 01 x 0 000"]:
        with pytest.raises(ValueError, match="not a WordNet data line"):
            wordnet.parse_data_line(bad, "n")
    with pytest.raises(ValueError, match="apt-get install wordnet-base"):
        wordnet.read_synsets(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"data\.noun.*apt-get install wordnet-base"):
        wordnet.read_synsets(tmp_path)


def test_find_answer():
    assert wordnet.find_answer(["dog", "domestic dog"], "a domestic dog; the dog") == (
        "domestic dog",
        ["domestic dog", "dog"],
    )
    assert wordnet.find_answer(["love"], "She loves him") == ("loves", ["loves"])
    assert wordnet.find_answer(["drop"], "prices dropped") == ("dropped", ["dropped"])
    assert wordnet.find_answer(["able"], "Able to swim") == ("Able", ["Able"])
    assert wordnet.find_answer(["part"], "the party was fun") is None  # not an inflection
    assert wordnet.find_answer(["able"], "unable to swim") is None  # inside another word
    assert wordnet.find_answer(["A"], "A big dog") is None  # one-letter words are ignored


def test_examples(synsets):
    ex = wordnet.build_examples(synsets.values())
    rc = {r["id"]: r for s in SPLITS for r in ex["rc"][s]}
    with_answer = "n02084071 n15000000 n15000001 v00001740 v01775164 a00001740 a00004000 r00001837"
    assert sorted(rc) == sorted(with_answer.split())  # not: entity (no example), part, ablaze
    for key, r in rc.items():
        context = r["input"].split(" context: ", 1)[1]
        assert r["target"] in context and all(ref in context for ref in r["references"])
        assert r["input"] == f"question: {synsets[key].definition} context: {context}"
        assert r["label"] == synsets[key].lex_filenum
    assert rc["n02084071"]["input"].endswith("context: the dog barked all night; a domestic dog")
    assert (rc["n02084071"]["target"], rc["n02084071"]["references"]) == ("dog", ["dog", "domestic dog"])
    assert rc["n15000000"]["target"] == "vitamin A"
    assert rc["v00001740"]["target"] == "breathe"
    assert rc["a00004000"]["target"] == "galore"
    assert rc["r00001837"]["target"] == "a cappella"
    for t in ("tc", "ts"):
        assert sum(len(ex[t][s]) for s in SPLITS) == len(synsets)
    for s in SPLITS:
        for t in TASKS:
            assert [r["id"] for r in ex[t][s]] == sorted(r["id"] for r in ex[t][s])
            assert all(wordnet.split_of(r["id"]) == s for r in ex[t][s])
    tc = {r["id"]: r for s in SPLITS for r in ex["tc"][s]}
    ts = {r["id"]: r for s in SPLITS for r in ex["ts"][s]}
    assert tc["n02084071"] == {
        "id": "n02084071", "input": "topic: a member of the genus Canis", "target": "noun.animal", "label": 5
    }  # fmt: skip
    assert ts["a00004000"]["input"] == "summarize: galore (adjective)"
    assert ts["v00001740"] == {
        "id": "v00001740",
        "input": "summarize: breathe (verb)",
        "target": "draw air into, and expel out of, the lungs",
        "label": 29,
    }


def test_split_of():
    assert [wordnet.split_of(k) for k in ("n00000000", "n00000017", "n00000022")] == [
        "train",
        "validation",
        "test",
    ]
    counts = {s: 0 for s in SPLITS}
    for i in range(5000):
        counts[wordnet.split_of(f"v{i:08d}")] += 1
    assert 3800 < counts["train"] < 4200 and 400 < counts["validation"] < 600 and 400 < counts["test"] < 600


def test_license_text(tiny_wordnet):
    text = wordnet.license_text(tiny_wordnet / "copyright")
    assert "Permission to use, copy, modify and distribute this database.\n\nWordNet 3.0 Copyright" in text
    assert "Not this one" not in text and text.endswith("reserved.\n")
    fallback = wordnet.license_text(tiny_wordnet / "none", tiny_wordnet)  # from data.noun's header
    assert fallback.endswith(
        "by\nWordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.\n"
    )
    with pytest.raises(ValueError, match="apt-get install wordnet-base"):
        wordnet.license_text(tiny_wordnet / "none")


def test_build_is_deterministic(tmp_path):
    """Two builds (the function and the CLI) into two folders are byte-identical."""
    src = _write_wordnet(tmp_path / "wordnet", extra=120)
    args = dict(license_file=src / "copyright", vocab_size=120)
    manifest = wordnet.build(src, tmp_path / "a", **args)
    rc = wordnet.main(
        ["build", "--wordnet_dir", str(src), "--out", str(tmp_path / "b"), "--license_file",
         str(src / "copyright"), "--vocab_size", "120"]
    )  # fmt: skip
    assert rc == 0
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) == sorted([*manifest["files"], "manifest.json"])
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", names, shallow=False)
    assert mismatch == errors == []
    assert manifest["source"]["version"] == "3.0"
    assert sum(manifest["sizes"]["tc"].values()) == len(wordnet.read_synsets(src))


def test_cli_error(tmp_path, capsys):
    assert wordnet.main(["build", "--wordnet_dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install wordnet-base" in err
    assert not (tmp_path / "o").exists()


def test_rebuild_matches_shipped(tmp_path):
    """The shipped benchmark is what the builder makes from Debian's wordnet-base, byte for byte."""
    if not os.path.isfile(os.path.join(WORDNET_DIR, "data.noun")):
        pytest.fail(
            f"WordNet 3.0 not found at {WORDNET_DIR}: run `apt-get install wordnet-base` "
            "(or set WORDNET_DIR) to check the shipped benchmark against its source"
        )
    if os.path.isfile(wordnet.DEFAULT_LICENSE_FILE):  # the data files' header is the fallback: same text
        assert wordnet.license_text(tmp_path / "none", WORDNET_DIR) == wordnet.license_text(
            wordnet.DEFAULT_LICENSE_FILE
        )
    wordnet.build(WORDNET_DIR, tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(os.listdir(SHIPPED)), "the shipped folder has other files than a rebuild"
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, SHIPPED, names, shallow=False)
    assert mismatch == errors == [], f"rebuild differs from the shipped files; run `{wordnet.BUILD_COMMAND}`"
