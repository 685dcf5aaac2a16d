"""UMT5 text encoder: model (math), checkpoint loader/writer, tokenizer, parallel layouts."""
from .loader import load_t5_encoder, save_t5_encoder
from .model import T5Config, T5Encoder
from .parallelize import MODES, load_parallel_t5, parallelize_t5
from .shard import T5Shard
from .tokenizer import load_tokenizer, tokenize

__all__ = ["MODES", "T5Config", "T5Encoder", "T5Shard", "load_parallel_t5", "load_t5_encoder", "load_tokenizer", "parallelize_t5",
           "save_t5_encoder", "tokenize"]
