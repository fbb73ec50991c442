"""The central ceiling: the experiment's model trained centrally, with one federated run's compute.

What the federated methods are measured against from above. The config's model (its initial
parameters, all experts) is trained on the union of every client's training examples (exactly the
examples a run of the config trains on), by the engine's own optimizer step (`make_train_step`) with
the config's optimizer, learning rate, batch size and loss, for as many steps as a run of it takes
in all (`num_rounds x cohort_size x local_steps`: the same number of examples seen), one continuous
optimizer state. It is then scored as runs score the global model: every client's own test split
(`FederatedTrainer.evaluate(model="global")`, the config's `eval.test_examples` per client), averaged
per task. At `eval_points` evenly spaced steps it is also scored on the clients' validation splits,
so the curve shows whether the budget over- or under-trains. `decodings` score the final model again
on both splits under other decodings (`Decoding`: beams and a length penalty per task), without
training again: how to choose `decoding.*` on validation for every method at once.

    python experiments/central.py --config=configs/cpu.py:standard_hetero_t --out=results/benchmark/x
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedmoe_jax.data.tasks import PRIMARY_METRIC, TASKS


def training_arrays(data) -> dict[str, np.ndarray]:
    """Every client's training examples, padded and stacked: inputs / input_mask `[n, S]`, targets /
    target_mask `[n, T]` (n: all clients' examples)."""
    parts = [data.client_arrays(c, "train") for c in range(data.num_clients)]
    keys = ("inputs", "input_mask", "targets", "target_mask")
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def central_batches(arrays: dict[str, np.ndarray], steps: int, batch_size: int, seed: int,
                    first: int = 0) -> dict[str, np.ndarray]:
    """Steps `first .. first + steps - 1` of passes over `arrays` in fresh permutations (`[K, B, ...]`,
    every example real), the same whatever `first` (a chunked run equals an unchunked one)."""
    n = len(arrays["inputs"])
    perms: dict[int, np.ndarray] = {}  # each epoch's permutation, drawn once per call

    def perm(epoch: int) -> np.ndarray:
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        return perms[epoch]

    rows = []
    for k in range(first, first + steps):
        epoch, offset = divmod(k * batch_size, n)
        take = perm(epoch)[offset:offset + batch_size]
        while len(take) < batch_size:  # the batch runs into the next epoch
            epoch += 1
            take = np.concatenate([take, perm(epoch)[:batch_size - len(take)]])
        rows.append(take)
    idx = np.stack(rows)
    out = {k: v[idx] for k, v in arrays.items()}
    out["example_mask"] = np.ones(idx.shape, bool)
    return out


# The method whose model and initial parameters each model choice trains: the MoE the sub-MoE methods
# fine-tune (all experts, no Stage 1), or the full-model baselines' smaller MoE
MODELS = {"moe": "random_moe", "baseline": "fedavg"}


def central_ceiling(config, steps: int = 0, eval_points: int = 4, chunk: int = 50,
                    progress: bool = True, model: str = "moe", decodings: Sequence = ()) -> dict[str, Any]:
    """Train and score the central model of experiment config `config` (`steps` = 0: one run's
    compute; `eval_points` >= 1 validation points, the last at the end; `model`: "moe", the config's
    MoE that FedMoE and randomMoE fine-tune, or "baseline", the full-model baselines' MoE). Returns the
    settings, the validation curve (`curve`: step, seconds, per-task scores), the final `test` scores
    and, per `Decoding` in `decodings`, the final model's `validation` and `test` scores under it
    (`decodings`: num_beams, length_penalty per task)."""
    import jax
    import jax.numpy as jnp

    from fedmoe_jax.experiment.build import build, loss_config
    from fedmoe_jax.experiment.run import mean_scores

    if eval_points < 1 or steps < 0 or model not in MODELS:
        raise ValueError(f"eval_points={eval_points} must be >= 1, steps={steps} >= 0 and model={model!r} "
                         f"one of {list(MODELS)}")
    from fedmoe_jax.federated.client import make_train_step
    from fedmoe_jax.federated.optimizers import make_optimizer

    config = config.copy_and_resolve_references()
    config.method = MODELS[model]  # evaluate(model="global") below scores all experts whatever the maps
    config.eval_every = 0
    trainer = build(config, None, progress=progress).trainer
    steps = steps or config.num_rounds * config.cohort_size * config.local_steps
    arrays = training_arrays(trainer.data)
    optimizer = make_optimizer(config.optimizer, config.learning_rate, config.weight_decay)
    step = make_train_step(trainer.config, optimizer, loss_config(config))
    valid = jnp.ones((trainer.config.num_moe_layers, trainer.config.num_experts), bool)
    root = jax.random.key(config.seed)

    @jax.jit
    def train_chunk(params, opt_state, batches, first):
        def body(carry, xs):
            params, opt_state = carry
            batch, index = xs
            params, opt_state, metrics, _ = step(params, opt_state, batch, jax.random.fold_in(root, index),
                                                 valid)
            return (params, opt_state), metrics["loss"]

        k = batches["inputs"].shape[0]
        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state),
                                                   (batches, first + jnp.arange(k)))
        return params, opt_state, losses

    eval_kw = dict(max_examples=config.eval.test_examples or None, batch_size=config.eval.batch_size)

    def evaluate(split, params):
        trainer.server = trainer.server.replace(params=params)
        return mean_scores(trainer.evaluate(split, model="global", **eval_kw))

    params = trainer.server.params
    opt_state = optimizer.init(params)
    marks = sorted({int(round(steps * (i + 1) / eval_points)) for i in range(eval_points)})
    curve, losses, done, start = [], [], 0, time.time()
    while done < steps:
        k = min(chunk, steps - done, *(m - done for m in marks if m > done))
        batches = central_batches(arrays, k, config.batch_size, config.seed, first=done)
        params, opt_state, chunk_losses = train_chunk(params, opt_state, batches, jnp.int32(done))
        losses += np.asarray(chunk_losses).tolist()
        done += k
        if done in marks:
            curve.append({"step": done, "seconds": round(time.time() - start, 1),
                          "train_loss": float(np.mean(losses[-k:])), **evaluate("validation", params)})
            if progress:
                print(f"central: step {done}/{steps}: {curve[-1]}", flush=True)
    test = evaluate("test", params)
    rescored = []
    for d in decodings:
        trainer.set_decoding(d)
        one = not isinstance(d.length_penalty, tuple)
        penalty = (d.length_penalty,) * len(TASKS) if one else d.length_penalty
        rescored.append({"num_beams": d.num_beams, "length_penalty": list(penalty),
                         "validation": evaluate("validation", params), "test": evaluate("test", params)})
        if progress:
            print(f"central: decoding {rescored[-1]}", flush=True)
    return {"steps": steps, "batch_size": config.batch_size, "examples": int(len(arrays["inputs"])),
            "epochs": steps * config.batch_size / len(arrays["inputs"]), "model": config.model.name,
            "which_model": model, "num_experts": trainer.config.num_experts, "init": config.model.init,
            "seconds": round(time.time() - start, 1), "curve": curve, "loss_history": losses, "test": test,
            "decoding": config.decoding.to_dict(), "decodings": rescored}


def markdown(result: dict[str, Any], heading: str = "") -> str:
    lines = [f"### {heading}", ""] if heading else []
    metrics = [f"{t}_{PRIMARY_METRIC[t]}" for t in TASKS if f"{t}_{PRIMARY_METRIC[t]}" in result["test"]]
    lines += [f"{result['steps']} steps of batch {result['batch_size']} over {result['examples']} training "
              f"examples ({result['epochs']:.1f} epochs), {result['model']} with {result['num_experts']} "
              f"experts ({result['which_model']} model, {result['init']} init), "
              f"{result['seconds']:.0f} s.", "",
              "| step | train loss | " + " | ".join(f"validation {m}" for m in metrics) + " |",
              "|---:|---:|" + "---:|" * len(metrics)]
    for row in result["curve"]:
        lines.append(f"| {row['step']} | {row['train_loss']:.3f} | "
                     + " | ".join(f"{row.get(m, float('nan')):.1f}" for m in metrics) + " |")
    lines += ["", "Test: " + ", ".join(f"{m} {result['test'][m]:.1f}" for m in metrics)]
    if result.get("decodings"):
        lines += ["", "The final model under other decodings (length penalty per task: TC, RC, TS):", "",
                  "| beams | length penalty | " + " | ".join(f"validation {m}" for m in metrics) + " | "
                  + " | ".join(f"test {m}" for m in metrics) + " |",
                  "|---:|---|" + "---:|" * (2 * len(metrics))]
        for row in result["decodings"]:
            lines.append(f"| {row['num_beams']} | {', '.join(f'{p:g}' for p in row['length_penalty'])} | "
                         + " | ".join(f"{row[s].get(m, float('nan')):.1f}" for s in ("validation", "test")
                                      for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def parse_decoding(text: str):
    """"BEAMS:P" (one length penalty for every task) or "BEAMS:P_TC,P_RC,P_TS" -> `Decoding`;
    `ConfigError` naming the format otherwise."""
    from fedmoe_jax.errors import ConfigError
    from fedmoe_jax.models.decoding import Decoding

    try:
        beams, penalties = text.split(":")
        values = tuple(float(p) for p in penalties.split(","))
        if len(values) not in (1, len(TASKS)):
            raise ValueError
        return Decoding(int(beams), values * len(TASKS) if len(values) == 1 else values)
    except ValueError:
        raise ConfigError(f"--decoding={text!r}: use BEAMS:PENALTY or BEAMS:TC,RC,TS with BEAMS >= 1 and "
                          "finite penalties, e.g. 4:1.0 or 4:1,1,2") from None


def run_central(config: str, overrides: Sequence[str] = (), out: str = "", steps: int = 0,
                eval_points: int = 4, progress: bool = True, model: str = "moe",
                decodings: Sequence[str] = ()) -> dict[str, Any]:
    """`central_ceiling` of "FILE[:ARG]" with KEY=VALUE `overrides` and `decodings` ("BEAMS:P..."
    strings, `parse_decoding`); prints the Markdown and writes `out/central.json` and `out/central.md`
    when given. A config that fails to load, a bad override, an invalid config or a bad decoding raises
    `SpecError` / `ConfigError` before any training."""
    from fedmoe_jax.experiment.config import validate
    from fedmoe_jax.files import write_report
    from fedmoe_jax.tools.sweeps import config_from_spec

    cfg = config_from_spec(config, overrides)
    validate(cfg)
    parsed = [parse_decoding(d) for d in decodings]
    result = {"config": config, "overrides": list(overrides),
              **central_ceiling(cfg, steps, eval_points, progress=progress, model=model, decodings=parsed)}
    text = markdown(result, f"Central ceiling (`{config}`{' ' + ' '.join(overrides) if overrides else ''})")
    print(text)
    if out:
        write_report(out, "central", result, text)
    return result
