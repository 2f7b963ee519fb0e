"""Offline conversion: raw data sets -> WebDataset shards + manifest (the engine behind tools/shard.py).

One module per source format (digits, cifar, animal10n, webvision, folder) lists its samples; `noise` makes or
loads the training labels; `engine` decodes, verifies and writes them through `ccl.pipeline.tarshard.ShardWriter`.
"""

from ccl.pipeline.convert.engine import FORMATS, READERS, convert, default_cache, ensure_digits, read_source
from ccl.pipeline.convert.source import ConvertOptions, Item, Source

__all__ = ["FORMATS", "READERS", "ConvertOptions", "Item", "Source", "convert", "default_cache", "ensure_digits",
           "read_source"]
