"""The paper's baselines as small algorithms on the engine (our defaults where it is silent).

- `RandomMoE`: a fixed random subset of experts per layer per client, modular aggregation.
- `FedProx` (Li et al. 2020): all experts, local loss + mu/2 ||w - w_received||^2.
- `SCAFFOLD` (Karimireddy et al. 2020, option II): all experts, control variates c (server) and
  c_i (clients), local gradients corrected by c - c_i; sends twice the model (`comm_multiplier`).

Shape letters: N clients, C cohort, L MoE layers, E experts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedmoe_jax.federated.algorithm import Algorithm, CohortReport, LocalHooks, record_report
from fedmoe_jax.federated.state import ClientStates
from fedmoe_jax.federated.submodel import bucket_width, expert_slots
from fedmoe_jax.models.switch import SwitchConfig

PyTree = Any


class RandomMoE(Algorithm):
    """randomMoE: client k keeps `experts_per_layer` experts per layer drawn once from
    `np.random.default_rng([seed, k])`; the engine's modular aggregation."""

    name = "random_moe"
    comm_multiplier = 1

    def __init__(self, experts_per_layer: int = 8):
        if experts_per_layer < 1:
            raise ValueError(f"experts_per_layer={experts_per_layer} must be >= 1")
        self.experts_per_layer = int(experts_per_layer)

    def initial_expert_maps(self, config: SwitchConfig, num_clients: int, seed: int) -> np.ndarray:
        """`<bool>[N, L, E]`, exactly `experts_per_layer` True per layer."""
        e, n_layers = config.num_experts, config.num_moe_layers
        if self.experts_per_layer > e:
            raise ValueError(f"experts_per_layer={self.experts_per_layer} exceeds num_experts={e}")
        maps = np.zeros((num_clients, n_layers, e), bool)
        for k in range(num_clients):
            rng = np.random.default_rng([seed, k])
            for layer in range(n_layers):
                maps[k, layer, rng.choice(e, self.experts_per_layer, replace=False)] = True
        return maps


def proximal_term(params: PyTree, anchor: PyTree, mu: float) -> jax.Array:
    """`mu/2 * sum ||params - anchor||^2` over all leaves (float32)."""
    sq = [jnp.sum(jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32)))
          for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(anchor))]
    return 0.5 * mu * sum(sq, jnp.zeros((), jnp.float32))


class FedProx(Algorithm):
    """FedProx on the full MoE: local loss + mu/2 ||w - w_received||^2 (mu=0: FedAvg)."""

    name = "fedprox"
    comm_multiplier = 1
    state_copies = 1  # the anchor w_received of the proximal term

    def __init__(self, mu: float = 0.01):
        if mu < 0:
            raise ValueError(f"mu={mu} must be >= 0")
        self.mu = float(mu)
        mu = self.mu
        self.hooks = LocalHooks(loss_term=lambda params, anchor, extra: proximal_term(params, anchor, mu))


def _check_identity_layout(expert_maps: np.ndarray) -> None:
    """All experts held and slot width E, so the gathered sub-MoE's layout is the global one."""
    maps = np.asarray(expert_maps, bool)
    e = maps.shape[-1]
    if not maps.all():
        raise ValueError("SCAFFOLD needs every client to hold every expert (controls are full-model "
                         "pytrees); got an expert map with missing experts")
    width = bucket_width(int(maps.sum(-1).max()), e)
    indices, valid = (np.asarray(a) for a in expert_slots(maps, width))
    identity = np.array_equal(indices, np.broadcast_to(np.arange(e), indices.shape))
    if width != e or not valid.all() or not identity:
        raise ValueError("SCAFFOLD needs the identity slot layout (slot width == E, experts ascending)")


def scaffold_update_correction(lr_local: float) -> Callable[[PyTree, PyTree], PyTree]:
    """`(updates, c - c_i) -> updates - lr_local (c - c_i)`: SCAFFOLD's drift correction on the step."""

    def correct(updates: PyTree, extra: PyTree) -> PyTree:
        return jax.tree.map(lambda u, e: u - lr_local * e.astype(u.dtype), updates, extra)

    return correct


class SCAFFOLD(Algorithm):
    """SCAFFOLD, option II, on the full MoE.

    State: server `{"c": c, "x": global params at the round's start}`; clients `extra` = c_i with
    leaves `[N, ...]` (zeros at start). After a round, for each cohort client with K_i > 0 real steps:
      c_i+ = c_i - c + (x - y_i) / (K_i * lr_local),   c += (1/N) * sum_i (c_i+ - c_i)
    (= (|S|/N) mean_i). K_i: `report.num_steps` if the engine provides it, else `local_steps` for
    clients with training examples.
    Local step: the optimizer's update u, corrected to u - lr_local (c - c_i) (`extra` per cohort
    client = c - c_i; `LocalHooks.update_correction`). Under SGD (u = -lr g) this is exactly the
    paper's step with the gradient g - c_i + c. [DEVIATION for adaptive optimizers] With AdamW the
    controls (x - y_i) / (K_i lr) measure the mean *normalized* step, of order 1 per coordinate,
    while raw gradients are orders smaller: added to the gradient (the SGD form) they swamp it and
    the run does not learn (measured: test scores 0.0 / 0.0 / 0.0 on configs/cpu.py). Correcting
    the update keeps controls and step in the same units.
    Communication is twice the model (y_i and c_i+ - c_i up, x and c down): `comm_multiplier = 2`.

    `cohort_extra` remembers the round's (cohort, c, x, N) for `update_clients` / `update_server`
    (the interface gives `update_clients` no server state, `update_server` no N); the loop calls
    them in that order every round.
    """

    name = "scaffold"
    comm_multiplier = 2
    # c and c_i (the step's correction c - c_i comes from them); the server, which keeps x, forms
    # c_i+ from x and y_i, so the client holds no copy of x
    state_copies = 2
    needs_client_params = True
    client_model_copies = 1  # c_i, kept for every registered client

    def __init__(self, lr_local: float, local_steps: int):
        if lr_local <= 0 or local_steps < 1:
            raise ValueError(f"lr_local={lr_local} must be > 0 and local_steps={local_steps} >= 1")
        self.lr_local, self.local_steps = float(lr_local), int(local_steps)
        self.hooks = LocalHooks(update_correction=scaffold_update_correction(self.lr_local))
        self._round: tuple[np.ndarray, PyTree, PyTree, int] | None = None

    def init_extra(self, num_clients: int, params: PyTree) -> PyTree:
        """c_i = 0, leaves `<f32>[N, ...]`."""
        # written now, not left to the OS's lazy zero pages: the memory is claimed at start, and no round
        # pays the first touch of its clients' rows (+0.06 s a round at 3,000 tiny-model clients)
        return jax.tree.map(lambda p: np.full((num_clients,) + np.shape(p), 0.0, np.float32), params)

    def init_server_extra(self, params: PyTree) -> PyTree:
        return {"c": jax.tree.map(lambda p: np.zeros(np.shape(p), np.float32), params), "x": params}

    def cohort_extra(self, states: ClientStates, cohort: np.ndarray, server_extra: PyTree) -> PyTree:
        """c - c_i, leaves `<f32>[C, ...]`."""
        cohort = np.asarray(cohort)
        extra = self.local_extra(states, cohort, server_extra)
        self._round = (cohort, server_extra["c"], server_extra["x"], states.num_clients)
        return extra

    def local_extra(self, states: ClientStates, clients: np.ndarray, server_extra: PyTree) -> PyTree:
        """c - c_i, leaves `<f32>[C, ...]` (a never-sampled client's c_i is 0: its correction is c)."""
        clients = np.asarray(clients)
        _check_identity_layout(states.expert_maps[clients])
        return jax.tree.map(lambda c, ci: np.asarray(c, np.float32)[None] - np.asarray(ci)[clients],
                            server_extra["c"], states.extra)

    def _steps(self, report: CohortReport) -> np.ndarray:
        """K_i `[C]` (0: the client did not train)."""
        steps = getattr(report, "num_steps", None)
        if steps is None:
            steps = np.where(np.asarray(report.num_examples) > 0, self.local_steps, 0)
        return np.asarray(steps, np.float64)[: len(report.cohort)]

    def control_deltas(self, c: PyTree, x: PyTree, report: CohortReport) -> PyTree:
        """c_i+ - c_i = (x - y_i) / (K_i lr_local) - c, leaves `<f32>[C, ...]` (0 where K_i = 0)."""
        if report.client_params is None:
            raise ValueError("SCAFFOLD needs report.client_params (needs_client_params=True)")
        steps = self._steps(report)
        n = len(report.cohort)
        scale = np.where(steps > 0, 1.0 / np.maximum(steps, 1) / self.lr_local, 0.0)

        def delta(c_leaf, x_leaf, y_leaf):
            y = np.asarray(y_leaf, np.float32)[:n]
            x32, c32 = np.asarray(x_leaf, np.float32), np.asarray(c_leaf, np.float32)
            s = scale.reshape((n,) + (1,) * x32.ndim)
            d = (x32[None] - y) * s - c32[None]
            return np.where(s > 0, d, 0.0).astype(np.float32)

        return jax.tree.map(delta, c, x, report.client_params)

    def update_clients(self, states: ClientStates, report: CohortReport) -> ClientStates:
        if self._round is None or not np.array_equal(self._round[0], report.cohort):
            raise RuntimeError("SCAFFOLD.update_clients must follow cohort_extra for the same cohort")
        _, c, x, _ = self._round
        deltas = self.control_deltas(c, x, report)
        cohort = np.asarray(report.cohort)

        def put(ci, d):  # in place (as `ClientStates.put`): O(C) of the [N, ...] controls, not O(N)
            ci[cohort] += d
            return ci

        states = record_report(states, report)
        return states.replace(extra=jax.tree.map(put, states.extra, deltas))

    def update_server(self, server_extra: PyTree, report: CohortReport, params: PyTree) -> PyTree:
        """c += (1/N) sum_i (c_i+ - c_i); x = the new global params."""
        if self._round is None or not np.array_equal(self._round[0], report.cohort):
            raise RuntimeError("SCAFFOLD.update_server must follow cohort_extra for the same cohort")
        n_clients = self._round[3]
        deltas = self.control_deltas(server_extra["c"], server_extra["x"], report)
        c = jax.tree.map(lambda c, d: (np.asarray(c, np.float32) + d.sum(0) / n_clients).astype(np.float32),
                         server_extra["c"], deltas)
        self._round = None
        return {"c": c, "x": params}


class LocalOnly(Algorithm):
    """Local training only (no server): each client trains its own copy of the full model, starting
    from the initial global parameters; its model lives in the client state (`[N, ...]` leaves)."""

    name = "local"
    aggregates = False
    needs_client_params = True
    client_model_copies = 1

    def init_extra(self, num_clients: int, params: PyTree) -> PyTree:
        return jax.tree.map(lambda p: np.repeat(np.asarray(p)[None], num_clients, axis=0), params)

    def update_clients(self, states: ClientStates, report: CohortReport) -> ClientStates:
        states = record_report(states, report)
        trained = jax.tree.map(np.asarray, report.client_params)
        return states.put(report.cohort, states.take(report.cohort).replace(extra=trained))
