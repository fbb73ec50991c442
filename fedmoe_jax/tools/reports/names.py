"""The report's vocabulary: tasks and their columns, the paper's settings and methods with their
display names and row order, and the curves and targets of time-to-target.

A row of a table is a method, or a method with a variant (`fedmoe[stage2.patience=1]`, see
`loading.assign_variants`): `variant_method` / `split_method` convert between the two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedmoe_jax.algorithms.registry import method_labels
from fedmoe_jax.data.tasks import TASKS  # noqa: F401  (the order of `client_tasks` in experts.npz)

COLUMNS = {"tc": "TC", "rc": "RC", "ts": "TS"}
TEST_KEYS = {"tc": "tc_accuracy", "rc": "rc_f1", "ts": "ts_rouge2"}
SETTING_NAMES = {
    "standard_hetero_t": "Standard-Hetero-T",
    "standard_hetero_td": "Standard-Hetero-TD",
    "enforced_hetero_t": "Enforced-Hetero-T",
    "enforced_hetero_td": "Enforced-Hetero-TD",
}
ABLATION_METHODS = ("fedmoe", "fedmoe_no_stage1", "fedmoe_no_stage2", "random_moe")
DEFAULT_BASELINES = ("random_moe", "fedprox", "scaffold")
METHOD = "fedmoe"
TARGET_FRACTIONS = (0.99, 0.9)
CURVES = {"tc": "val_score_tc", "rc": "val_score_rc", "ts": "val_score_ts", "all": "val_score"}
FULL_CURVE = "full_"  # prefix of the all-client validation curve (eval.full_every), preferred when present
MISSING = "—"
MARKS = {True: "✓", False: "✗", None: "?"}  # a paper direction or reading: holds / reversed / undecided


def variant_method(method: str, variant: str) -> str:
    """`fedmoe` + `stage2.patience=1` -> `fedmoe[stage2.patience=1]`; no variant: the method itself."""
    return f"{method}[{variant}]" if variant else method


def split_method(method: str) -> tuple[str, str]:
    """Inverse of `variant_method`: `fedmoe[stage2.patience=1]` -> (`fedmoe`, `stage2.patience=1`)."""
    base, sep, rest = method.partition("[")
    return (base, rest[:-1]) if sep and rest.endswith("]") else (method, "")


def _rank(order: Sequence[str], name: str) -> tuple[int, str]:
    return (order.index(name), "") if name in order else (len(order), name)


def _setting_rank(s: str) -> tuple[int, str]:
    return _rank(list(SETTING_NAMES), s)


def _method_rank(m: str) -> tuple[int, str, str]:
    base, variant = split_method(m)
    return (*_rank(list(method_labels()), base), variant)  # the registry: Table 1's rows, ablations


def methods_in(table: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every method of a `{setting: {method: ...}}` table, in Table 1's row order."""
    return sorted({m for rows in table.values() for m in rows}, key=_method_rank)


def setting_name(s: str) -> str:
    return SETTING_NAMES.get(s, s)


def method_name(m: str) -> str:
    base, variant = split_method(m)
    return method_labels().get(base, base) + (f" [{variant}]" if variant else "")
