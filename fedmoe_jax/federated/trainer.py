"""The multi-round federated run: sample, train, aggregate, evaluate, update client states.

`FederatedTrainer` drives rounds of `make_round_step` (one compiled program per slot width) for any
`Algorithm`, validates each sampled client's own trained sub-MoE (the paper's Algorithm 1), keeps the
stacked client states, and reports per-round metrics: training loss, validation scores per task,
bytes sent down and up (the tensors actually transmitted: dense part + kept experts), and expert
counts.

Shape letters: N clients, C cohort, L MoE layers, E experts, S slots.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import optax

from fedmoe_jax.data.client_arrays import FederatedData
from fedmoe_jax.data.tasks import PRIMARY_METRIC, TASKS
from fedmoe_jax.data.tokenizer import Tokenizer
from fedmoe_jax.errors import ConfigError
from fedmoe_jax.federated.algorithm import Algorithm, CohortReport
from fedmoe_jax.federated.client import LossConfig, make_local_train, model_batch
from fedmoe_jax.federated.evaluate import make_cohort_eval, score_predictions
from fedmoe_jax.federated.loop import (
    make_personal_step,
    make_round_step,
    make_server_update,
    to_global_experts,
    update_ratio,
)
from fedmoe_jax.federated.metrics import MetricsWriter, json_row, read_metrics, weighted_means
from fedmoe_jax.federated.preemption import RunInterrupted, StopSignals
from fedmoe_jax.federated.rounds import (  # noqa: F401  (RunSettings, NonFiniteUpdate: trainer API)
    DivergedAggregate,
    NonFiniteUpdate,
    PreparedRound,
    RunSettings,
    TrainedRound,
    _field_defaults,
)
from fedmoe_jax.federated.run_checkpoint import RunCheckpointer, abstract_like
from fedmoe_jax.federated.sampling import sample_cohort
from fedmoe_jax.federated.sharding import (
    pad_clients,
    padded_cohort_size,
    place_params,
    shard_cohort,
    to_host,
)
from fedmoe_jax.federated.state import ClientStates, ServerState, check_client_state_memory
from fedmoe_jax.federated.submodel import (
    bucket_width,
    expert_slots,
    narrow_config,
    param_bytes,
)
from fedmoe_jax.models.decoding import Decoding
from fedmoe_jax.models.switch import SwitchConfig

PyTree = Any
log = logging.getLogger(__name__)
_global_update_ratio = jax.jit(update_ratio)


class FederatedTrainer:
    """Runs an `Algorithm` on `FederatedData` for a Switch Transformer, round after round."""

    def __init__(
        self,
        config: SwitchConfig,
        params: PyTree,
        data: FederatedData,
        tokenizer: Tokenizer,
        algorithm: Algorithm,
        optimizer: optax.GradientTransformation,
        settings: RunSettings,
        loss_config: LossConfig = LossConfig(),
        server_optimizer: optax.GradientTransformation | None = None,
        mesh: Any = None,
        workdir: str | None = None,
        checkpoint_every: int = 1,
        run_meta: dict[str, Any] | None = None,
        run_meta_defaults: dict[str, Any] | None = None,
        decoding: Decoding = Decoding(),
    ):
        """`decoding`: how every evaluation generates (greedy by default, or beam search).
        `workdir`: where checkpoints (`checkpoints/`), `metrics.jsonl` and TensorBoard events go;
        an existing run there is resumed (refused if `run_meta` or the data differ). `run_meta`:
        JSON fields that define the run (e.g. the model config), checked on resume;
        `run_meta_defaults`: what their fields default to (a field absent from an older checkpoint
        matches its default; the model's and the settings' dataclass defaults are added here)."""
        settings.validate(data.num_clients)
        if tokenizer.vocab_size > config.vocab_size:  # ids past the embedding table would give NaN
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary "
                              f"is {config.vocab_size}: use a model with vocab_size >= "
                              f"{tokenizer.vocab_size}, or the tokenizer the model was trained with")
        self.config, self.data, self.tokenizer = config, data, tokenizer
        self.algorithm, self.settings, self.mesh = algorithm, settings, mesh
        n = data.num_clients
        self.client_tasks = np.asarray([data.partition.task_of(c) for c in range(n)])
        self.initial_maps = algorithm.initial_expert_maps(config, n, settings.seed)
        if algorithm.client_model_copies:
            check_client_state_memory(algorithm.name, algorithm.client_model_copies, n, params)
        self.states = ClientStates.create(self.initial_maps, algorithm.init_extra(n, params),
                                          algorithm.initial_profiles(config, n))
        server_opt = server_optimizer or optax.sgd(1.0)
        self._server_init, self._server_update = make_server_update(config, server_opt)
        self.server = ServerState(params, self._server_init(params), 0, algorithm.init_server_extra(params))
        self._loss_config, self.decoding = loss_config, decoding
        self.set_local_optimizer(optimizer)  # the round program, the personal step, the fine-tuners
        self._root = jax.random.key(settings.seed)
        self.dense_bytes, self.expert_bytes = param_bytes(params, config)
        self.history: list[dict[str, Any]] = []
        self.workdir = workdir
        self._checkpointer = self._writer = None
        if workdir is not None:
            self.meta = {
                "seed": settings.seed, "method": algorithm.name, "model": config.identity(),
                "data": data.fingerprint(), "partition": data.partition.fingerprint(),
                "settings": {k: v for k, v in dataclasses.asdict(settings).items()
                             if k not in ("num_rounds", "on_nonfinite", "max_update_ratio",
                                          "memory_cap_bytes", "full_eval_every")},
                **(run_meta or {}),
            }
            self.meta_defaults = {"model": _field_defaults(SwitchConfig),
                                  "settings": _field_defaults(RunSettings), **(run_meta_defaults or {})}
            self._checkpointer = RunCheckpointer(os.path.join(workdir, "checkpoints"),
                                                 save_every=checkpoint_every)
            rows = self._resume()
            self._writer = MetricsWriter(workdir, resume_round=self.server.round, rows=rows)
            self.history = read_metrics(workdir)

    def _state(self) -> dict[str, Any]:
        return {"params": self.server.params, "opt_state": self.server.opt_state,
                "server_extra": self.server.extra, "clients": self.states}

    def _resume(self) -> list[dict[str, Any]] | None:
        """Restore the latest valid checkpoint; returns the metrics rows it holds (None: no checkpoint,
        or one written before checkpoints held their rows)."""
        restored = self._checkpointer.restore_latest(abstract_like(self._state()), self.meta,
                                                     keys=tuple(k for k in self.meta if k != "round"),
                                                     defaults=self.meta_defaults)
        if restored is None:
            return None
        round_num, state, meta = restored
        self.server = ServerState(state["params"], state["opt_state"], round_num, state["server_extra"])
        self.states = jax.tree.map(np.array, state["clients"])  # writable: `put` writes `extra` in place
        return meta.get("metrics")

    def checkpoint(self, force: bool = False) -> None:
        """Save the run state after the last finished round (every `checkpoint_every` rounds)."""
        if (self._checkpointer is not None and self.server.round > 0
                and self._checkpointer.latest_round() != self.server.round):
            # the rows so far travel with the state: metrics.jsonl is rebuilt from them on resume
            self._checkpointer.save(self.server.round, self._state(),
                                    {**self.meta, "round": self.server.round,
                                     "metrics": [json_row(row) for row in self.history]}, force=force)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        if self._writer is not None:
            self._writer.close()

    def set_decoding(self, decoding: Decoding) -> None:
        """Generate with `decoding` from now on, in rounds and evaluations (e.g. to score a finished
        run's model under several decodings; a run's own decoding is part of its config)."""
        self.decoding = decoding
        # the cohort is validated inside the round program: its trained sub-MoEs leave the device only
        # for an algorithm that needs them (at paper scale they would not fit beside the round)
        s = self.settings
        self._round_step = make_round_step(self.config, self._optimizer, self._loss_config,
                                           self.algorithm.hooks, self.mesh,
                                           return_clients=self.algorithm.needs_client_params,
                                           memory_cap=s.memory_cap_bytes,
                                           eval_max_length=self.data.target_len,
                                           max_update_ratio=s.max_update_ratio, decoding=decoding)
        self._evaluators: dict[SwitchConfig, Any] = {}

    def set_local_optimizer(self, optimizer: optax.GradientTransformation) -> None:
        """Train locally with `optimizer` from now on, in rounds and in `evaluate(local_steps=)` (e.g. to
        fine-tune a finished run's model at another learning rate; a run's own optimizer is part of its
        config and its checkpoints do not hold the clients' optimizer states, which start fresh each
        round)."""
        self._optimizer = optimizer
        if not self.algorithm.aggregates:
            s = self.settings
            self._personal_step = make_personal_step(self.config, optimizer, self._loss_config,
                                                     self.algorithm.hooks, self.mesh,
                                                     memory_cap=s.memory_cap_bytes,
                                                     max_update_ratio=s.max_update_ratio)
        self._fine_tuners: dict[SwitchConfig, Any] = {}
        self.set_decoding(self.decoding)  # rebuilds the round program with the new optimizer

    # ------------------------------------------------------------------------------------------
    def sub_moe_bytes(self, expert_maps: np.ndarray) -> np.ndarray:
        """Bytes of each client's sub-MoE `[C]` (what goes down and comes back up in a round)."""
        return self.dense_bytes + np.einsum("cle,l->c", expert_maps.astype(np.int64), self.expert_bytes)

    def _evaluator(self, valid: np.ndarray):
        """The cohort evaluation program for gathered sub-MoEs `valid [C, L, S]` (one per narrow model)."""
        narrow = narrow_config(self.config, valid)
        if narrow not in self._evaluators:
            self._evaluators[narrow] = make_cohort_eval(narrow, self.data.target_len, decoding=self.decoding)
        return self._evaluators[narrow]

    def _next_cohort(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The next round's cohort `[C]`, its expert maps `[C, L, E]` and the slots S they need."""
        s = self.settings
        cohort = sample_cohort(s.sampling, s.seed, self.server.round, self.client_tasks, s.cohort_size)
        maps = self.states.expert_maps[cohort]
        return cohort, maps, bucket_width(int(maps.sum(-1).max()), self.config.num_experts)

    def round_width(self) -> int:
        """Slots S the next round's cohort needs (its largest sub-MoE layer, bucketed)."""
        return self._next_cohort()[2]

    def validates(self, round_num: int) -> bool:
        """Whether round `round_num` (0-based) validates its cohort (`eval_every`)."""
        every = self.settings.eval_every
        return bool(every) and (round_num + 1) % every == 0

    def prepare_round(self, width: int | None = None, validate_in_round: bool = True) -> PreparedRound:
        """Host side of the next round: sample the cohort, its expert slots and batches.

        `width`: at least this many slots (a `RunGroup` trains runs of different widths together);
        padding slots are masked, and a layer's capacity follows the experts each client keeps.
        `validate_in_round`: a validating round of an aggregating algorithm gets its validation
        batches, so the round program validates the trained sub-MoEs (False: `finish_round` does).
        """
        s, r = self.settings, self.server.round
        start = time.time()
        cohort, maps, needed = self._next_cohort()
        c = len(cohort)
        width = max(width or 0, needed)
        indices, valid = (np.asarray(a) for a in expert_slots(maps, width))
        batches = self.data.cohort_batches(cohort, r, s.seed, s.batch_size, num_steps=s.local_steps)
        weights = batches["num_examples"].astype(np.float32)
        round_key = jax.random.fold_in(self._root, r)
        keys = np.stack([jax.random.key_data(jax.random.fold_in(round_key, int(k))) for k in cohort])
        extra = self.algorithm.cohort_extra(self.states, cohort, self.server.extra)

        size = padded_cohort_size(c, self.mesh)
        pad = (lambda t: pad_clients(t, size)) if size != c else (lambda t: t)
        eval_batches = None
        if validate_in_round and self.algorithm.aggregates and self.validates(r):
            eval_batches = self.data.cohort_eval_batches(cohort, s.eval_batch_size, "validation",
                                                         max_examples=s.max_eval_examples)
        cohort_args = (pad(indices), pad(valid), pad(model_batch(batches)), pad(batches["step_mask"]),
                       pad(weights), jax.random.wrap_key_data(pad(keys)),
                       None if extra is None else pad(extra),
                       None if eval_batches is None else pad(model_batch(eval_batches)))
        return PreparedRound(r, cohort, maps, width, indices, valid, weights,
                             np.asarray(batches["num_steps"]), cohort_args, size, start, eval_batches)

    def train_round(self, prep: PreparedRound) -> TrainedRound:
        """Device side of a round: train the cohort and (if the algorithm aggregates) update the server."""
        cohort_args, server_params = prep.cohort_args, self.server.params
        if self.mesh is not None:  # global arrays: every process holds the same host cohort arrays
            cohort_args = shard_cohort(cohort_args, self.mesh)
            server_params = place_params(server_params, self.config, self.mesh)
        if self.algorithm.aggregates:
            out = self._round_step(server_params, *cohort_args)
            return self.server_update(out.params, out.held, out.metrics, out.client_params, server_params,
                                      out.evaluation)
        # personal models: train the clients' own full models, no server update
        own = jax.tree.map(lambda a: np.asarray(a)[prep.cohort], self.states.extra)
        if prep.padded_size != len(prep.cohort):
            own = pad_clients(own, prep.padded_size)
        if self.mesh is not None:
            own = shard_cohort(own, self.mesh)
        clients, metrics, _ = self._personal_step(own, *cohort_args[2:4], cohort_args[5], cohort_args[6])
        return TrainedRound(self.server.params, self.server.opt_state, metrics, clients)

    def server_update(self, aggregate, held, metrics, client_params, server_params=None,
                      evaluation=None) -> TrainedRound:
        """FedOpt step from a round's aggregate (`held`: the experts it moved)."""
        params, opt_state = self._server_update(
            self.server.params if server_params is None else server_params, aggregate, held,
            self.server.opt_state)
        return TrainedRound(params, opt_state, metrics, client_params, evaluation)

    def finish_round(self, prep: PreparedRound, trained: TrainedRound) -> dict[str, Any]:
        """Validate the cohort's own models, update client and server state, log and checkpoint."""
        s, r, cohort, c = self.settings, prep.round, prep.cohort, len(prep.cohort)
        server_extra = self.server.extra
        metrics = to_host(trained.metrics)
        finite = np.asarray(metrics["finite"])[:c] > 0  # aggregated: not diverged (`exclude_diverged`)
        ratios = np.asarray(metrics["update_ratio"])[:c]
        nonfinite = cohort[~finite & ~np.isfinite(ratios)].tolist()
        exploding = cohort[~finite & np.isfinite(ratios)].tolist()
        if not finite.all() and (s.on_nonfinite == "stop" or not finite.any()):
            raise NonFiniteUpdate(r + 1, nonfinite, exploding, every=not finite.any(),
                                  max_update_ratio=s.max_update_ratio)
        if self.algorithm.aggregates:
            self._check_aggregate(r, trained.params)
        client_params = jax.tree.map(lambda a: a[:c], trained.client_params)  # drop padding clients
        if jax.process_count() > 1:  # evaluation below runs on each process's local devices
            client_params = to_host(client_params)
        train_loss = np.where(finite, np.asarray(metrics["loss"])[:c], np.nan)  # inf -> NaN: ignored

        val_scores = np.full(c, np.nan, np.float32)
        val_probs = np.zeros(prep.maps.shape, np.float32)
        val_metrics: list[dict[str, float]] = [{} for _ in range(c)]
        if self.validates(r) and trained.evaluation is not None:  # validated inside the round
            loss, stats, tokens = jax.tree.map(lambda a: a[:c], to_host(trained.evaluation))
            val_scores, val_probs, val_metrics = self._score(cohort, prep.eval_batches, loss, stats, tokens,
                                                             prep.indices, prep.valid)
        elif self.validates(r):
            if client_params is None:
                raise ValueError("this round was prepared with validate_in_round=False, but the trainer's "
                                 "round program does not return the trained sub-MoEs to validate")
            val_scores, val_probs, val_metrics = self._validate(cohort, client_params, prep.indices,
                                                                prep.valid)
        report = CohortReport(r, cohort, train_loss, prep.weights, val_scores, val_probs,
                              client_params if self.algorithm.needs_client_params else None,
                              prep.num_steps,
                              np.asarray([m.get("loss", np.nan) for m in val_metrics], np.float32))
        self.states = self.algorithm.update_clients(self.states, report)
        self.server = ServerState(trained.params, trained.opt_state, r + 1,
                                  self.algorithm.update_server(server_extra, report, trained.params))
        row = self._metrics_row(r, cohort, prep.maps, train_loss, prep.weights, val_scores, val_metrics,
                                time.time() - prep.start, metrics)
        if nonfinite:
            row["nonfinite_clients"] = nonfinite
        if exploding:
            row["exploding_clients"] = exploding
        bad_val = [int(k) for k, m in zip(cohort, val_metrics) if not np.isfinite(m.get("loss", 0.0))]
        if bad_val:  # a model kept by the guards that still validates to NaN/inf: said, never hidden
            row["nonfinite_validation"] = bad_val
            log.warning("round %d: client(s) %s validate to a NaN/inf loss", r + 1,
                        ", ".join(map(str, bad_val)))
        row.update(self.algorithm.round_log())
        if s.full_eval_every and ((r + 1) % s.full_eval_every == 0 or r + 1 == s.num_rounds):
            row.update(self.validate_all())
        self.history.append(row)
        if self._writer is not None:
            self._writer.write(row)
        self.checkpoint()
        return row

    def _check_aggregate(self, r: int, new_params: PyTree) -> None:
        """`DivergedAggregate` when the round's new global model holds NaN/inf or moved by more than
        `max_update_ratio` times the model before it (`update_ratio`); nothing is committed then."""
        ratio = float(_global_update_ratio(new_params, self.server.params))
        limit = self.settings.max_update_ratio
        if not np.isfinite(ratio) or (limit > 0 and ratio > limit):
            raise DivergedAggregate(r + 1, ratio, limit)

    def run_round(self) -> dict[str, Any]:
        """One round; returns its metrics row (also appended to `history`)."""
        prep = self.prepare_round()
        return self.finish_round(prep, self.train_round(prep))

    def _validate(self, cohort, client_params, indices, valid, split="validation",
                  max_examples=None, batch_size=None, keep=0):
        s = self.settings
        max_examples = s.max_eval_examples if split == "validation" else max_examples
        batches = self.data.cohort_eval_batches(cohort, batch_size or s.eval_batch_size, split,
                                                max_examples=max_examples)
        loss, stats, tokens = self._evaluator(valid)(client_params, batches, valid)
        return self._score(cohort, batches, loss, stats, tokens, indices, valid, keep, split)

    def _score(self, cohort, batches, loss, stats, tokens, indices, valid, keep=0, split="validation"):
        """Scores `[C]`, activation probabilities `[C, L, E]` and per-client metrics of an evaluation
        `(loss [C], stats [C, L, S], tokens)` of the cohort on `batches`."""
        s = self.settings
        stats = to_global_experts(stats, indices, valid, self.config.num_experts)
        probs = np.asarray(stats.activation_probs, np.float32)
        tasks = [self.data.partition.task_of(int(k)) for k in cohort]
        refs = [self._references(t, split) for t in tasks]
        results = score_predictions(self.tokenizer, np.asarray(tokens), batches["example_ids"], tasks,
                                    refs, keep, clients=cohort, seed=s.seed)
        for res, lv in zip(results, np.asarray(loss)):
            res["loss"] = float(lv)
        scores = np.asarray([res["score"] for res in results], np.float32)
        return scores, probs, results

    def validate_all(self) -> dict[str, float]:
        """Every client's own model on its validation data (as `evaluate`, the cohort's example cap):
        `full_val_score` (mean over clients) and `full_val_score_<task>` (mean over the task's clients)."""
        result = self.evaluate("validation", batch_size=self.settings.eval_batch_size)
        scores = {k: r["score"] for k, r in result["clients"].items() if not np.isnan(r["score"])}
        out = {}
        if scores:
            out["full_val_score"] = float(np.mean(list(scores.values())))
        for task in TASKS:
            mine = [v for k, v in scores.items() if self.data.partition.task_of(k) == task]
            if mine:
                out[f"full_val_score_{task}"] = float(np.mean(mine))
        return out

    def _references(self, task: str, split: str = "validation"):
        data = self.data.data[task][split]
        return lambda ids: [data.references[int(i)] for i in ids]

    def evaluate(self, split: str = "test", clients: np.ndarray | None = None, chunk: int = 8,
                 max_examples: int | None = None, batch_size: int | None = None,
                 model: str = "own", local_steps: int = 0, predictions: int = 0) -> dict[str, Any]:
        """Evaluation on each client's own `split`; per-client metrics and the mean score per task.

        `model="own"` (the paper's personalized metric): the client's sub-MoE of the current global model
        (or its own model for `LocalOnly`); `model="global"`: the full global model for every client.
        `local_steps > 0` first fine-tunes each client's model that many steps on its training data
        (for clients never sampled during training: unseen-client evaluation). Clients are evaluated
        `chunk` at a time. Sub-MoEs of the global model are gathered and validated inside one program
        (`round_step.evaluate`; fine-tuned first by the round program with zero aggregation weights),
        in the sub-cohorts the memory cap allows, so no chunk of gathered models is materialized.
        `predictions > 0` keeps that many decoded examples per client (`clients[k]["examples"]`, see
        `score_predictions`).
        """
        if model not in ("own", "global"):
            raise ValueError(f"model={model!r}; use 'own' or 'global'")
        ids = np.arange(self.data.num_clients) if clients is None else np.asarray(clients)
        per_client: dict[int, dict[str, float]] = {}
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            maps = self.states.expert_maps[part]
            if model == "global":
                maps = np.ones_like(maps)
            width = bucket_width(int(maps.sum(-1).max()), self.config.num_experts)
            indices, valid = (np.asarray(a) for a in expert_slots(maps, width))
            if self.algorithm.aggregates or model == "global":
                results = self._evaluate_submodels(part, indices, valid, split, max_examples, batch_size,
                                                   local_steps, predictions)
            else:  # personal full models (all experts held: the slot layout is the identity)
                narrow = jax.tree.map(lambda a, part=part: np.asarray(a)[part], self.states.extra)
                if local_steps > 0:
                    narrow = self._fine_tune(part, narrow, valid, local_steps)
                _, _, results = self._validate(part, narrow, indices, valid, split, max_examples,
                                               batch_size, predictions)
            per_client.update({int(k): res for k, res in zip(part, results)})
        out: dict[str, Any] = {"split": split, "clients": per_client}
        for task in TASKS:
            scores = [r["score"] for k, r in per_client.items()
                      if self.data.partition.task_of(k) == task and not np.isnan(r["score"])]
            if scores:
                out[f"{task}_{PRIMARY_METRIC[task]}"] = float(np.mean(scores))
        return out

    def _evaluate_submodels(self, clients, indices, valid, split, max_examples, batch_size, local_steps,
                            keep) -> list[dict[str, Any]]:
        """`clients`' sub-MoEs `indices / valid [C, L, S]` of the global model validated on `split` by the
        round step's evaluation program; with `local_steps`, fine-tuned first (as `_fine_tune`) by the
        round program itself with zero weights, so nothing is aggregated."""
        s, c = self.settings, len(clients)
        max_examples = s.max_eval_examples if split == "validation" else max_examples
        eval_batches = self.data.cohort_eval_batches(clients, batch_size or s.eval_batch_size, split,
                                                     max_examples=max_examples)
        size = padded_cohort_size(c, self.mesh)
        pad = (lambda t: pad_clients(t, size)) if size != c else (lambda t: t)
        args = (pad(indices), pad(valid))
        if local_steps > 0:  # the round's training inputs, with zero aggregation weights
            batches, keys, extra = self._fine_tune_inputs(clients, local_steps)
            args += (pad(model_batch(batches)), pad(batches["step_mask"]), np.zeros(size, np.float32),
                     jax.random.wrap_key_data(pad(jax.random.key_data(keys))),
                     None if extra is None else pad(extra))
        args += (pad(model_batch(eval_batches)),)
        params = self.server.params
        if self.mesh is not None:
            args = shard_cohort(args, self.mesh)
            params = place_params(params, self.config, self.mesh)
        evaluation = (self._round_step(params, *args).evaluation if local_steps > 0
                      else self._round_step.evaluate(params, *args))
        loss, stats, tokens = jax.tree.map(lambda a: a[:c], to_host(evaluation))
        return self._score(clients, eval_batches, loss, stats, tokens, indices, valid, keep, split)[2]

    def _fine_tune_inputs(self, clients, steps):
        """Fine-tuning's training batches (round 0 of the seed + 1 stream: seed-only order), per-client
        keys `[C]` and the algorithm's `local_extra` (SCAFFOLD: the drift corrections c - c_i)."""
        s = self.settings
        batches = self.data.cohort_batches(clients, 0, s.seed + 1, s.batch_size, num_steps=steps)
        keys = jax.random.wrap_key_data(np.stack([
            jax.random.key_data(jax.random.fold_in(jax.random.key(s.seed + 1), int(k))) for k in clients]))
        return batches, keys, self.algorithm.local_extra(self.states, clients, self.server.extra)

    def _fine_tune(self, clients, params, valid, steps):
        """A few local steps on each client's training data (`_fine_tune_inputs`), outside a round."""
        narrow = narrow_config(self.config, valid)
        if narrow not in self._fine_tuners:
            local = make_local_train(narrow, self._optimizer, self._loss_config, self.algorithm.hooks)
            self._fine_tuners[narrow] = jax.jit(jax.vmap(local))
        batches, keys, extra = self._fine_tune_inputs(clients, steps)
        tuned, _, _ = self._fine_tuners[narrow](params, model_batch(batches), batches["step_mask"], valid,
                                                keys, extra)
        return tuned

    def summary(self, memory: Any = None, test: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run-level numbers as the paper reports them (the paper's reported metrics, Table 1-2).

        Communication per client transfer in GiB (fp32 tensors actually sent), expert totals at the
        start and now (mean / min / max over clients), with a `MemoryModel` the peak training memory
        per client (GB: the largest of its start map and every map it trained with, from the rows'
        `layer_expert_counts`, so trial maps count and resume keeps it; a client never sampled: the
        larger of its start and current map), with the algorithm's `state_copies` (FedProx's anchor,
        SCAFFOLD's controls), and the per-task scores of a `test` result from `evaluate`.
        """
        sent = [b for row in self.history for b in row["bytes_down"]]
        start, now = self.initial_maps.sum((1, 2)), self.states.expert_counts()
        out: dict[str, Any] = {
            "method": self.algorithm.name,
            "rounds": self.server.round,
            "comm_gib_per_transfer": float(np.mean(sent)) / 2**30 if sent else None,
            "experts_start": {"mean": float(start.mean()), "min": int(start.min()), "max": int(start.max())},
            "experts_end": {"mean": float(now.mean()), "min": int(now.min()), "max": int(now.max())},
        }
        if memory is not None:
            copies = self.algorithm.state_copies
            # fallback (never sampled, or rows written before `layer_expert_counts`): start and now
            peak = [max(memory.submodel_bytes(a, copies), memory.submodel_bytes(b, copies)) / 1e9
                    for a, b in zip(self.initial_maps, self.states.expert_maps)]
            trained: dict[int, float] = {}  # client -> bytes of the largest map it trained with
            for row in self.history:
                for k, counts in zip(row["cohort"], row.get("layer_expert_counts", ())):
                    trained[k] = max(trained.get(k, 0.0), memory.counts_bytes(counts, copies))
            for k, b in trained.items():
                peak[k] = max(memory.submodel_bytes(self.initial_maps[k], copies), b) / 1e9
            out["peak_memory_gb"] = {"mean": float(np.mean(peak)), "max": float(np.max(peak))}
        if test is not None:
            out["test"] = {k: v for k, v in test.items() if k not in ("clients", "split")}
        return out

    def unseen_clients(self) -> np.ndarray:
        """Clients never sampled so far `[M]`."""
        return np.flatnonzero(self.states.participations == 0)

    def _metrics_row(self, r, cohort, maps, train_loss, weights, val_scores, val_metrics, seconds,
                     metrics=None):
        """The round's row of `metrics.jsonl`. Per cohort member: `layer_expert_counts [C][L]` (the
        map it trained with; `summary`'s peak memory) and, from the round's `metrics` (`routing_counts`),
        `client_dropped_fraction`: real token-choices dropped by capacity / routed, over its local
        steps and all MoE layers; `dropped_fraction`: the same over the cohort (token-weighted);
        `client_update_ratio`: the size of its update over the model it received (`update_ratio`)."""
        sent = self.sub_moe_bytes(maps) * self.algorithm.comm_multiplier
        tasks = [self.data.partition.task_of(int(k)) for k in cohort]
        loss_means = weighted_means(train_loss, weights)
        score_means = weighted_means(val_scores, weights)
        row: dict[str, Any] = {
            "round": r + 1,
            "cohort": cohort.tolist(),
            "train_loss": loss_means["example_weighted"],
            "train_loss_client_mean": loss_means["client_weighted"],
            "client_train_loss": [None if np.isnan(x) else float(x) for x in train_loss],
            "client_val_score": [None if np.isnan(x) else float(x) for x in val_scores],
            "client_val": val_metrics,
            "bytes_down": [int(b) for b in sent],
            "bytes_up": [int(b) for b in sent],
            "expert_counts": [int(n) for n in maps.sum((1, 2))],
            "layer_expert_counts": maps.sum(-1).astype(int).tolist(),
            # Table 2 of the paper: expert totals over all clients after this round
            "expert_count_mean": float(self.states.expert_counts().mean()),
            "expert_count_min": int(self.states.expert_counts().min()),
            "expert_count_max": int(self.states.expert_counts().max()),
            "seconds": round(seconds, 3),
        }
        if metrics is not None and "routed" in metrics:
            c = len(cohort)
            routed = np.asarray(metrics["routed"], np.float64)[:c]
            dropped = np.asarray(metrics["dropped"], np.float64)[:c]
            row["dropped_fraction"] = float(dropped.sum() / max(routed.sum(), 1.0))
            row["client_dropped_fraction"] = (dropped / np.maximum(routed, 1.0)).tolist()
        if metrics is not None and "update_ratio" in metrics:  # `loop.update_ratio`; null: non-finite
            ratios = np.asarray(metrics["update_ratio"], np.float64)[:len(cohort)]
            row["client_update_ratio"] = [float(x) if np.isfinite(x) else None for x in ratios]
        if not np.isnan(score_means["client_weighted"]):
            row["val_score"] = score_means["example_weighted"]
            row["val_score_client_mean"] = score_means["client_weighted"]
        for task in TASKS:
            scores = [v for v, t in zip(val_scores, tasks) if t == task and not np.isnan(v)]
            if scores:
                row[f"val_score_{task}"] = float(np.mean(scores))
        return row

    def stop_if_requested(self, stop: StopSignals | None) -> None:
        """After a signal (`stop.requested`): checkpoint the last finished round, raise `RunInterrupted`."""
        if stop is None or stop.requested is None:
            return
        self.checkpoint(force=True)
        raise RunInterrupted(stop.requested, self.server.round, self.checkpoint_dir)

    @property
    def checkpoint_dir(self) -> str | None:
        """Where the run's checkpoints go (None without a workdir)."""
        return None if self._checkpointer is None else self._checkpointer.directory

    def run(self, num_rounds: int | None = None, progress: bool = True,
            stop: StopSignals | None = None) -> list[dict[str, Any]]:
        """Run until `num_rounds` rounds are done in total (default: `settings.num_rounds`).

        `stop`: an active `StopSignals`; once it holds a request, the run checkpoints and raises
        `RunInterrupted` at the next round boundary."""
        from tqdm import tqdm

        target = self.settings.num_rounds if num_rounds is None else num_rounds
        with tqdm(total=target, initial=self.server.round, desc=self.algorithm.name, unit="round",
                  disable=not progress) as bar:
            if self.server.round < target:
                say_compiling(bar, self.server.round + 1)
            while self.server.round < target:
                self.stop_if_requested(stop)
                row = self.run_round()
                bar.update(1)
                postfix = {"loss": f"{row['train_loss']:.3f}"}
                if "val_score" in row:
                    postfix["val"] = f"{row['val_score']:.3f}"
                bar.set_postfix(postfix)
        self.checkpoint(force=True)
        return self.history


def say_compiling(bar, round_num: int) -> None:
    """Say, on the progress bar and in the log, that the first round of an invocation compiles its
    programs (its wait is not a hang; later rounds of the same sub-MoE width reuse them)."""
    message = "compiling the round program (once per sub-MoE width; kept in the compilation cache)"
    log.info("round %d: %s", round_num, message)
    bar.set_postfix_str(message)


__all__ = ["DivergedAggregate", "FederatedTrainer", "NonFiniteUpdate", "PreparedRound", "RunSettings",
           "TrainedRound", "say_compiling"]
