"""dsjax.io: the 3FS reader.

Batched record reads from a native engine (page-cache copies from read-only file mappings with a
pread thread pool for what is not cached, or io_uring, on any POSIX file system; 3FS's USRBIO on a
3FS mount), the FFRecord format, a grain data source with a batch read
path, and token shards for pretraining.
"""

from dsjax.io._engine import ENGINES, open_engine
from dsjax.io.ffrecord import FFRecordError, FFRecordHeader, FFRecordReader, FFRecordWriter, parse_header, read_header
from dsjax.io.source import ThreeFSDataSource
from dsjax.io.tokens import BYTE_EOS_ID, BYTE_VOCAB_SIZE, TokenDataset, byte_tokenize, write_token_shards

__all__ = [
    "ENGINES",
    "BYTE_EOS_ID",
    "BYTE_VOCAB_SIZE",
    "FFRecordError",
    "FFRecordHeader",
    "FFRecordReader",
    "FFRecordWriter",
    "ThreeFSDataSource",
    "TokenDataset",
    "byte_tokenize",
    "open_engine",
    "parse_header",
    "read_header",
    "write_token_shards",
]
