"""Trivial baselines of the three tasks: the floor a method must clear before its score means anything.

Each baseline learns from a task's training split only (the examples a federated run trains on, as
the experiment config cuts them), picks its one setting on the validation split, and is scored on the
test split with the task's own metric (`fedmoe_jax.data.tasks.task_scores`):

- TC: `majority` (the most common training label); `naive_bayes` (multinomial naive Bayes over the
  words of the input, scikit-learn; smoothing alpha picked on validation).
- RC: `rarest_context_word` (the context word, not in the question, that is rarest in the training
  contexts: answers in extractive data are often the one unusual word).
- TS: `lead` (the first N words of the document, N picked on validation); `constant` (per label, the
  most common first K words of the training targets, K picked on validation: "of or relating to").

`trivial_baselines(data)` returns `{task: {baseline: {metric: value, ..., "setting": ...}}}`;
`label_skew(data, partition)` measures how far a partition's clients are from their task's labels;
`python experiments/baselines.py --config=configs/cpu.py --out=results/benchmark` writes it as JSON
and Markdown.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fedmoe_jax.data.tasks import PRIMARY_METRIC, TaskData, task_scores

_WORD = re.compile(r"[\w'-]+")
TUNE_EXAMPLES = 1000  # validation examples a setting is picked on (ROUGE is slow in Python)
LEAD_WORDS = (3, 5, 8, 10, 15, 20, 30)
CONSTANT_WORDS = (1, 2, 3, 4, 6, 8)
NB_ALPHAS = (0.03, 0.1, 0.3, 1.0)


def _after(marker: str, text: str) -> str:
    """The part of a prompted input after `marker` (the whole text if it is absent)."""
    i = text.find(marker)
    return text[i + len(marker):] if i >= 0 else text


def _rc_parts(text: str) -> tuple[str, str]:
    """(question, context) of an `rc_prompt` input."""
    head, sep, context = text.partition(" context: ")
    return _after("question: ", head), context if sep else text


def _score(task: str, predictions: Sequence[str], data: TaskData) -> dict[str, float]:
    return task_scores(task, list(predictions), [list(r) for r in data.references])


def _tuned(task: str, settings: Sequence[Any], predict: Callable[[Any, TaskData], list[str]],
           validation: TaskData, test: TaskData) -> dict[str, Any]:
    """Test scores of `predict(setting, data)` at the setting best on (a prefix of) validation."""
    tune = validation.take(np.arange(min(len(validation), TUNE_EXAMPLES)))
    metric = PRIMARY_METRIC[task]
    best = max(settings, key=lambda s: _score(task, predict(s, tune), tune)[metric])
    return {**_score(task, predict(best, test), test), "setting": best}


# ------------------------------------------------------------------------------------------------
def majority(train: TaskData, test: TaskData) -> dict[str, Any]:
    """TC: the most common training target for every example."""
    label = collections.Counter(train.targets).most_common(1)[0][0]
    return {**_score("tc", [label] * len(test), test), "setting": label}


def naive_bayes(train: TaskData, validation: TaskData, test: TaskData) -> dict[str, Any]:
    """TC: multinomial naive Bayes over the input's word counts (the `topic:` prompt removed)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.naive_bayes import MultinomialNB

    def texts(data):
        return [_after("topic: ", t) for t in data.inputs]

    vectorizer = CountVectorizer(token_pattern=_WORD.pattern)
    x_train = vectorizer.fit_transform(texts(train))
    targets = np.asarray(list(train.targets))

    def predict(alpha, data):
        model = MultinomialNB(alpha=alpha).fit(x_train, targets)
        return list(model.predict(vectorizer.transform(texts(data))))

    return _tuned("tc", NB_ALPHAS, predict, validation, test)


def rarest_context_word(train: TaskData, test: TaskData) -> dict[str, Any]:
    """RC: the context word absent from the question with the fewest training contexts holding it
    (ties: the first in the context; all words in the question: the rarest context word)."""
    df = collections.Counter()
    for text in train.inputs:
        df.update({w.lower() for w in _WORD.findall(_rc_parts(text)[1])})

    def pick(text: str) -> str:
        question, context = _rc_parts(text)
        asked = {w.lower() for w in _WORD.findall(question)}
        words = _WORD.findall(context)
        pool = [w for w in words if w.lower() not in asked] or words
        return min(pool, key=lambda w: df[w.lower()]) if pool else ""

    return {**_score("rc", [pick(t) for t in test.inputs], test), "setting": "document frequency"}


def lead(validation: TaskData, test: TaskData) -> dict[str, Any]:
    """TS: the document's first N words."""
    def predict(n, data):
        return [" ".join(_after("summarize: ", t).split()[:n]) for t in data.inputs]

    return _tuned("ts", LEAD_WORDS, predict, validation, test)


def constant(train: TaskData, validation: TaskData, test: TaskData) -> dict[str, Any]:
    """TS: per label, the most common first K words of its training targets (K picked on validation);
    a label unseen in training gets the overall most common."""
    def table(k):
        per = collections.defaultdict(collections.Counter)
        for label, target in zip(train.labels, train.targets):
            per[int(label)][" ".join(target.split()[:k])] += 1
        overall = sum(per.values(), collections.Counter()).most_common(1)[0][0]
        return {label: c.most_common(1)[0][0] for label, c in per.items()}, overall

    tables = {k: table(k) for k in CONSTANT_WORDS}

    def predict(k, data):
        by_label, overall = tables[k]
        return [by_label.get(int(label), overall) for label in data.labels]

    return _tuned("ts", CONSTANT_WORDS, predict, validation, test)


def trivial_baselines(data: Mapping[str, Mapping[str, TaskData]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every baseline of every task present in `data` (`{task: {split: TaskData}}`)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    if "tc" in data:
        tc = data["tc"]
        out["tc"] = {"majority": majority(tc["train"], tc["test"]),
                     "naive_bayes": naive_bayes(tc["train"], tc["validation"], tc["test"])}
    if "rc" in data:
        out["rc"] = {"rarest_context_word": rarest_context_word(data["rc"]["train"], data["rc"]["test"])}
    if "ts" in data:
        ts = data["ts"]
        out["ts"] = {"lead": lead(ts["validation"], ts["test"]),
                     "constant": constant(ts["train"], ts["validation"], ts["test"])}
    return out


def _entropy(labels: np.ndarray) -> float:
    """Shannon entropy (nats) of the empirical distribution of `labels` (0 for none)."""
    from scipy.stats import entropy

    return float(entropy(np.bincount(labels))) if len(labels) else 0.0


def label_skew(data: Mapping[str, Mapping[str, TaskData]], partition) -> dict[str, dict[str, float]]:
    """How much a partition skews each task's labels over its clients (the -TD settings): the entropy
    (nats) of the task's training labels, the mean over its clients of their own training labels'
    entropy, and for TC `client_majority`: each client predicting its own most common training label
    on its own test examples (accuracy, mean over the task's clients, as runs report it)."""
    out = {}
    for task in data:
        clients = partition.clients_of(task)
        train, test = data[task]["train"], data[task]["test"]
        row = {"labels": train.num_labels, "task_entropy": _entropy(train.labels),
               "client_entropy": float(np.mean([_entropy(train.labels[partition.client_indices(c)])
                                                for c in clients])) if len(clients) else 0.0}
        if task == "tc" and len(clients):
            scores = []
            for c in clients:
                own = train.labels[partition.client_indices(c)]
                mine = test.take(partition.client_indices(c, "test"))
                guess = train.label_names[np.bincount(own).argmax()] if len(own) else ""
                scores.append(_score("tc", [guess] * len(mine), mine)["accuracy"])
            row["client_majority"] = float(np.mean(scores))
        out[task] = row
    return out


def markdown(result: Mapping[str, Mapping[str, Mapping[str, Any]]], heading: str = "") -> str:
    """One row per (task, baseline): its primary metric, the other metrics, and the picked setting."""
    lines = [f"### {heading}", ""] if heading else []
    lines += ["| task | baseline | primary metric | value | other metrics | setting |",
              "|---|---|---|---:|---|---|"]
    for task, baselines in result.items():
        metric = PRIMARY_METRIC[task]
        for name, scores in baselines.items():
            others = ", ".join(f"{k} {v:.1f}" for k, v in scores.items() if k not in (metric, "setting"))
            lines.append(f"| {task} | {name} | {metric} | {scores[metric]:.1f} | {others or '—'} | "
                         f"{scores['setting']} |")
    return "\n".join(lines) + "\n"


def run_baselines(config: str = "configs/cpu.py", overrides: Sequence[str] = (), out: str = "") -> dict:
    """The baselines on the data of experiment config `config` ("FILE[:ARG]", with KEY=VALUE
    `overrides`): the same examples per task a run of it trains, validates and tests on. Prints the
    Markdown table; writes `out/baselines.json` and `out/baselines.md` when given. A config that fails
    to load or a bad override raises `SpecError`, invalid data `ConfigError`, before anything is
    written."""

    from fedmoe_jax.experiment.build import load_task_data, make_run_partition
    from fedmoe_jax.files import write_report
    from fedmoe_jax.tools.sweeps import config_from_spec

    cfg = config_from_spec(config, overrides)
    d = cfg.data
    task_data = load_task_data(cfg)
    skew = label_skew(task_data, make_run_partition(cfg, task_data))
    result = {"config": config, "overrides": list(overrides), "source": d.source, "data_dir": d.dir,
              "examples_per_task": {"train": d.train_examples_per_task, "eval": d.eval_examples_per_task},
              "baselines": trivial_baselines(task_data),
              "label_skew": {"setting": cfg.setting, "num_clients": d.num_clients, "alpha": d.alpha,
                             "seed": cfg.seed, "tasks": skew}}
    data = f"{d.source} data" + (f" from {d.dir}" if d.dir else "")
    text = markdown(result["baselines"], f"Trivial baselines, test split (`{config}`, {data})")
    text += (f"\nLabel skew of the `{cfg.setting}` partition ({d.num_clients} clients, alpha {d.alpha}, "
             f"seed {cfg.seed}): training-label entropy of the task vs the mean over its clients (nats)"
             + "".join(f"; {t} {r['task_entropy']:.2f} vs {r['client_entropy']:.2f}" for t, r in skew.items())
             + (f"; TC per-client majority {skew['tc']['client_majority']:.1f} %" if "tc" in skew else "")
             + ".\n")
    print(text)
    if out:
        write_report(out, "baselines", result, text)
    return result
