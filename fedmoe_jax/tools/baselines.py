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

`trivial_baselines(data)` returns `{task: {baseline: {metric: value, ..., "setting": ...}}}`, scored on
the whole test split; `client_scores(data, partition)` scores them client by client, as runs are
scored, with two TC baselines that use the client's own training labels (`client_majority`,
`naive_bayes_client_prior`), and `client_baselines` averages those over each task's clients: the floor
of a partition whose clients hold unequal shares and few classes (the -TD settings). `label_skew(data,
partition)` measures how far a partition's clients are from their task's labels. `python
experiments/baselines.py --config=configs/cpu.py --seeds=0,1,2 --out=DIR` writes it all as JSON and
Markdown. The sklearn naive Bayes is used as is; `NaiveBayes.predict` only swaps its class prior.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

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


class Fitted(NamedTuple):
    """A baseline's picked setting and its predictions for every example of the test split."""
    setting: Any
    predictions: list[str]
    model: Any = None  # what a personalized variant reuses (naive Bayes: its `NaiveBayes`)


def _score(task: str, predictions: Sequence[str], data: TaskData) -> dict[str, float]:
    return task_scores(task, list(predictions), [list(r) for r in data.references])


def _pick(task: str, settings: Sequence[Any], predict: Callable[[Any, TaskData], list[str]],
          validation: TaskData) -> Any:
    """The setting whose `predict(setting, data)` scores best on (a prefix of) validation."""
    tune = validation.take(np.arange(min(len(validation), TUNE_EXAMPLES)))
    metric = PRIMARY_METRIC[task]
    return max(settings, key=lambda s: _score(task, predict(s, tune), tune)[metric])


def _tuned(task: str, settings: Sequence[Any], predict: Callable[[Any, TaskData], list[str]],
           validation: TaskData, test: TaskData) -> Fitted:
    """`predict(setting, test)` at the setting best on (a prefix of) validation."""
    best = _pick(task, settings, predict, validation)
    return Fitted(best, predict(best, test))


def _scored(task: str, fitted: Fitted, test: TaskData) -> dict[str, Any]:
    return {**_score(task, fitted.predictions, test), "setting": fitted.setting}


# ------------------------------------------------------------------------------------------------
def fit_majority(train: TaskData, test: TaskData) -> Fitted:
    label = collections.Counter(train.targets).most_common(1)[0][0]
    return Fitted(label, [label] * len(test))


def majority(train: TaskData, test: TaskData) -> dict[str, Any]:
    """TC: the most common training target for every example."""
    return _scored("tc", fit_majority(train, test), test)


class NaiveBayes(NamedTuple):
    """A fitted multinomial naive Bayes over the words of TC inputs (the `topic:` prompt removed)."""
    alpha: float
    vectorizer: Any  # sklearn CountVectorizer
    model: Any  # sklearn MultinomialNB

    def features(self, data: TaskData):
        return self.vectorizer.transform([_after("topic: ", t) for t in data.inputs])

    def predict(self, data: TaskData, log_prior: np.ndarray | None = None) -> list[str]:
        """The most likely class of each example; `log_prior [K]` (the model's classes' order) replaces
        the training labels' prior when given."""
        scores = self.model.predict_joint_log_proba(self.features(data))  # [B, K], prior included
        if log_prior is not None:
            scores = scores - self.model.class_log_prior_ + log_prior
        return [str(c) for c in self.model.classes_[np.asarray(scores).argmax(-1)]]


def fit_naive_bayes(train: TaskData, validation: TaskData) -> NaiveBayes:
    """Naive Bayes on TC's training split, its smoothing alpha picked on (a prefix of) validation."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.naive_bayes import MultinomialNB

    vectorizer = CountVectorizer(token_pattern=_WORD.pattern)
    x_train = vectorizer.fit_transform([_after("topic: ", t) for t in train.inputs])
    targets = np.asarray(list(train.targets))
    models = {a: NaiveBayes(a, vectorizer, MultinomialNB(alpha=a).fit(x_train, targets)) for a in NB_ALPHAS}
    return models[_pick("tc", NB_ALPHAS, lambda a, data: models[a].predict(data), validation)]


def naive_bayes(train: TaskData, validation: TaskData, test: TaskData) -> dict[str, Any]:
    """TC: multinomial naive Bayes over the input's word counts (the `topic:` prompt removed)."""
    nb = fit_naive_bayes(train, validation)
    return _scored("tc", Fitted(nb.alpha, nb.predict(test)), test)


def fit_rarest_context_word(train: TaskData, test: TaskData) -> Fitted:
    df = collections.Counter()
    for text in train.inputs:
        df.update({w.lower() for w in _WORD.findall(_rc_parts(text)[1])})

    def pick(text: str) -> str:
        question, context = _rc_parts(text)
        asked = {w.lower() for w in _WORD.findall(question)}
        words = _WORD.findall(context)
        pool = [w for w in words if w.lower() not in asked] or words
        return min(pool, key=lambda w: df[w.lower()]) if pool else ""

    return Fitted("document frequency", [pick(t) for t in test.inputs])


def rarest_context_word(train: TaskData, test: TaskData) -> dict[str, Any]:
    """RC: the context word absent from the question with the fewest training contexts holding it
    (ties: the first in the context; all words in the question: the rarest context word)."""
    return _scored("rc", fit_rarest_context_word(train, test), test)


def fit_lead(validation: TaskData, test: TaskData) -> Fitted:
    def predict(n, data):
        return [" ".join(_after("summarize: ", t).split()[:n]) for t in data.inputs]

    return _tuned("ts", LEAD_WORDS, predict, validation, test)


def lead(validation: TaskData, test: TaskData) -> dict[str, Any]:
    """TS: the document's first N words."""
    return _scored("ts", fit_lead(validation, test), test)


def fit_constant(train: TaskData, validation: TaskData, test: TaskData) -> Fitted:
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


def constant(train: TaskData, validation: TaskData, test: TaskData) -> dict[str, Any]:
    """TS: per label, the most common first K words of its training targets (K picked on validation);
    a label unseen in training gets the overall most common."""
    return _scored("ts", fit_constant(train, validation, test), test)


def fit_all(data: Mapping[str, Mapping[str, TaskData]]) -> dict[str, dict[str, Fitted]]:
    """Every baseline of every task in `data` (`{task: {split: TaskData}}`), fitted on the task's
    training split, with its test predictions: `{task: {baseline: Fitted}}`."""
    out: dict[str, dict[str, Fitted]] = {}
    if "tc" in data:
        tc = data["tc"]
        nb = fit_naive_bayes(tc["train"], tc["validation"])
        out["tc"] = {"majority": fit_majority(tc["train"], tc["test"]),
                     "naive_bayes": Fitted(nb.alpha, nb.predict(tc["test"]), nb)}
    if "rc" in data:
        out["rc"] = {"rarest_context_word": fit_rarest_context_word(data["rc"]["train"], data["rc"]["test"])}
    if "ts" in data:
        ts = data["ts"]
        out["ts"] = {"lead": fit_lead(ts["validation"], ts["test"]),
                     "constant": fit_constant(ts["train"], ts["validation"], ts["test"])}
    return out


def trivial_baselines(data: Mapping[str, Mapping[str, TaskData]],
                      fitted: Mapping[str, Mapping[str, Fitted]] | None = None
                      ) -> dict[str, dict[str, dict[str, Any]]]:
    """Every baseline of every task present in `data` scored on the whole test split:
    `{task: {baseline: {metric: value, ..., "setting": ...}}}` (`fitted`: `fit_all(data)`, if at hand)."""
    fitted = fit_all(data) if fitted is None else fitted
    return {task: {name: _scored(task, f, data[task]["test"]) for name, f in per.items()}
            for task, per in fitted.items()}


def client_scores(data: Mapping[str, Mapping[str, TaskData]], partition,
                  fitted: Mapping[str, Mapping[str, Fitted]] | None = None
                  ) -> dict[str, dict[str, dict[int, dict[str, float]]]]:
    """The baselines scored as runs score a method, client by client: `{task: {baseline: {client:
    {metric: value}}}}`, each client on its own test examples (clients without any left out, as runs
    leave them out). Every baseline of `fit_all`, plus two for TC that use the client's own training
    labels, what a personalized method can learn from them:

    - `client_majority`: the client's most common training label for each of its examples;
    - `naive_bayes_client_prior`: naive Bayes with the word likelihoods of the whole training split
      (word counts are sums over clients: one round of federated averaging) and the class prior of
      the client's own training labels, add-one smoothed (a class it never saw keeps some mass)."""
    fitted = fit_all(data) if fitted is None else fitted
    out: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    for task, per in fitted.items():
        train, test = data[task]["train"], data[task]["test"]
        clients = [(int(c), partition.client_indices(c, "test")) for c in partition.clients_of(task)]
        clients = [(c, idx) for c, idx in clients if len(idx)]
        if not clients:
            continue
        rows = {name: {c: _score(task, [f.predictions[i] for i in idx], test.take(idx)) for c, idx in clients}
                for name, f in per.items()}
        if task == "tc":
            nb = per["naive_bayes"].model
            classes = [train.label_names.index(str(k)) for k in nb.model.classes_]
            rows["client_majority"], rows["naive_bayes_client_prior"] = {}, {}
            for c, idx in clients:
                own = np.bincount(train.labels[partition.client_indices(c)], minlength=train.num_labels)
                mine = test.take(idx)
                guess = train.label_names[own.argmax()] if own.sum() else ""
                rows["client_majority"][c] = _score("tc", [guess] * len(mine), mine)
                counts = own[classes].astype(np.float64) + 1.0
                rows["naive_bayes_client_prior"][c] = _score(
                    "tc", nb.predict(mine, np.log(counts / counts.sum())), mine)
        out[task] = rows
    return out


def client_baselines(data: Mapping[str, Mapping[str, TaskData]], partition,
                     fitted: Mapping[str, Mapping[str, Fitted]] | None = None,
                     scores: Mapping[str, Mapping[str, Mapping[int, Mapping[str, float]]]] | None = None
                     ) -> dict[str, dict[str, dict[str, float]]]:
    """`client_scores` (or `scores`, if at hand) averaged over each task's clients, unweighted as runs
    average them: `{task: {baseline: {metric: value}}}`. A partition whose clients hold unequal shares
    and few classes (the -TD settings) gets its own floor."""
    scores = client_scores(data, partition, fitted) if scores is None else scores
    return {task: {name: {m: float(np.mean([r[m] for r in per_client.values()]))
                          for m in next(iter(per_client.values()))}
                   for name, per_client in per.items()} for task, per in scores.items()}


def _entropy(labels: np.ndarray) -> float:
    """Shannon entropy (nats) of the empirical distribution of `labels` (0 for none)."""
    from scipy.stats import entropy

    return float(entropy(np.bincount(labels))) if len(labels) else 0.0


def label_skew(data: Mapping[str, Mapping[str, TaskData]], partition) -> dict[str, dict[str, float]]:
    """How much a partition skews each task's labels over its clients (the -TD settings): the entropy
    (nats) of the task's training labels and the mean over its clients of their own training labels'
    entropy."""
    out = {}
    for task in data:
        clients = partition.clients_of(task)
        train = data[task]["train"]
        out[task] = {"labels": train.num_labels, "task_entropy": _entropy(train.labels),
                     "client_entropy": float(np.mean([_entropy(train.labels[partition.client_indices(c)])
                                                      for c in clients])) if len(clients) else 0.0}
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


def client_markdown(clients: Mapping[str, Any]) -> str:
    """One row per (task, baseline) of `client_baselines` averaged over seeds: the primary metric,
    then each seed's value."""
    seeds = [str(x) for x in clients["seeds"]]
    lines = ["| task | baseline | primary metric | mean over clients | " + " | ".join(
        f"seed {x}" for x in seeds) + " |", "|---|---|---|---:|" + "---:|" * len(seeds)]
    for task, per in clients["baselines"].items():
        metric = PRIMARY_METRIC[task]
        for name, scores in per.items():
            lines.append(f"| {task} | {name} | {metric} | {scores[metric]:.1f} | " + " | ".join(
                f"{clients['by_seed'][x][task][name]:.1f}" for x in seeds) + " |")
    return "\n".join(lines) + "\n"


def run_baselines(config: str = "configs/cpu.py", overrides: Sequence[str] = (), out: str = "",
                  seeds: Sequence[int] = ()) -> dict:
    """The baselines on the data of experiment config `config` ("FILE[:ARG]", with KEY=VALUE
    `overrides`): the same examples per task a run of it trains, validates and tests on, scored on the
    whole test split (`baselines`) and as runs score (`clients`: `client_baselines` on the config's
    partition for each of `seeds`, default the config's seed, and their mean: the floor of a report over
    runs of that setting). Prints Markdown tables; writes `out/baselines.json` and `out/baselines.md`
    when given. A config that fails to load or a bad override raises `SpecError`, invalid data
    `ConfigError`, before anything is written."""

    from fedmoe_jax.experiment.build import load_task_data, make_run_partition
    from fedmoe_jax.experiment.config import SETTINGS
    from fedmoe_jax.files import write_report
    from fedmoe_jax.tools.sweeps import config_from_spec

    cfg = config_from_spec(config, overrides)
    d = cfg.data
    seeds = [int(x) for x in seeds] or [int(cfg.seed)]
    task_data = load_task_data(cfg)
    fitted = fit_all(task_data)
    by_seed, by_client, skew = {}, {}, None
    for seed in seeds:
        cfg.seed = seed
        partition = make_run_partition(cfg, task_data)
        per_client = client_scores(task_data, partition, fitted)
        by_client[str(seed)] = {task: {name: {str(c): r[PRIMARY_METRIC[task]] for c, r in rows.items()}
                                       for name, rows in per.items()} for task, per in per_client.items()}
        by_seed[str(seed)] = client_baselines(task_data, partition, scores=per_client)
        skew = skew or label_skew(task_data, partition)
    means = {task: {name: {m: float(np.mean([by_seed[str(x)][task][name][m] for x in seeds])) for m in scores}
                    for name, scores in per.items()} for task, per in by_seed[str(seeds[0])].items()}
    clients = {"setting": cfg.setting, "partition": SETTINGS[cfg.setting][1], "num_clients": d.num_clients,
               "alpha": d.alpha, "seeds": seeds, "baselines": means,
               "by_seed": {x: {task: {name: scores[PRIMARY_METRIC[task]] for name, scores in per.items()}
                               for task, per in got.items()} for x, got in by_seed.items()},
               "by_client": by_client}
    result = {"config": config, "overrides": list(overrides), "source": d.source, "data_dir": d.dir,
              "examples_per_task": {"train": d.train_examples_per_task, "eval": d.eval_examples_per_task},
              "baselines": trivial_baselines(task_data, fitted), "clients": clients,
              "label_skew": {"setting": cfg.setting, "num_clients": d.num_clients, "alpha": d.alpha,
                             "seed": seeds[0], "tasks": skew}}
    data = f"{d.source} data" + (f" from {d.dir}" if d.dir else "")
    text = markdown(result["baselines"], f"Trivial baselines, test split (`{config}`, {data})")
    text += (f"\n### Scored as runs score: `{cfg.setting}`, {d.num_clients} clients, seeds "
             f"{', '.join(map(str, seeds))}\n\nEach client on its own test examples, the mean over the "
             "task's clients, then over seeds (the floor `experiments/report.py --floor` uses for this "
             "setting); `client_majority` and `naive_bayes_client_prior` use the client's own training "
             "labels.\n\n" + client_markdown(clients))
    text += (f"\nLabel skew of the `{cfg.setting}` partition ({d.num_clients} clients, alpha {d.alpha}, "
             f"seed {seeds[0]}): training-label entropy of the task vs the mean over its clients (nats)"
             + "".join(f"; {t} {r['task_entropy']:.2f} vs {r['client_entropy']:.2f}" for t, r in skew.items())
             + ".\n")
    print(text)
    if out:
        write_report(out, "baselines", result, text)
    return result
