"""What `python experiments/benchmark.py` does once its flags are parsed (`run_benchmark`), and the
child process that takes each measurement (`python -m fedmoe_jax.tools.benchmarks.cli --child=...`).

Each contender runs in its own child process (so its peak RSS is its own) on the same workload
(`fedmoe_jax.tools.benchmarks`: same model, expert maps, batches, local steps and cohort); the machine's
matmul peak is measured in another. `run_benchmark` prints and writes JSON (`client_steps_per_s` per
contender, `ratios`, `mfu`, `device`, per-contender details) and a Markdown table. With `scaling`, the
vectorized round is timed over cohort sizes or global expert counts (kept experts per client fixed).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Sequence

from fedmoe_jax.tools.benchmarks.contenders import CONTENDERS

# The directory holding the `fedmoe_jax` package (the repository): the children run there.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SCALING_AXES = ("cohort", "experts", "clients")


class BenchmarkError(ValueError):
    """Bad benchmark input (a preset, contender, --model item or --scaling), in one line."""


def _preset(preset: str, cohort: int = 0, experts: int = 0, model: Sequence[str] = ()):
    from fedmoe_jax.tools.benchmarks.workload import PRESETS

    if preset not in PRESETS:
        raise BenchmarkError(f"unknown preset {preset!r}; use one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    if cohort:
        p = p.replace(cohort_size=cohort)
    if experts:
        p = p.replace(model=p.model.replace(num_experts=experts))
    if model:
        p = p.replace(model=p.model.replace(**model_overrides(model, p.model)))
    return p


def model_overrides(items: Sequence[str], base=None) -> dict:
    """`["dtype=bfloat16", "capacity_factor=1.25"]` -> SwitchConfig changes, typed like the field.

    Raises `BenchmarkError` naming a bad item.
    """
    import dataclasses

    from fedmoe_jax.models.switch import SwitchConfig

    fields = {f.name: f for f in dataclasses.fields(SwitchConfig)}
    defaults = base if base is not None else SwitchConfig()
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise BenchmarkError(f"--model={item!r}: expected KEY=VALUE with KEY a SwitchConfig field "
                                 f"({', '.join(sorted(fields))})")
        current = getattr(defaults, key)
        try:
            if raw.lower() == "none":
                value = None
            elif isinstance(current, bool):
                if raw.lower() not in ("true", "false"):
                    raise ValueError(raw)
                value = raw.lower() == "true"
            elif isinstance(current, (int, float)) or key == "capacity_factor":
                value = (float if isinstance(current, float) or key == "capacity_factor" else int)(raw)
            else:
                value = raw
        except ValueError:
            raise BenchmarkError(f"--model={item!r}: {raw!r} is not a valid {key}") from None
        out[key] = value
    try:
        defaults.replace(**out)  # validate against the preset's model before any compute
    except (TypeError, ValueError) as e:
        raise BenchmarkError(f"--model: {e}") from None
    return out


def child(what: str, preset: str, rounds: int = 5, warmup: int = 1, seed: int = 0, peak_n: int = 0,
          model: Sequence[str] = (), profile: str = "", cohort: int = 0, experts: int = 0, clients: int = 0,
          method: str = "fedmoe") -> dict:
    """One measurement in this process: 'peak', 'memory', 'clients' (`clients` registered clients of
    `method`, `benchmarks.clients`) or a contender."""
    import jax

    from fedmoe_jax.tools import benchmarks as bm

    p = _preset(preset, cohort, experts, model)
    out: dict = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
    if what == "clients":
        from fedmoe_jax.tools.benchmarks.clients import registered_clients_round

        out.update(registered_clients_round(clients, cohort, method, rounds, warmup, seed))
    elif what == "peak":
        dtype = p.model.dtype  # the compute dtype: bf16 on the gpu preset, f32 on CPU
        n = peak_n or (1024 if jax.default_backend() == "cpu" else 8192)
        out.update(matmul_peak_flops=bm.matmul_peak(n, dtype=dtype), peak_n=n, peak_dtype=str(dtype))
    elif what == "memory":
        e = p.model.num_experts
        quarter, full = bm.client_training_bytes(p, e // 4), bm.client_training_bytes(p, e)
        out.update(kept_quarter=quarter, kept_all=full, ratio=quarter["total"] / full["total"],
                   experts=e)
    else:
        if what not in CONTENDERS:
            raise BenchmarkError(f"unknown contender {what!r}; use one of {list(CONTENDERS)}")
        w = bm.make_workload(p, seed=seed)
        if what == "vectorized":
            fn = bm.vectorized_round(w)
        elif what == "sequential_jax":
            fn = bm.sequential_round(w)
        else:
            import torch

            from fedmoe_jax.tools.benchmarks.torch_reference import torch_round

            fn = torch_round(w)
            out["torch_threads"] = torch.get_num_threads()
        out.update(bm.figures(w, bm.time_rounds(fn, rounds, warmup), None))
        if profile and what != "pytorch_hf":
            out["op_breakdown"] = bm.profile_round(fn, os.path.join(os.path.abspath(profile), what))
        out.update(width=w.width, cohort=p.cohort_size, experts=p.model.num_experts)
        # What the child actually ran with, for every overridden field.
        out["model"] = {k: getattr(p.model, k) for k in model_overrides(model, p.model)}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats = jax.devices()[0].memory_stats()  # None on CPU; accelerators report their allocator's peak
    if stats and "peak_bytes_in_use" in stats:
        out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


def run_child(what: str, settings: dict, **extra) -> dict:
    """`child(what, **settings, **extra)` in a child process; {"error": its last stderr line} if it fails."""
    settings = {**settings, **extra}
    cmd = [sys.executable, "-m", "fedmoe_jax.tools.benchmarks.cli", f"--child={what}"]
    cmd += [f"--{k}={v}" for k, v in settings.items() if k != "model"]
    cmd += [f"--model={m}" for m in settings.get("model", ())]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"benchmark: {what} failed: {tail}", file=sys.stderr)
        return {"error": tail}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _scaling(scaling: str) -> tuple[str, list[int]]:
    axis, _, values = scaling.partition(":")
    try:
        sizes = [int(x) for x in values.split(",")]
    except ValueError:
        sizes = []
    if axis not in SCALING_AXES or not sizes or min(sizes) < 1:
        raise BenchmarkError(f"--scaling={scaling!r}: expected cohort:N,..., experts:N,... or clients:N,... "
                             "(N >= 1)")
    return axis, sizes


def markdown(result: dict) -> str:
    changed = ", ".join(f"{k}={v}" for k, v in {**result.get("preset_overrides", {}),
                                                   **result.get("model_overrides", {})}.items())
    on_device = any("device_peak_mb" in r for r in result["contenders"].values())  # accelerators
    lines = [f"### `{result['preset']}`{' with ' + changed if changed else ''} on {result['device']} "
             f"({result['machine']})", ""]
    if any(s["axis"] == "clients" for s in result.get("scaling", [])):  # not the preset: the pipeline
        from fedmoe_jax.tools.benchmarks.clients import DEFAULT_CONFIG

        lines[0] = (f"### `{DEFAULT_CONFIG}` with registered clients on {result['device']} "
                    f"({result['machine']})")
    if result["contenders"]:  # a --scaling run alone times no contender: no empty table
        lines += ["| contender | client-steps/s | round s | first round s | MFU | peak RSS MB |"
                  + (" device peak MB |" if on_device else ""),
                  "|---|---:|---:|---:|---:|---:|" + ("---:|" if on_device else "")]
    for name, r in result["contenders"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else "—"
        device = f" {r['device_peak_mb']:.0f} |" if "device_peak_mb" in r else (" — |" if on_device else "")
        lines.append(f"| {name} | {r['client_steps_per_s']:.2f} | {r['round_s']:.3f} | "
                     f"{r['first_round_s']:.1f} | {mfu} | {r['peak_rss_mb']:.0f} |{device}")
    lines.append("")
    for name, r in result["contenders"].items():
        programs = r.get("first_round_programs")
        if programs and programs["traces"]:  # JAX contenders: what the first round traced, compiled
            lines.append(f"- {name}, first round: {programs['traces']} traces ({programs['trace_s']:.1f} s), "
                         f"{programs['lowers']} lowerings ({programs['lower_s']:.1f} s), "
                         f"{programs['compiles']} XLA compiles ({programs['compile_s']:.1f} s)")
    if any((r.get("first_round_programs") or {}).get("traces") for r in result["contenders"].values()):
        lines.append("")
    profiled = {n: r["op_breakdown"] for n, r in result["contenders"].items() if "op_breakdown" in r}
    if profiled:
        from fedmoe_jax.tools.benchmarks.profiling import OP_CATEGORIES

        lines += ["XLA op time per category, one profiled round (CPU time summed over threads):", "",
                  "| contender | " + " | ".join(OP_CATEGORIES) + " | total ms |",
                  "|---|" + "---:|" * (len(OP_CATEGORIES) + 1)]
        for n, b in profiled.items():
            lines.append(f"| {n} | " + " | ".join(f"{100 * b['share'][c]:.0f} %" for c in OP_CATEGORIES)
                         + f" | {b['total_ms']:.0f} |")
        lines.append("")
    for k, v in result.get("ratios", {}).items():
        lines.append(f"- {k}: **{v:.2f}x**")
    if "matmul_peak_flops" in result:
        lines.append(f"- matmul peak: {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s "
                     f"(jitted {result['peak_n']}x{result['peak_n']} {result.get('peak_dtype') or 'float32'} "
                     "matmul chain)")
    if "client_memory" in result:
        m = result["client_memory"]
        lines.append(f"- client training memory (XLA memory analysis), {m['experts'] // 4} of {m['experts']} "
                     f"experts vs all: {m['kept_quarter']['total'] / 2**20:.1f} MiB vs "
                     f"{m['kept_all']['total'] / 2**20:.1f} MiB = {100 * m['ratio']:.0f} %")
    for s in result.get("scaling", []):
        line = (f"- scaling {s['axis']}={s['value']}: {s.get('round_s', float('nan')):.3f} s/round, "
                f"{s.get('client_steps_per_s', float('nan')):.2f} client-steps/s")
        if s["axis"] == "clients" and "round_s" in s:
            state = s["client_state_bytes"]
            line += (f" ({s['method']}, cohort {s['cohort']}; set-up {s['setup_s']:.1f} s; client state "
                     f"{state['metadata'] / 2**20:.2f} MiB metadata + "
                     f"{state['model_copies'] / 2**20:.1f} MiB model copies; "
                     f"peak RSS {s['peak_rss_mb']:.0f} MB)")
        lines.append(line)
    return "\n".join(lines) + "\n"


def run_benchmark(preset: str = "cpu-small", contenders: Sequence[str] = CONTENDERS, rounds: int = 5,
                  warmup: int = 1, seed: int = 0, peak_n: int = 0, scaling: str = "",
                  model: Sequence[str] = (), profile: str = "", out: str = "", md: str = "", cohort: int = 0,
                  experts: int = 0, method: str = "fedmoe") -> dict:
    """Measure the matmul peak, then each of `contenders` (or, with `scaling` = "cohort:4,8" or
    "experts:8,16", the vectorized round over those sizes), each in a child process; print the result
    as JSON and write it to `out` (JSON) and `md` (Markdown) when given. `model`: SwitchConfig
    overrides of the preset ("dtype=bfloat16"); `cohort` / `experts`: the preset's cohort size / global
    experts instead (0: the preset's); `peak_n`: the peak's matmul size (0: 1024 on CPU, 8192 on
    accelerators); `profile`: trace one round of each JAX contender into PROFILE/<contender>. With
    `scaling` = "clients:30,1000", the experiment pipeline's round (`benchmarks.clients`, `method`) is
    timed with that many registered clients and `cohort` clients per round (0: 256, at most the
    smallest N). Bad input raises `BenchmarkError` before any measurement."""
    overrides = model_overrides(model, _preset(preset, cohort, experts).model)
    contenders = [c for c in contenders if c]
    bad = sorted(set(contenders) - set(CONTENDERS))
    if bad:
        raise BenchmarkError(f"unknown contender(s) {bad}; use {list(CONTENDERS)}")
    axis, sizes = _scaling(scaling) if scaling else (None, [])
    if axis == "clients":
        from fedmoe_jax.algorithms.registry import method_names

        if method not in method_names():
            raise BenchmarkError(f"--method={method!r}: use one of {list(method_names())}")
        cohort = cohort or min(256, min(sizes))
        if cohort > min(sizes):
            raise BenchmarkError(f"--cohort={cohort} exceeds the smallest client count {min(sizes)}")
    settings = {"preset": preset, "rounds": rounds, "warmup": warmup, "seed": seed, "peak_n": peak_n,
                "model": list(model), "profile": profile, "cohort": cohort, "experts": experts}
    peak = run_child("peak", settings)
    result = {"preset": preset, "model_overrides": overrides, "device": peak.get("device", "?"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "matmul_peak_flops": peak.get("matmul_peak_flops"), "peak_n": peak.get("peak_n"),
              "peak_dtype": peak.get("peak_dtype"), "contenders": {}}
    changed = {k: v for k, v in (("cohort_size", cohort), ("num_experts", experts)) if v}
    if changed:  # shown with the model overrides in the Markdown heading
        result["preset_overrides"] = changed
    if axis:
        result["scaling"] = []
        for v in sizes:
            if axis == "clients":
                r = run_child("clients", settings, clients=v, method=method)
            else:
                r = run_child("vectorized", settings, **{axis: v})
            result["scaling"].append({"axis": axis, "value": v, **r})
            print(f"{axis}={v}: {r}", file=sys.stderr)
    else:
        for name in contenders:
            r = run_child(name, settings)
            if "model_flops_per_s" in r and result["matmul_peak_flops"]:
                r["mfu"] = r["model_flops_per_s"] / result["matmul_peak_flops"]
            result["contenders"][name] = r
            print(f"{name}: {r.get('client_steps_per_s', r.get('error'))}", file=sys.stderr)
        result["client_memory"] = run_child("memory", settings)
        rate = {k: v["client_steps_per_s"] for k, v in result["contenders"].items()
                if "client_steps_per_s" in v}
        result["client_steps_per_s"] = rate
        result["ratios"] = {f"vectorized/{k}": rate["vectorized"] / v for k, v in rate.items()
                            if k != "vectorized" and "vectorized" in rate}
        result["mfu"] = {k: v["mfu"] for k, v in result["contenders"].items() if "mfu" in v}
    text = json.dumps(result, indent=2)
    print(text)
    for path, content in ((out, text + "\n"), (md, markdown(result))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(content)
    return result


def _child_main() -> None:
    """`python -m fedmoe_jax.tools.benchmarks.cli --child=WHAT --preset=...`: one `child` measurement,
    printed as one JSON line (the flags are defined here, only when this module runs as a program)."""
    from absl import app, flags

    from fedmoe_jax.cli_common import fail, flags_parser, quiet_logs

    flags.DEFINE_string("child", None, "What to measure: peak, memory or a contender.", required=True)
    flags.DEFINE_string("preset", "cpu-small", "Benchmark preset.")
    flags.DEFINE_integer("rounds", 5, "Timed rounds.")
    flags.DEFINE_integer("warmup", 1, "Warm-up rounds.")
    flags.DEFINE_integer("seed", 0, "Workload seed.")
    flags.DEFINE_integer("peak_n", 0, "Matmul size of the peak measurement (0: by backend).")
    flags.DEFINE_multi_string("model", [], "KEY=VALUE SwitchConfig override of the preset.")
    flags.DEFINE_string("profile", "", "Trace one round into PROFILE/<contender>.")
    flags.DEFINE_integer("cohort", 0, "Cohort size instead of the preset's (0: the preset's).")
    flags.DEFINE_integer("experts", 0, "Global experts instead of the preset's (0: the preset's).")
    flags.DEFINE_integer("clients", 0, "Registered clients (--child=clients).")
    flags.DEFINE_string("method", "fedmoe", "Method of --child=clients.")
    FLAGS = flags.FLAGS

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}; pass options as --flag=value")
        quiet_logs()
        names = ("preset", "rounds", "warmup", "seed", "peak_n", "model", "profile", "cohort", "experts",
                 "clients", "method")
        try:
            print(json.dumps(child(FLAGS.child, **{k: FLAGS[k].value for k in names})))
        except BenchmarkError as e:
            fail(str(e))

    app.run(main, flags_parser=flags_parser())


if __name__ == "__main__":
    _child_main()
