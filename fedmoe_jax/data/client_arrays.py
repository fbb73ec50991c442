"""Per-client token arrays and cohort batches for the federated engine.

`FederatedData.build` tokenizes every example a client holds once, a bounded chunk of texts at a time
(so lazy TFDS columns are streamed, never all in memory), and keeps the tokens ragged per task and
split (no padding, no per-client copies); clients are index arrays into them.
Batches are padded on the way out to one input width S and one target width T, each the smallest
bucket (powers of two by default) that fits the longest example, so every client and every round
sees the same shapes. `cohort_batches` stacks a cohort's local-training batches as
`[C, steps, B, ...]`, shuffled per client from `np.random.default_rng([seed, round, client])`, with
steps bucketed and padded examples / steps masked, so `jit` compiles rarely.

Shape letters: N clients, C cohort, B batch, S input tokens, T target tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from fedmoe_jax.data.partition import Partition
from fedmoe_jax.data.tasks import SPLITS, TASKS, TaskData, check_split, read_items
from fedmoe_jax.data.tokenizer import Tokenizer

PAD_CLIENT = -1  # a client id in a cohort that stands for an all-masked padding client
TOKENIZE_CHUNK = 1024  # texts read and tokenized at a time by `FederatedData.build`
EVAL_SUBSET_SEED = 7919  # the fixed per-(client, split) evaluation subsets of `cohort_eval_batches`


def length_buckets(max_len: int, smallest: int = 8) -> tuple[int, ...]:
    """Powers of two from `smallest` below `max_len`, then `max_len` itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return (*out, max_len)


def pick_bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (ValueError if none)."""
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    raise ValueError(f"{n} exceeds the largest bucket {max(buckets)}; add a larger bucket")


@dataclasses.dataclass(frozen=True)
class _Ragged:
    """Token ids of M sequences, concatenated: `tokens[offsets[i] : offsets[i] + lengths[i]]`."""

    tokens: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    truncated: int

    def pad(self, ids: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """`<int32>[..., width]` ids right-padded with 0 and their `<int32>` mask; ids < 0 give all pad."""
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        lens = np.where(valid, self.lengths[safe] if self.lengths.size else 0, 0)
        mask = np.arange(width) < lens[..., None]
        if not self.tokens.size:
            return np.zeros(mask.shape, np.int32), mask.astype(np.int32)
        pos = np.where(mask, self.offsets[safe][..., None] + np.arange(width), 0)
        return np.where(mask, self.tokens[pos], 0).astype(np.int32), mask.astype(np.int32)


class _RaggedEncoder:
    """Builds a `_Ragged` of M sequences from chunks of texts given in increasing index order."""

    def __init__(self, tokenizer: Tokenizer, m: int, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len
        self.dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        self.lengths = np.zeros(m, np.int32)
        self.parts: list[np.ndarray] = []
        self.truncated, self.last = 0, -1

    def add(self, ids: np.ndarray, texts: list[str]) -> None:
        if not len(ids):
            return
        if ids[0] <= self.last or np.any(np.diff(ids) <= 0):
            raise ValueError("_RaggedEncoder needs strictly increasing example indices")
        self.last = int(ids[-1])
        raw = self.tokenizer.processor.encode(list(texts))
        lengths = np.fromiter((min(len(r) + 1, self.max_len) for r in raw), np.int32, len(raw))
        eos = [self.tokenizer.eos_id]
        rows = itertools.chain.from_iterable(itertools.chain(r[: self.max_len - 1], eos) for r in raw)
        self.parts.append(np.fromiter(rows, self.dtype, int(lengths.sum())))
        self.lengths[ids] = lengths
        self.truncated += int(sum(len(r) + 1 > self.max_len for r in raw))

    def finish(self) -> _Ragged:
        tokens = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        offsets = np.zeros(self.lengths.size, np.int64)
        np.cumsum(self.lengths[:-1], out=offsets[1:])
        return _Ragged(tokens, offsets, self.lengths, self.truncated)


class FederatedData:
    """Tokenized task data, a partition over N clients, and batchers for cohorts of them.

    Attributes: `partition`, `data`, `tokenizer`, `input_len` (S), `target_len` (T),
    `num_examples[split]` `<int64>[N]`, `truncated[task][split]` (examples cut to the max length).
    """

    def __init__(
        self,
        data: Mapping[str, Mapping[str, TaskData]],
        partition: Partition,
        tokenizer: Tokenizer,
        inputs: dict[str, dict[str, _Ragged]],
        targets: dict[str, dict[str, _Ragged]],
        input_len: int,
        target_len: int,
    ):
        self.data, self.partition, self.tokenizer = data, partition, tokenizer
        self._inputs, self._targets = inputs, targets
        self.input_len, self.target_len = input_len, target_len
        self.num_examples = partition.counts()
        self.truncated = {
            t: {s: inputs[t][s].truncated + targets[t][s].truncated for s in SPLITS} for t in inputs
        }
        self._max_steps_cache: dict[tuple, int] = {}

    @classmethod
    def build(
        cls,
        data: Mapping[str, Mapping[str, TaskData]],
        partition: Partition,
        tokenizer: Tokenizer,
        max_input_len: int,
        max_target_len: int,
        buckets: Sequence[int] | None = None,
        chunk: int = TOKENIZE_CHUNK,
    ) -> FederatedData:
        """Tokenize (with EOS, truncating to the max lengths) every example some client holds.

        Texts are read (`__getitems__` when the column has it) and tokenized `chunk` examples at a
        time, so peak memory is the token arrays plus one chunk of strings; examples no client holds
        are never read and stay empty. S and T are the smallest of `buckets` (default: powers of two
        from 8, capped at the max length, which is always a bucket) that fit the longest tokenized
        input and target.
        """
        for name, v in (("max_input_len", max_input_len), ("max_target_len", max_target_len)):
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 2:
                raise ValueError(f"{name} must be an integer >= 2 (room for a token and EOS), got {v!r}")
        if buckets is not None:
            buckets = [int(b) for b in buckets]
            if not buckets or min(buckets) < 1:
                raise ValueError(f"buckets must be positive lengths, got {buckets}")
        _check_positive(chunk=chunk)
        partition.check_data(data)
        inputs: dict[str, dict[str, _Ragged]] = {t: {} for t in partition.source_sizes}
        targets: dict[str, dict[str, _Ragged]] = {t: {} for t in partition.source_sizes}
        for task in partition.source_sizes:
            for s in SPLITS:
                d = data[task][s]
                clients = partition.clients_of(task) if task in partition.tasks else []
                held = [partition.client_indices(c, s) for c in clients]
                ids = np.unique(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, np.int64)
                x = _RaggedEncoder(tokenizer, len(d), max_input_len)
                y = _RaggedEncoder(tokenizer, len(d), max_target_len)
                for lo in range(0, ids.size, chunk):  # inputs and targets of a chunk: one read
                    part = ids[lo : lo + chunk]
                    x.add(part, read_items(d.inputs, part.tolist()))
                    y.add(part, read_items(d.targets, part.tolist()))
                inputs[task][s], targets[task][s] = x.finish(), y.finish()

        def width(store: dict[str, dict[str, _Ragged]], max_len: int) -> int:
            longest = max(
                (int(r.lengths.max(initial=0)) for v in store.values() for r in v.values()), default=0
            )
            candidates = length_buckets(max_len) if buckets is None else [b for b in buckets if b < max_len]
            return pick_bucket(max(longest, 1), [*candidates, max_len])

        return cls(
            data,
            partition,
            tokenizer,
            inputs,
            targets,
            width(inputs, max_input_len),
            width(targets, max_target_len),
        )

    @property
    def num_clients(self) -> int:
        return self.partition.num_clients

    def client_examples(self, client: int, split: str = "train") -> TaskData:
        """The client's examples as text (for references and metrics), in index order."""
        return self.data[self.partition.task_of(client)][split].take(
            self.partition.client_indices(client, split)
        )

    def client_arrays(self, client: int, split: str = "train") -> dict[str, np.ndarray]:
        """A client's whole split in index order, padded (copies; batches use the same gather).

        inputs, input_mask `<int32>[n, S]`; targets, target_mask `<int32>[n, T]`; example_ids `[n]`;
        task `[n]` (the client's task, its index in `TASKS`).
        """
        ids = self.partition.client_indices(client, check_split(split))
        return self._gather(self.partition.task_of(client), split, ids.astype(np.int64))

    def _gather(self, task: str, split: str, ids: np.ndarray) -> dict[str, np.ndarray]:
        inputs, input_mask = self._inputs[task][split].pad(ids, self.input_len)
        targets, target_mask = self._targets[task][split].pad(ids, self.target_len)
        return {
            "inputs": inputs,
            "input_mask": input_mask,
            "targets": targets,
            "target_mask": target_mask,
            "example_ids": np.where(ids >= 0, ids, -1).astype(np.int32),
            "task": np.full(np.shape(ids), TASKS.index(task), np.int32),
        }

    def max_steps(self, batch_size: int, epochs: int = 1, split: str = "train") -> int:
        """Most local steps any of the N clients takes for `epochs` passes at `batch_size`."""
        key = (batch_size, epochs, split)
        if key not in self._max_steps_cache:
            n = self.num_examples[check_split(split)]
            self._max_steps_cache[key] = int(epochs * np.max(-(-n // batch_size)))
        return self._max_steps_cache[key]

    def cohort_batches(
        self,
        client_ids: Sequence[int] | np.ndarray,
        round: int,
        seed: int,
        batch_size: int,
        num_steps: int | None = None,
        epochs: int | None = None,
        split: str = "train",
        step_buckets: Sequence[int] | None = None,
    ) -> dict[str, np.ndarray]:
        """Local-training batches of a cohort, stacked: `[C, steps, B, S]` / `[C, steps, B, T]` arrays.

        Each client's order comes from `np.random.default_rng([seed, round, client])` only, so it does not
        depend on the rest of the cohort. With `epochs` (default 1), each epoch is a fresh permutation
        cut into ceil(n / B) batches, the last one partly masked; with `num_steps`, permutations are
        concatenated and cut into exactly `num_steps` full batches. Steps are padded to the smallest of
        `step_buckets` (default: powers of two, capped at the largest client's step count) that fits
        the cohort (`step_buckets=[max_steps(...)]` gives one shape for every round; `num_steps` mode has
        one shape anyway). Client id `PAD_CLIENT` (-1) gives an all-masked row.

        Returns inputs, input_mask `<int32>[C, steps, B, S]`; targets, target_mask `<int32>[C, steps, B, T]`;
        example_mask `<bool>[C, steps, B]`; step_mask `<bool>[C, steps]`; example_ids `<int32>[C, steps, B]`
        (index into the task's split, -1 for padding); task `<int32>[C, steps, B]` (each client's task as
        its index in `TASKS`, padding included); client_ids, num_examples (distinct examples,
        the aggregation weight) and num_steps (real steps), each `<int32>[C]`.
        """
        split = check_split(split)
        clients = self._check_clients(client_ids)
        _check_nonneg(round=round, seed=seed)
        _check_positive(batch_size=batch_size)
        if num_steps is not None and epochs is not None:
            raise ValueError("give num_steps or epochs, not both")
        if num_steps is not None:
            _check_positive(num_steps=num_steps)
        else:
            epochs = 1 if epochs is None else epochs
            _check_positive(epochs=epochs)

        orders = []
        for c in clients:
            n = 0 if c < 0 else int(self.num_examples[split][c])
            if n == 0:
                orders.append(np.full((0, batch_size), -1, np.int64))
                continue
            rng = np.random.default_rng([seed, round, int(c)])
            if num_steps is not None:
                total = num_steps * batch_size
                perms = [rng.permutation(n) for _ in range(-(-total // n))]
                orders.append(np.concatenate(perms)[:total].reshape(num_steps, batch_size))
            else:
                orders.append(
                    np.concatenate([_pad_rows(rng.permutation(n), batch_size) for _ in range(epochs)])
                )
        if num_steps is not None:
            steps = num_steps
        else:
            steps = self._steps(orders, batch_size, epochs, split, step_buckets)
        return self._assemble(clients, orders, steps, batch_size, split)

    def cohort_eval_batches(
        self,
        client_ids: Sequence[int] | np.ndarray,
        batch_size: int,
        split: str = "validation",
        step_buckets: Sequence[int] | None = None,
        max_examples: int | None = None,
    ) -> dict[str, np.ndarray]:
        """A cohort's `split` in index order, as in `cohort_batches` (one epoch, no shuffling).

        `max_examples`: at most that many examples per client, a uniform random subset that is fixed
        per (client, split) so that every round scores the same examples. (Not a prefix: example
        order follows the source files, which are often sorted, e.g. the embedded data by part of
        speech, so a prefix is a biased sample.)
        """
        split = check_split(split)
        clients = self._check_clients(client_ids)
        _check_positive(batch_size=batch_size)
        if max_examples is not None:
            _check_positive(max_examples=max_examples)

        def rows(c: int) -> np.ndarray:
            n = 0 if c < 0 else int(self.num_examples[split][c])
            if max_examples is None or n <= max_examples:
                return np.arange(n)
            rng = np.random.default_rng([EVAL_SUBSET_SEED, int(c), SPLITS.index(split)])
            return np.sort(rng.choice(n, max_examples, replace=False))

        orders = [_pad_rows(rows(c), batch_size) for c in clients]
        steps = self._steps(orders, batch_size, 1, split, step_buckets)
        return self._assemble(clients, orders, steps, batch_size, split)

    def _steps(
        self,
        orders: list[np.ndarray],
        batch_size: int,
        epochs: int,
        split: str,
        step_buckets: Sequence[int] | None,
    ) -> int:
        """Step bucket of a cohort: the next power of two (capped at `max_steps`) or from `step_buckets`."""
        longest = max(1, max(len(o) for o in orders))
        if step_buckets is not None:
            return pick_bucket(longest, step_buckets)
        return max(1, min(1 << (longest - 1).bit_length(), self.max_steps(batch_size, epochs, split)))

    def eval_batches(
        self, client: int, split: str = "validation", batch_size: int = 32
    ) -> Iterator[dict[str, np.ndarray]]:
        """A client's `split` in index order, `[B, ...]` batches; `example_mask <bool>[B]` marks real rows."""
        split = check_split(split)
        (client,) = self._check_clients([client])
        _check_positive(batch_size=batch_size)
        rows = _pad_rows(np.arange(self.num_examples[split][client]), batch_size)
        ids = self.partition.client_indices(client, split).astype(np.int64)
        task = self.partition.task_of(client)
        for row in rows:
            out = self._gather(task, split, np.where(row >= 0, ids[np.maximum(row, 0)], -1))
            out["example_mask"] = row >= 0
            yield out

    def _assemble(
        self, clients: np.ndarray, orders: list[np.ndarray], steps: int, batch_size: int, split: str
    ) -> dict[str, np.ndarray]:
        C, B, S, T = len(clients), batch_size, self.input_len, self.target_len
        out = {
            "inputs": np.zeros((C, steps, B, S), np.int32),
            "input_mask": np.zeros((C, steps, B, S), np.int32),
            "targets": np.zeros((C, steps, B, T), np.int32),
            "target_mask": np.zeros((C, steps, B, T), np.int32),
            "example_ids": np.full((C, steps, B), -1, np.int32),
            "task": np.zeros((C, steps, B), np.int32),  # padding rows too: a client's batches are one task
        }
        real_steps = np.zeros(C, np.int32)
        for i, (c, order) in enumerate(zip(clients, orders)):
            if c < 0 or order.size == 0:
                continue
            if len(order) > steps:
                raise ValueError(f"client {c} needs {len(order)} steps but the step bucket is {steps}")
            real_steps[i] = len(order)
            ids = self.partition.client_indices(c, split).astype(np.int64)
            order_ids = np.where(order >= 0, ids[np.maximum(order, 0)], -1)
            for k, v in self._gather(self.partition.task_of(c), split, order_ids).items():
                out[k][i, : len(order)] = v
            out["task"][i] = TASKS.index(self.partition.task_of(c))
        out["example_mask"] = out["example_ids"] >= 0
        out["step_mask"] = np.arange(steps) < real_steps[:, None]
        out["client_ids"] = clients.astype(np.int32)
        out["num_examples"] = np.array(
            [0 if c < 0 else self.num_examples[split][c] for c in clients], np.int32
        ).reshape(C)
        out["num_steps"] = real_steps
        return out

    def _check_clients(self, client_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        clients = np.asarray(client_ids)
        if clients.ndim != 1 or clients.size == 0 or not np.issubdtype(clients.dtype, np.integer):
            raise ValueError(f"client_ids must be a non-empty 1-D integer array, got {client_ids!r}")
        if clients.max() >= self.num_clients or clients.min() < PAD_CLIENT:
            raise ValueError(
                f"client ids must be in [0, {self.num_clients}) or {PAD_CLIENT} (padding), "
                f"got {clients.tolist()}"
            )
        return clients.astype(np.int64)

    def fingerprint(self) -> str:
        """sha256 (hex) over the partition's fingerprint, S, T and every token."""
        h = hashlib.sha256(f"{self.partition.fingerprint()}:{self.input_len}:{self.target_len}".encode())
        for task in sorted(self._inputs):
            for s in SPLITS:
                for r in (self._inputs[task][s], self._targets[task][s]):
                    h.update(r.lengths.tobytes())
                    h.update(r.tokens.astype("<i4").tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"FederatedData(clients={self.num_clients}, S={self.input_len}, T={self.target_len}, "
            f"train={int(self.num_examples['train'].sum())}, {self.partition!r})"
        )


def _pad_rows(order: np.ndarray, batch_size: int) -> np.ndarray:
    """`[ceil(n / B), B]` rows of `order`, the last padded with -1."""
    rows = -(-len(order) // batch_size)
    out = np.full(rows * batch_size, -1, np.int64)
    out[: len(order)] = order
    return out.reshape(rows, batch_size)


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _check_nonneg(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
