"""A served cache: its manifest (re-read while the cache is still being built) and its shards:
local ones memory-mapped and kept open (column_pages.py), remote ones read through the node-local
shard cache."""
from __future__ import annotations

import threading
from collections import OrderedDict

import pyarrow as pa

from actserve.proto.manifest_pb2 import Manifest, Shard
from actserve.proto.stream_pb2 import CacheInfo
from actserve.services.column_pages import ShardPages
from actserve.services.manifest import read_manifest
from actserve.services.shard_cache import ShardCache
from actserve.services.shard_format import read_shard
from actserve.services.storage import CacheError, is_local, open_url

OPEN_SHARDS = 256  # local shards a source keeps mapped (least recently used dropped first)


class CacheSource:
    def __init__(self, name: str, url: str, storage_options: dict, shard_cache: ShardCache | None):
        self.name, self.url = name, url
        self.storage_options = storage_options
        self.fs, self.root = open_url(url, storage_options)
        self.shard_cache = None if is_local(self.fs) else shard_cache  # local disk needs no copy
        manifest = read_manifest(url, storage_options)
        if manifest is None:
            raise CacheError(f"no cache at {url} (no manifest.json there)")
        self._manifest = manifest
        self.mapped: OrderedDict[tuple, ShardPages] = OrderedDict()
        self.mapped_lock = threading.Lock()

    @property
    def local(self) -> bool:
        """Shards on this machine's disk, read through `pages`; others through `read`."""
        return is_local(self.fs)

    def manifest(self) -> Manifest:
        if not self._manifest.complete:  # a build is (or was) running: pick up new commits
            self._manifest = read_manifest(self.url, self.storage_options) or self._manifest
        return self._manifest

    def read(self, shard: Shard, columns: list[str], row_groups: list[int] | None = None, group_rows: int = 0) -> pa.Table:
        """The shard's columns; only `row_groups` (in that order) when given (shard_format.read_shard)."""
        if self.shard_cache is not None:
            return self.shard_cache.read(self.fs, self.root, shard, columns, row_groups, group_rows)
        return read_shard(self.fs, self.root, shard, columns, row_groups, group_rows)

    def pages(self, shard: Shard, group_rows: int) -> ShardPages:
        """A local shard's pages, mapped on first use and kept for the streams that follow."""
        key = (shard.path, shard.num_bytes, shard.sha256)
        with self.mapped_lock:
            pages = self.mapped.get(key)
            if pages is not None:
                self.mapped.move_to_end(key)
                return pages
        pages = ShardPages(self.fs, self.root, shard, group_rows)
        with self.mapped_lock:
            self.mapped[key] = pages
            while len(self.mapped) > OPEN_SHARDS:
                self.mapped.popitem(last=False)  # unmapped once the last view of it goes
        return pages

    def info(self) -> CacheInfo:
        return CacheInfo(name=self.name, url=self.url, manifest=self.manifest())
