"""Rows of a local shard's columns straight from its memory-mapped file, without a Parquet decode.

write_shard's columns are required (no definition or repetition levels), PLAIN-encoded,
uncompressed and without dictionary pages, so each data page of a column chunk is a page header
(Thrift compact protocol) followed by its rows' values back to back: the bytes an Arrow buffer of
the column would hold. A row group's column is then a list of `Page`s, numpy views into the map;
the server copies the rows it wants straight from them into a shuffle buffer (block_reader.py).
Each page's CRC32 is checked every time its rows are used (`ShardPages.values`), as pyarrow's
page_checksum_verification does on every read (zlib-ng's SIMD CRC32, about 3x zlib's, which
releases the GIL while it runs). A file laid out otherwise (another encoding, a
compressed or dictionary page, pages that do not add up to the row group) is a CacheError naming
the shard, like any corrupt shard.
"""
from __future__ import annotations

import mmap
import threading
from typing import NamedTuple

import fsspec
import numpy as np
import pyarrow.parquet as pq
from zlib_ng import zlib_ng

from actserve.proto.manifest_pb2 import Shard
from actserve.services.shard_format import check_row_groups, check_size, shard_errors
from actserve.services.storage import CacheError

HEADER_BYTES = 4096  # a page header is parsed within this many bytes (write_shard's are under 100)
DATA_PAGE, DATA_PAGE_V2 = 0, 3  # parquet.thrift PageType
PLAIN = 0  # parquet.thrift Encoding


class Page(NamedTuple):
    first_row: int        # within the row group
    values: np.ndarray    # [rows, width] uint8, a view into the map (not yet checked)
    crc: int | None       # CRC32 of the page's bytes as the header records it


def varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("a Thrift varint longer than 64 bits")


def zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def thrift_value(buf, pos: int, kind: int):
    """One value of Thrift compact type `kind` at pos: (value, position after it)."""
    if kind in (1, 2):  # booleans live in the field header
        return kind == 1, pos
    if kind == 3:
        return buf[pos], pos + 1
    if kind in (4, 5, 6):
        n, pos = varint(buf, pos)
        return zigzag(n), pos
    if kind == 7:
        return None, pos + 8
    if kind == 8:
        n, pos = varint(buf, pos)
        return bytes(buf[pos:pos + n]), pos + n
    if kind in (9, 10):
        head = buf[pos]
        size, element = head >> 4, head & 0x0F
        pos += 1
        if size == 15:
            size, pos = varint(buf, pos)
        items = []
        for _ in range(size):
            if element in (1, 2):  # a boolean element is one byte
                item, pos = buf[pos] == 1, pos + 1
            else:
                item, pos = thrift_value(buf, pos, element)
            items.append(item)
        return items, pos
    if kind == 11:
        size, pos = varint(buf, pos)
        if size == 0:
            return {}, pos
        types = buf[pos]
        pos += 1
        out = {}
        for _ in range(size):
            key, pos = thrift_value(buf, pos, types >> 4)
            out[key], pos = thrift_value(buf, pos, types & 0x0F)
        return out, pos
    if kind == 12:
        return thrift_struct(buf, pos)
    raise ValueError(f"unknown Thrift compact type {kind}")


def thrift_struct(buf, pos: int) -> tuple[dict, int]:
    """A Thrift compact struct at pos as {field id: value}, and the position after it."""
    fields, last = {}, 0
    while True:
        head = buf[pos]
        pos += 1
        if head == 0:
            return fields, pos
        delta, kind = head >> 4, head & 0x0F
        if delta:
            field = last + delta
        else:
            n, pos = varint(buf, pos)
            field = zigzag(n)
        fields[field], pos = thrift_value(buf, pos, kind)
        last = field


class ShardPages:
    """One local shard, memory-mapped once: its row groups' columns as pages of rows."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, shard: Shard, group_rows: int):
        self.shard = shard
        path = f"{root}/{shard.path}"
        with shard_errors(shard, "is corrupt"):
            check_size(fs, path, shard)
            with open(path, "rb") as f:
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.metadata = pq.read_metadata(path)
            check_row_groups(self.metadata, shard, group_rows)
        self.columns = {name: i for i, name in enumerate(self.metadata.schema.names)}
        self.pages: dict[tuple[int, str], list[Page]] = {}
        self.lock = threading.Lock()

    def column(self, group: int, name: str, width: int) -> list[Page]:
        """The pages of one row group's column (located once, then remembered)."""
        key = (group, name)
        with self.lock:
            pages = self.pages.get(key)
        if pages is None:
            with shard_errors(self.shard, "is corrupt"):
                pages = self.locate(group, name, width)
            with self.lock:
                self.pages[key] = pages
        return pages

    def locate(self, group: int, name: str, width: int) -> list[Page]:
        row_group = self.metadata.row_group(group)
        chunk = row_group.column(self.columns[name])
        if chunk.compression != "UNCOMPRESSED" or chunk.has_dictionary_page:
            raise CacheError(f"shard {self.shard.path} column {name} is not in the shard layout "
                             f"(compression {chunk.compression}, dictionary {chunk.has_dictionary_page})")
        view = memoryview(self.map)
        pages, rows, pos = [], 0, chunk.data_page_offset
        while rows < row_group.num_rows:
            header, start = thrift_struct(view[pos:pos + HEADER_BYTES], 0)
            start += pos
            kind, size = header.get(1), header.get(3, -1)
            data = header.get(5) if kind == DATA_PAGE else header.get(8) if kind == DATA_PAGE_V2 else None
            if data is None or header.get(2) != size:
                raise CacheError(f"shard {self.shard.path} is corrupt: column {name} row group {group} has a page of "
                                 f"type {kind} (sizes {header.get(2)}/{size}) where a plain data page should be")
            count, encoding = data.get(1, -1), data.get(2 if kind == DATA_PAGE else 4)
            levels = 0 if kind == DATA_PAGE else data.get(5, 0) + data.get(6, 0)
            if encoding != PLAIN or levels or count < 1 or count * width != size or start + size > len(self.map):
                raise CacheError(f"shard {self.shard.path} is corrupt: column {name} row group {group} has a page of "
                                 f"{count} values in {size} bytes (encoding {encoding}), not {width}-byte plain rows")
            values = np.frombuffer(self.map, np.uint8, count=size, offset=start).reshape(count, width)
            pages.append(Page(rows, values, header.get(4)))
            rows += count
            pos = start + size
        if rows != row_group.num_rows:
            raise CacheError(f"shard {self.shard.path} is corrupt: column {name} row group {group} holds {rows} rows "
                             f"in its pages, its metadata says {row_group.num_rows}")
        return pages

    def values(self, page: Page) -> np.ndarray:
        """The page's rows, once its CRC32 matches."""
        if page.crc is not None and zlib_ng.crc32(page.values) != page.crc & 0xFFFFFFFF:
            raise CacheError(f"shard {self.shard.path} is corrupt: a data page fails its CRC32 checksum")
        return page.values
