"""Evaluation of a cohort's sub-MoEs on their own validation (or test) data, vectorized.

Per client: a teacher-forced pass gives the loss and the routing statistics (the activation
probabilities p[L, E] that FedMoE's Stage 1 and expert recommendation use, padding excluded), and
greedy or beam decoding with the KV cache (`Decoding`) gives predictions scored with the task's metric
(`fedmoe_jax.data.tasks.task_scores`). The model work is one jitted program per slot width, vmapped
over clients; only detokenisation and text metrics run in Python.

Shape letters: C cohort, K eval steps, B batch, S input / T target tokens, L MoE layers, E slots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedmoe_jax.data.tasks import PRIMARY_METRIC, task_scores
from fedmoe_jax.data.tokenizer import Tokenizer
from fedmoe_jax.federated.client import model_batch
from fedmoe_jax.federated.model import FederatedModel, as_federated_model
from fedmoe_jax.models.decoding import Decoding
from fedmoe_jax.models.switch import SwitchConfig

Array = jax.Array


def client_eval_fn(model: FederatedModel | SwitchConfig, max_length: int, decode: bool = True,
                   decoding: Decoding | None = None) -> Callable[..., tuple]:
    """One client, unjitted: `(params, batches [K, B, ..], valid [L, E]) -> (loss, stats [L, ..],
    tokens [K, B, T'] or None)` from `model.evaluate` on each batch; see `make_cohort_eval`.
    `decoding` (a `SwitchConfig` model only): greedy (None) or beam search."""
    model = as_federated_model(model, decoding=decoding)

    def one_client(params, batches, valid):
        def step(_, batch):
            loss_sum, n_tokens, routing, tokens = model.evaluate(params, batch, valid,
                                                                 max_length if decode else 0)
            return None, (loss_sum, n_tokens, routing, tokens)

        _, (loss_sum, n_tokens, stats, tokens) = jax.lax.scan(step, None, batches)
        loss = loss_sum.sum() / jnp.maximum(n_tokens.sum(), 1.0)
        return loss, stats.total(), tokens

    return one_client


def make_cohort_eval(model: FederatedModel | SwitchConfig, max_length: int, decode: bool = True,
                     decoding: Decoding | None = None) -> Callable[..., tuple]:
    """`(params [C,..], batches [C, K, B, ..], valid [C, L, E]) -> (loss [C], stats, tokens)`.

    `model` is the narrow model (E = slots). `tokens` are the predictions `[C, K, B, T']` of
    `decoding` (greedy by default) with `T' = max_length` (None with `decode=False`); `stats` sums
    routing statistics over real examples `[C, L, ...]`.
    """
    one_client = client_eval_fn(model, max_length, decode, decoding)
    cohort_eval = jax.jit(jax.vmap(one_client))

    def evaluate(params, batches, valid):
        return cohort_eval(params, model_batch(batches), valid)

    return evaluate


def score_predictions(
    tokenizer: Tokenizer,
    tokens: np.ndarray,
    example_ids: np.ndarray,
    tasks: Sequence[str],
    references: Sequence[Callable[[np.ndarray], list[list[str]]]],
    keep: int = 0,
    clients: Sequence[int] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Task metrics per client from predicted tokens `[C, K, B, T]` and `example_ids [C, K, B]`.

    `references[c](ids)` returns the reference lists of client c's examples `ids`. Each result holds
    every metric of the task plus `score`, the task's primary metric (the paper's Algorithm 1 "acc"),
    and with `keep > 0` `examples`: `keep` of the client's examples drawn at random by
    `np.random.default_rng([seed, client])` (`clients [C]` the client ids, default 0..C-1; the same
    examples whatever the method or model), in id order, as `{"id", "prediction", "references"}`.
    """
    results = []
    for c, task in enumerate(tasks):
        ids = np.asarray(example_ids[c]).reshape(-1)
        real = ids >= 0
        if not real.any():
            results.append({"score": float("nan")})
            continue
        flat = np.asarray(tokens[c]).reshape(-1, tokens.shape[-1])[real]
        predictions = tokenizer.decode(flat)
        refs = references[c](ids[real])
        scores: dict[str, Any] = task_scores(task, predictions, refs)
        scores["score"] = scores[PRIMARY_METRIC[task]]
        if keep > 0:
            real_ids = ids[real]
            client = c if clients is None else int(clients[c])
            rng = np.random.default_rng([seed, client])
            picked = rng.choice(len(real_ids), min(keep, len(real_ids)), replace=False)
            picked = picked[np.argsort(real_ids[picked], kind="stable")]
            scores["examples"] = [{"id": int(real_ids[j]), "prediction": predictions[j],
                                   "references": list(refs[j])} for j in picked]
        results.append(scores)
    return results
