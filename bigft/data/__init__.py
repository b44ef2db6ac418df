"""Data: load, format, tokenize, mask, clean, split, pack, collate, shard.

`prepare_data` does everything that can fail on user data, up front; `pack`, `Collator`
and `TrainLoader` turn its output into training batches.
"""

from bigft.data.formats import prompt_and_reference
from bigft.data.loader import TrainLoader, data_loader, eval_batches
from bigft.data.packing import Collator, pack
from bigft.data.pipeline import DataStats, PreparedData, SplitStats, prepare_data

__all__ = [
    "Collator",
    "DataStats",
    "PreparedData",
    "SplitStats",
    "TrainLoader",
    "data_loader",
    "eval_batches",
    "pack",
    "prepare_data",
    "prompt_and_reference",
]
