"""Data: tokenizer (more modules, such as tasks and partitions, live alongside)."""

from fedmoe_jax.data.tokenizer import Tokenizer, train_sentencepiece

__all__ = ["Tokenizer", "train_sentencepiece"]
