"""Stage 2: global expert recommendation (the paper's Algorithm 1) and the FedMoE algorithm.

`cosine_similarity` (Eq. 4), `reference_set` (Eq. 5), `estimated_importance` (Eq. 6) and `recommend`
(the add / remove decision of Algorithm 1) are pure functions; `FedMoE` applies them after each round.

Shape letters: N clients, L MoE layers, E experts per layer, K reference clients.
"""

from __future__ import annotations

import numpy as np

from fedmoe_jax.federated.algorithm import Algorithm, CohortReport, improves, record_report
from fedmoe_jax.federated.state import ClientStates


def cosine_similarity(p_k: np.ndarray, p_others: np.ndarray) -> np.ndarray:
    """Eq. 4: cosine of flattened `[L, E]` profiles; `p_others [M, L, E]` -> `[M]` (0 for zero vectors)."""
    a = np.asarray(p_k, np.float64).reshape(-1)
    b = np.asarray(p_others, np.float64).reshape(len(p_others), -1)
    norms = np.linalg.norm(b, axis=1) * np.linalg.norm(a)
    return np.divide(b @ a, norms, out=np.zeros(len(b)), where=norms > 0)


def reference_set(similarity: np.ndarray, client: int, k: int,
                  candidates: np.ndarray | None = None) -> np.ndarray:
    """Eq. 5: the K most similar other clients (ties by lower id); `similarity [N]` to `client`.

    `candidates <bool>[N]`: the clients that may be references (those with an activation profile);
    fewer than K candidates give a shorter set, none an empty one.
    """
    n = len(similarity)
    if not 1 <= k <= n - 1:
        raise ValueError(f"K={k} reference clients must be between 1 and N-1={n - 1}")
    allowed = np.ones(n, bool) if candidates is None else np.asarray(candidates, bool)
    others = np.array([a for a in range(n) if a != client and allowed[a]], np.int64)
    order = np.lexsort((others, -np.asarray(similarity)[others]))
    return others[order[:k]]


def estimated_importance(similarity: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Eq. 6: `p_hat = sum_a sim_a p^(a) / sum_a sim_a` over the reference set; `[K]`, `[K, L, E]`."""
    s = np.asarray(similarity, np.float64)
    p = np.asarray(probs, np.float64)
    total = s.sum()
    if total <= 0:
        return p.mean(0)  # no similar profile: fall back to the plain mean of the reference set
    return np.tensordot(s, p, axes=1) / total


def recommend(mask: np.ndarray, p_hat: np.ndarray, target_count: float,
              min_experts_per_layer: int = 1, max_count: int | None = None) -> np.ndarray:
    """Algorithm 1's adjustment: move the expert count towards `target_count` (the reference mean).

    n = round(target_count) - count. n > 0: add the n absent experts of highest p_hat (all layers
    ranked together); n < 0: remove the |n| present experts of lowest p_hat without going below
    `min_experts_per_layer` in any layer. `max_count` caps growth (the memory budget). Ties: lower
    layer, then lower expert index. Returns the new mask `<bool>[L, E]`.
    """
    mask = np.asarray(mask, bool).copy()
    p_hat = np.asarray(p_hat, np.float64)
    count = int(mask.sum())
    target = int(np.floor(target_count + 0.5))
    if max_count is not None:
        target = min(target, max_count)
    n = target - count
    if n > 0:
        candidates = np.flatnonzero(~mask.reshape(-1))
        ranked = candidates[np.lexsort((candidates, -p_hat.reshape(-1)[candidates]))]
        mask.reshape(-1)[ranked[:n]] = True
    elif n < 0:
        candidates = np.flatnonzero(mask.reshape(-1))
        ranked = candidates[np.lexsort((candidates, p_hat.reshape(-1)[candidates]))]
        per_layer = mask.sum(-1)
        removed = 0
        for idx in ranked:
            if removed == -n:
                break
            layer = idx // mask.shape[1]
            if per_layer[layer] > min_experts_per_layer:
                mask.reshape(-1)[idx] = False
                per_layer[layer] -= 1
                removed += 1
    return mask


# ----------------------------------------------------------------------------------------------
# Stage 2 as an Algorithm on the engine
# ----------------------------------------------------------------------------------------------



class FedMoE(Algorithm):
    """Stage 2 of FedMoE (the paper's Algorithm 1) from given initial sub-MoEs (Stage 1's output).

    After a client's validation score has not improved over its best for `patience` of its rounds,
    its structure is adjusted towards its `num_references` most similar clients (Eq. 4-6,
    `recommend`). The adjustment is a trial: the next time the client is evaluated, it is kept if
    the score beats the best before the trial, else the previous map is restored and the client's
    structure is frozen for good. Growth is capped per client by `max_experts`: what its whole
    memory budget M holds (Stage 1 fills `alpha * M`, leaving the rest for Stage 2 to grow into).

    Profiles: `initial_probs [N, L, E]` (Stage 1's p, measured or predicted) seed every client's
    activation profile; later evaluations replace it. A client without a profile (all zero, e.g.
    never evaluated in the "w/o Stage 1" ablation) is never a reference.
    With `loss_tie_break` (ours, see `base.improves`), an equal score at a lower validation loss also
    counts as an improvement, both for the patience counter and for accepting a trial.
    """

    name = "fedmoe"

    def __init__(self, initial_maps: np.ndarray, patience: int = 2, num_references: int = 3,
                 min_experts_per_layer: int = 1, max_experts: np.ndarray | None = None,
                 adjust: bool = True, loss_tie_break: bool = False,
                 initial_probs: np.ndarray | None = None):
        maps = np.asarray(initial_maps, bool)
        if maps.ndim != 3:
            raise ValueError(f"initial_maps must be [N, L, E], got shape {maps.shape}")
        if patience < 1:
            raise ValueError(f"patience={patience} must be >= 1")
        if not 1 <= num_references <= maps.shape[0] - 1:
            raise ValueError(f"num_references={num_references} must be between 1 and N-1={maps.shape[0] - 1}")
        if initial_probs is not None and np.shape(initial_probs) != maps.shape:
            raise ValueError(f"initial_probs has shape {np.shape(initial_probs)}; expected {maps.shape} "
                             "like initial_maps (N, L, E)")
        self.initial_maps = maps
        self.initial_probs = None if initial_probs is None else np.asarray(initial_probs, np.float32)
        self.patience, self.num_references = patience, num_references
        self.min_experts_per_layer = min_experts_per_layer
        self.max_experts = None if max_experts is None else np.asarray(max_experts, np.int64)
        self.adjust = adjust  # False: the "w/o stage 2" ablation (maps stay fixed)
        self.loss_tie_break = loss_tie_break
        self.events: list[dict] = []  # adjustments, acceptances, rollbacks (also in the metrics)

    def initial_expert_maps(self, config, num_clients, seed):
        if self.initial_maps.shape != (num_clients, config.num_moe_layers, config.num_experts):
            raise ValueError(
                f"initial_maps has shape {self.initial_maps.shape}; expected "
                f"{(num_clients, config.num_moe_layers, config.num_experts)} (N, L, E)"
            )
        return self.initial_maps.copy()

    def initial_profiles(self, config, num_clients):
        return None if self.initial_probs is None else self.initial_probs.copy()

    def init_extra(self, num_clients, params):
        n = num_clients
        return {
            "previous_maps": self.initial_maps.copy(),  # the map before a pending trial
            "on_trial": np.zeros(n, bool),
            "best_before_trial": np.full(n, -np.inf, np.float32),
            "best_loss_before_trial": np.full(n, np.inf, np.float32),
        }

    def update_clients(self, states: ClientStates, report: CohortReport) -> ClientStates:
        states = record_report(states, report, self.loss_tie_break)
        if not self.adjust:
            return states
        maps = states.expert_maps.copy()
        frozen = states.frozen.copy()
        extra = {k: v.copy() for k, v in states.extra.items()}
        for i, k in enumerate(report.cohort):
            score = report.val_scores[i]
            loss = np.nan if report.val_losses is None else report.val_losses[i]
            if np.isnan(score):
                continue
            if extra["on_trial"][k]:
                extra["on_trial"][k] = False
                if improves(score, loss, extra["best_before_trial"][k],
                            extra["best_loss_before_trial"][k], self.loss_tie_break):
                    self.events.append({"round": report.round, "client": int(k), "event": "accept"})
                else:
                    maps[k] = extra["previous_maps"][k]
                    frozen[k] = True
                    self.events.append({"round": report.round, "client": int(k), "event": "rollback"})
                continue
            if frozen[k] or states.stale_rounds[k] < self.patience:
                continue
            new = self._adjusted_map(k, maps, states.probs)
            if not np.array_equal(new, maps[k]):
                extra["previous_maps"][k] = maps[k]
                extra["on_trial"][k] = True
                extra["best_before_trial"][k] = states.best_score[k]  # includes this round's
                extra["best_loss_before_trial"][k] = states.best_loss[k]
                self.events.append({"round": report.round, "client": int(k), "event": "adjust",
                                    "from": int(maps[k].sum()), "to": int(new.sum())})
                maps[k] = new
        return states.replace(expert_maps=maps, frozen=frozen, extra=extra)

    def round_log(self) -> dict:
        """`events`: the round's adjustments, acceptances and rollbacks (none: no field)."""
        events, self.events = self.events, []
        return {"events": events} if events else {}

    def summary_fields(self, history: list[dict]) -> dict:
        """`recommendation`: how many adjustments, acceptances and rollbacks the run made."""
        events = [ev for row in history for ev in row.get("events", [])]
        return {"recommendation": {k: sum(ev["event"] == k for ev in events)
                                   for k in ("adjust", "accept", "rollback")}}

    def _adjusted_map(self, k: int, maps: np.ndarray, probs: np.ndarray) -> np.ndarray:
        sims = cosine_similarity(probs[k], probs)
        refs = reference_set(sims, k, self.num_references, candidates=probs.reshape(len(probs), -1).any(-1))
        if len(refs) == 0:
            return maps[k]
        p_hat = estimated_importance(sims[refs], probs[refs])
        target = maps[refs].sum((1, 2)).mean()
        cap = None if self.max_experts is None else int(self.max_experts[k])
        return recommend(maps[k], p_hat, target, self.min_experts_per_layer, cap)
