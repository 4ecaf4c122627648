"""A served cache: its manifest (re-read while the cache is still being built) and its shards,
read from local disk directly or through the node-local shard cache for remote storage."""
from __future__ import annotations

import pyarrow as pa

from actserve.proto.manifest_pb2 import Manifest, Shard
from actserve.proto.stream_pb2 import CacheInfo
from actserve.services.manifest import read_manifest
from actserve.services.shard_cache import ShardCache
from actserve.services.shard_format import read_shard
from actserve.services.storage import CacheError, is_local, open_url


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

    def manifest(self) -> Manifest:
        if not self._manifest.complete:  # a build is (or was) running: pick up new commits
            self._manifest = read_manifest(self.url, self.storage_options) or self._manifest
        return self._manifest

    def read(self, shard: Shard, columns: list[str], row_groups: list[int] | None = None, group_rows: int = 0) -> pa.Table:
        """The shard's columns; only `row_groups` (in that order) when given (shard_format.read_shard)."""
        if self.shard_cache is not None:
            return self.shard_cache.read(self.fs, self.root, shard, columns, row_groups, group_rows)
        return read_shard(self.fs, self.root, shard, columns, row_groups, group_rows)

    def info(self) -> CacheInfo:
        return CacheInfo(name=self.name, url=self.url, manifest=self.manifest())
