"""Side-by-side round benchmark: vectorized engine vs sequential JAX vs PyTorch + Hugging Face.

    python experiments/benchmark.py --preset=cpu-small --out=runs/bench/cpu.json --md=runs/bench/cpu.md
    python experiments/benchmark.py --preset=cpu-small --scaling=cohort:4,8,16,32 --contenders=vectorized
    python experiments/benchmark.py --preset=cpu-small --scaling=experts:8,16,32,64,128

Each contender runs in its own child process (so its peak RSS is its own) on the same workload
(`fedmoe_jax.tools.benchmarks`: same model, expert maps, batches, local steps and cohort); the machine's
matmul peak is measured in another. Prints and writes JSON (`client_steps_per_s` per contender,
`ratios`, `mfu`, `device`, per-contender details) and a Markdown table. With `--scaling`, the
vectorized round is timed over cohort sizes or global expert counts (kept experts per client fixed).
The children run this module (`python -m fedmoe_jax.tools.benchmarks.cli --child=...`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

# The directory holding the `fedmoe_jax` package (the repository): the children run there.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _preset(args):
    from fedmoe_jax.tools.benchmarks.workload import PRESETS

    p = PRESETS[args.preset]
    if args.cohort:
        p = p.replace(cohort_size=args.cohort)
    if args.experts:
        p = p.replace(model=p.model.replace(num_experts=args.experts))
    if args.model:
        p = p.replace(model=p.model.replace(**model_overrides(args.model, p.model)))
    return p


def model_overrides(items: list[str], base=None) -> dict:
    """`["dtype=bfloat16", "capacity_factor=1.25"]` -> SwitchConfig changes, typed like the field.

    Raises SystemExit(2) with one line naming a bad item.
    """
    import dataclasses

    from fedmoe_jax.models.switch import SwitchConfig

    fields = {f.name: f for f in dataclasses.fields(SwitchConfig)}
    defaults = base if base is not None else SwitchConfig()
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            print(f"benchmark: error: --model={item!r}: expected KEY=VALUE with KEY a SwitchConfig "
                  f"field ({', '.join(sorted(fields))})", file=sys.stderr)
            sys.exit(2)
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
            print(f"benchmark: error: --model={item!r}: {raw!r} is not a valid {key}", file=sys.stderr)
            sys.exit(2)
        out[key] = value
    try:
        defaults.replace(**out)  # validate against the preset's model before any compute
    except (TypeError, ValueError) as e:
        print(f"benchmark: error: --model: {e}", file=sys.stderr)
        sys.exit(2)
    return out


def child(args) -> dict:
    """One measurement in this process: 'peak', 'memory' or a contender."""
    import jax

    from fedmoe_jax.tools import benchmarks as bm

    out: dict = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
    if args.child == "peak":
        dtype = _preset(args).model.dtype  # the compute dtype: bf16 on the gpu preset, f32 on CPU
        n = args.peak_n or (1024 if jax.default_backend() == "cpu" else 8192)
        out.update(matmul_peak_flops=bm.matmul_peak(n, dtype=dtype), peak_n=n, peak_dtype=str(dtype))
    elif args.child == "memory":
        p = _preset(args)
        e = p.model.num_experts
        quarter, full = bm.client_training_bytes(p, e // 4), bm.client_training_bytes(p, e)
        out.update(kept_quarter=quarter, kept_all=full, ratio=quarter["total"] / full["total"],
                   experts=e)
    else:
        p = _preset(args)
        w = bm.make_workload(p, seed=args.seed)
        if args.child == "vectorized":
            fn = bm.vectorized_round(w)
        elif args.child == "sequential_jax":
            fn = bm.sequential_round(w)
        elif args.child == "pytorch_hf":
            import torch

            from fedmoe_jax.tools.benchmarks.torch_reference import torch_round

            fn = torch_round(w)
            out["torch_threads"] = torch.get_num_threads()
        else:
            raise SystemExit(f"unknown contender {args.child}")
        out.update(bm.figures(w, bm.time_rounds(fn, args.rounds, args.warmup), None))
        if args.profile and args.child != "pytorch_hf":
            trace_dir = os.path.join(os.path.abspath(args.profile), args.child)
            out["op_breakdown"] = bm.profile_round(fn, trace_dir)
        out.update(width=w.width, cohort=p.cohort_size, experts=p.model.num_experts)
        # What the child actually ran with, for every overridden field.
        out["model"] = {k: getattr(p.model, k) for k in model_overrides(args.model, p.model)}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats = jax.devices()[0].memory_stats()  # None on CPU; accelerators report their allocator's peak
    if stats and "peak_bytes_in_use" in stats:
        out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


def run_child(args, what: str, **extra) -> dict:
    cmd = [sys.executable, "-m", "fedmoe_jax.tools.benchmarks.cli", f"--child={what}",
           f"--preset={args.preset}", f"--rounds={args.rounds}", f"--warmup={args.warmup}",
           f"--seed={args.seed}", f"--peak_n={args.peak_n}"]
    cmd += [f"--model={m}" for m in args.model]
    cmd += [f"--profile={args.profile}"] if args.profile else []
    cmd += [f"--{k}={v}" for k, v in extra.items()]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"benchmark: {what} failed: {tail}", file=sys.stderr)
        return {"error": tail}
    return json.loads(res.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    changed = ", ".join(f"{k}={v}" for k, v in result.get("model_overrides", {}).items())
    on_device = any("device_peak_mb" in r for r in result["contenders"].values())  # accelerators
    lines = [f"### `{result['preset']}`{' with ' + changed if changed else ''} on {result['device']} "
             f"({result['machine']})", ""]
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
        lines.append(f"- scaling {s['axis']}={s['value']}: {s.get('round_s', float('nan')):.3f} s/round, "
                     f"{s.get('client_steps_per_s', float('nan')):.2f} client-steps/s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from fedmoe_jax.tools.benchmarks.contenders import CONTENDERS
    from fedmoe_jax.tools.benchmarks.workload import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per contender (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak_n", type=int, default=0,
                    help="matmul size of the peak measurement, in the model's compute dtype "
                         "(default: 1024 on CPU, 8192 on accelerators, whose peak small products miss)")
    ap.add_argument("--scaling", default="", help="cohort:4,8,16 or experts:8,16,32 (vectorized only)")
    ap.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                    help="override a SwitchConfig field of the preset, e.g. dtype=bfloat16, "
                         "dispatch=dropless, capacity_factor=1.25 (repeatable)")
    ap.add_argument("--profile", default="", metavar="DIR",
                    help="also trace one round of each JAX contender with jax.profiler into DIR/<contender> "
                         "(TensorBoard / Perfetto) and report its XLA op time per category")
    ap.add_argument("--out", default="", help="JSON file")
    ap.add_argument("--md", default="", help="Markdown file")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--cohort", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--experts", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    overrides = model_overrides(args.model, PRESETS[args.preset].model)
    contenders = [c for c in args.contenders.split(",") if c]
    bad = sorted(set(contenders) - set(CONTENDERS))
    if bad:
        print(f"benchmark: error: unknown contender(s) {bad}; use {list(CONTENDERS)}", file=sys.stderr)
        sys.exit(2)
    peak = run_child(args, "peak")
    result = {"preset": args.preset, "model_overrides": overrides, "device": peak.get("device", "?"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "matmul_peak_flops": peak.get("matmul_peak_flops"), "peak_n": peak.get("peak_n"),
              "peak_dtype": peak.get("peak_dtype"), "contenders": {}}
    if args.scaling:
        axis, _, values = args.scaling.partition(":")
        if axis not in ("cohort", "experts"):
            print("benchmark: error: --scaling must be cohort:N,... or experts:N,...", file=sys.stderr)
            sys.exit(2)
        result["scaling"] = []
        for v in (int(x) for x in values.split(",")):
            r = run_child(args, "vectorized", **{axis: v})
            result["scaling"].append({"axis": axis, "value": v, **r})
            print(f"{axis}={v}: {r}", file=sys.stderr)
    else:
        for name in contenders:
            r = run_child(args, name)
            if "model_flops_per_s" in r and result["matmul_peak_flops"]:
                r["mfu"] = r["model_flops_per_s"] / result["matmul_peak_flops"]
            result["contenders"][name] = r
            print(f"{name}: {r.get('client_steps_per_s', r.get('error'))}", file=sys.stderr)
        result["client_memory"] = run_child(args, "memory")
        rate = {k: v["client_steps_per_s"] for k, v in result["contenders"].items()
                if "client_steps_per_s" in v}
        result["client_steps_per_s"] = rate
        result["ratios"] = {f"vectorized/{k}": rate["vectorized"] / v for k, v in rate.items()
                            if k != "vectorized" and "vectorized" in rate}
        result["mfu"] = {k: v["mfu"] for k, v in result["contenders"].items() if "mfu" in v}
    text = json.dumps(result, indent=2)
    print(text)
    for path, content in ((args.out, text + "\n"), (args.md, markdown(result))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(content)
    return result


if __name__ == "__main__":
    main()
