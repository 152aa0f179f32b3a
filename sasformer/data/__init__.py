"""Data: tokenizers, document sources, token shards, ``prepare`` and the training/evaluation loaders."""

from sasformer.data.loader import TokenLoader, TokenStream, eval_batches, load_data_tokenizer
from sasformer.data.prepare import PrepareOptions, prepare
from sasformer.data.shards import Shard, ShardError, ShardHeader, read_header, write_shard
from sasformer.data.sources import Document, iter_documents, resolve_inputs
from sasformer.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "Document",
    "PrepareOptions",
    "Shard",
    "ShardError",
    "ShardHeader",
    "TokenLoader",
    "TokenStream",
    "Tokenizer",
    "eval_batches",
    "iter_documents",
    "load_data_tokenizer",
    "load_tokenizer",
    "prepare",
    "read_header",
    "resolve_inputs",
    "train_bpe",
    "write_shard",
]
