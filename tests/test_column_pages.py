"""services/column_pages.py: a local shard's rows read from its memory-mapped pages are the bytes
pyarrow decodes, every page's CRC32 is checked, and a file in another layout or with a damaged
page header fails with one CacheError naming the shard."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from actserve.proto.manifest_pb2 import Shard
from actserve.services.column_pages import ShardPages
from actserve.services.shard_format import META_COLUMNS, read_shard
from actserve.services.storage import LOCAL_FS, CacheError
from actserve.services.stream_plan import group_rows
from actserve.testing import SyntheticSpec, write_synthetic_cache

# row groups (one position of the 2000 sequences each) of several pages per column
SPEC = SyntheticSpec(d_model=768, context_size=8, sequences_per_shard=2000, train_shards=1, eval_shards=0)


@pytest.fixture
def shard(tmp_path):
    url = str(tmp_path / "cache")
    manifest = write_synthetic_cache(url, SPEC)
    return url, manifest.train.shards[0], group_rows(manifest)


def column_rows(pages: ShardPages, group: int, name: str, width: int) -> np.ndarray:
    return np.concatenate([pages.values(page) for page in pages.column(group, name, width)])


def test_mapped_rows_equal_pyarrows_decode_for_every_column(shard):
    url, entry, rows_per_group = shard
    table = read_shard(LOCAL_FS, url, entry)
    pages = ShardPages(LOCAL_FS, url, entry, rows_per_group)
    groups = pages.metadata.num_row_groups
    assert groups > 1 and len(pages.column(0, SPEC.hooks[0], SPEC.d_model * 2)) > 1
    for name in table.schema.names:
        column = table.column(name).combine_chunks()
        width = 8 if name == "sequence" else 4 if name in META_COLUMNS else column.type.byte_width
        expected = np.frombuffer(column.buffers()[1], np.uint8).reshape(len(column), width)
        got = np.concatenate([column_rows(pages, g, name, width) for g in range(groups)])
        assert np.array_equal(got, expected), name


def test_a_flipped_value_byte_fails_its_page_checksum(shard):
    url, entry, rows_per_group = shard
    hook, width = SPEC.hooks[1], SPEC.d_model * 2
    pages = ShardPages(LOCAL_FS, url, entry, rows_per_group)
    page = pages.column(0, hook, width)[0]
    at = page.values.ctypes.data - np.frombuffer(pages.map, np.uint8).ctypes.data  # the page's bytes in the file
    with open(f"{url}/{entry.path}", "r+b") as f:
        f.seek(at + 1)
        byte = f.read(1)[0]
        f.seek(at + 1)
        f.write(bytes([byte ^ 0xFF]))
    pages = ShardPages(LOCAL_FS, url, entry, rows_per_group)
    with pytest.raises(CacheError, match=f"shard {entry.path} is corrupt: a data page fails its CRC32 checksum"):
        pages.values(pages.column(0, hook, width)[0])


def test_a_damaged_page_header_is_a_corrupt_shard(shard):
    url, entry, rows_per_group = shard
    hook = SPEC.hooks[0]
    start = pq.read_metadata(f"{url}/{entry.path}").row_group(0).column(3).data_page_offset
    data = bytearray(open(f"{url}/{entry.path}", "rb").read())
    data[start:start + 16] = bytes([0x15, 0x04]) + bytes(14)  # a page header of type 2 (dictionary) and no sizes
    open(f"{url}/{entry.path}", "wb").write(bytes(data))
    with pytest.raises(CacheError, match=f"shard {entry.path} is corrupt: column {hook} row group 0 has a page of type 2"):
        ShardPages(LOCAL_FS, url, entry, rows_per_group).column(0, hook, SPEC.d_model * 2)


def test_a_compressed_shard_is_refused_with_one_line(shard, tmp_path):
    url, entry, rows_per_group = shard
    table = read_shard(LOCAL_FS, url, entry)
    path = f"{url}/{entry.path}"
    pq.write_table(table, path, row_group_size=rows_per_group, compression="zstd")
    rewritten = Shard()
    rewritten.CopyFrom(entry)
    rewritten.num_bytes = LOCAL_FS.size(path)
    with pytest.raises(CacheError, match=f"shard {entry.path} column {SPEC.hooks[0]} is not in the shard layout "
                                         r"\(compression ZSTD"):
        ShardPages(LOCAL_FS, url, rewritten, rows_per_group).column(0, SPEC.hooks[0], SPEC.d_model * 2)
