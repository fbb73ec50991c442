"""The next paired seed where a report says more seeds may decide a direction, as a sweep spec.

A report's *Seeds to add* (`fedmoe_jax.tools.reports.seeds_to_add`) lists, per setting, the
FedMoE-vs-baseline directions still undecided whose mean gap exceeds half its seed spread.
`more_seeds_spec` turns that list into a `SweepSpec` for one more seed of FedMoE and of each named
baseline, in those settings only, from the spec the grid's own sweep recorded (`ROOT/sweep.json`: same
config file, same overrides). Its root is `ROOT/more_seeds/seeds=S` (S the seeds it runs, so that each
round of more seeds keeps its own `sweep.json` and tables), and the report over ROOT reads the new runs
beside the grid's. Run it, report again, and repeat until nothing is listed (the report stops asking
at five seeds):

    python experiments/report.py ROOT --floor=... --seeds-spec=more_seeds.json
    python experiments/sweep.py --spec=more_seeds.json
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedmoe_jax.tools.sweeps.results import spec_for_collect
from fedmoe_jax.tools.sweeps.spec import SpecError, SweepSpec, _matches

MORE_SEEDS_DIR = "more_seeds"


def more_seeds_spec(root: str, wanted: Mapping[str, Sequence[Mapping[str, Any]]],
                    seeds: Mapping[str, Iterable[int]], method: str = "fedmoe") -> SweepSpec | None:
    """A spec running the next seed of `method` and of every baseline `wanted[setting]` names (with the
    recorded grid's other axes and those of its excludes that still apply), for each
    setting of `wanted` (`{setting: [{"baseline": name, ...}, ...]}`, as `seeds_to_add` returns it):
    one above both the seeds `method` already has there (`seeds[setting]`) and the recorded grid's own
    seed axis (a seed the grid will still run is never asked for twice). None when nothing is wanted.

    `SpecError` (one line) when ROOT holds no `sweep.json`, or the recorded sweep cannot express the
    runs: a setting that is not one of its ARGs, a baseline its `method` axis does not have."""
    if not wanted:
        return None
    base = spec_for_collect(root)
    methods_run = [str(m) for m in base.grid.get("method", [])]
    settings = list(wanted)
    for setting in settings:
        if setting not in base.args:
            raise SpecError(f"the sweep recorded in {root} has no ARG {setting!r} (its ARGs: "
                            f"{', '.join(base.args) or 'none'}); add that setting's seeds by hand")
    baselines = list(dict.fromkeys(d["baseline"] for setting in settings for d in wanted[setting]))
    missing = [m for m in (method, *baselines) if m not in methods_run]
    if missing:
        raise SpecError(f"the sweep recorded in {root} runs no method {', '.join(missing)} (its methods: "
                        f"{', '.join(methods_run) or 'none'}); add those seeds by hand")
    planned = [int(x) for x in base.grid.get("seed", [])]  # the grid's own seeds are never taken twice
    next_seed = {s: max(int(x) for x in (*seeds[s], *planned)) + 1 for s in settings}
    all_seeds = sorted(set(next_seed.values()))
    exclude = [{"arg": s, "method": b} for s in settings for b in baselines
               if b not in {d["baseline"] for d in wanted[s]}]
    exclude += [{"arg": s, "seed": x} for s in settings for x in all_seeds if x != next_seed[s]]
    grid = {**{k: v for k, v in base.grid.items() if k not in ("seed", "method")},
            "seed": all_seeds, "method": [method, *baselines]}
    # the grid's own excludes (other axes' combinations it never ran) where they still apply
    points = [(arg, dict(zip(grid, values))) for arg in settings
              for values in itertools.product(*grid.values())]
    exclude += [e for e in base.exclude if any(_matches(e, arg, params) for arg, params in points)]
    return SweepSpec(config=base.config, args=settings, grid=grid, set=dict(base.set), exclude=exclude,
                     root=more_seeds_root(root, all_seeds), vectorize_seeds=base.vectorize_seeds)


def more_seeds_root(root: str, seeds: Sequence[int]) -> str:
    """`ROOT/more_seeds/seeds=3` (`seeds=3,4` for two): where a round of more seeds runs, one folder per
    set of seeds, so a later round does not overwrite an earlier round's `sweep.json`."""
    return os.path.join(root, MORE_SEEDS_DIR, "seeds=" + ",".join(str(int(s)) for s in seeds))


def spec_document(spec: SweepSpec) -> dict[str, Any]:
    """`spec` as a `configs/sweeps/*.json` document: no `runner` (this machine's interpreter would be
    written down; the sweep's default is the interpreter that runs it)."""
    doc = spec.to_dict()
    doc.pop("runner")
    return doc
