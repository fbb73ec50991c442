"""Federated text data: tasks and metrics, the embedded WordNet benchmark, TFDS loaders,
heterogeneous partitions, per-client token arrays, and the SentencePiece tokenizer."""

from fedmoe_jax.data.client_arrays import FederatedData
from fedmoe_jax.data.embedded import benchmark_dir, embedded_tokenizer, load_embedded, load_embedded_benchmark
from fedmoe_jax.data.partition import Partition, assign_tasks, make_partition
from fedmoe_jax.data.tasks import (
    PRIMARY_METRIC,
    SPLITS,
    TASKS,
    TaskData,
    task_scores,
)
from fedmoe_jax.data.tfds_sources import load_tfds_task
from fedmoe_jax.data.tokenizer import Tokenizer, train_sentencepiece

__all__ = [
    "PRIMARY_METRIC",
    "SPLITS",
    "TASKS",
    "FederatedData",
    "Partition",
    "TaskData",
    "Tokenizer",
    "assign_tasks",
    "benchmark_dir",
    "embedded_tokenizer",
    "load_embedded",
    "load_embedded_benchmark",
    "load_tfds_task",
    "make_partition",
    "task_scores",
    "train_sentencepiece",
]
