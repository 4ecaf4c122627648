"""Node-local cache of remote shards: each shard of an s3:// (or other remote) cache is fetched
once per node, however many streams and server processes read it.

Layout: <directory>/<key>/<shard path>, one shard per entry, where key hashes the shard's URL, size
and version (ETag or modification time), so a cache rebuilt at the same URL is never served stale.
Several server processes on a node share the directory safely with file locks:
  * <key>.lock, shared while an entry is read, exclusive while it is fetched: a shard is fetched by
    one process while the others wait, and never evicted while someone reads it;
  * .evict.lock, held while choosing and deleting entries: least recently used first (an entry's
    mtime is touched on every read), until the new shard fits in max_bytes.
A fetch writes under a temporary name and renames, so a crashed fetch leaves no half shard. The
directory holds at most max_bytes plus the shards being fetched at that moment.
Fetches use concurrent large ranged reads (FETCH_BLOCK each): one ranged GET per 16 MiB, several
in flight, which is what object stores serve fastest.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
import time

import fsspec
import pyarrow as pa

from actserve.proto.manifest_pb2 import Shard
from actserve.services.shard_format import ROW_GROUP_BYTES, read_shard, shard_errors
from actserve.services.storage import CacheError, atomic_write

FETCH_BLOCK = ROW_GROUP_BYTES
FETCH_PARALLEL = 8            # ranged reads in flight per fetch
READ_ATTEMPTS = 3             # an entry evicted between fetch and read is fetched again


class ShardCache:
    def __init__(self, directory: str, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"the local shard cache needs a positive size, got {max_bytes} bytes")
        self.directory = os.path.abspath(directory)
        self.max_bytes = max_bytes
        self.local_fs = fsspec.filesystem("file")
        self.fetches = 0      # shards this instance copied in
        self.hits = 0         # reads of a shard already there (fetched earlier, by any process)
        self._count_lock = threading.Lock()
        os.makedirs(self.directory, exist_ok=True)

    def read(self, fs: fsspec.AbstractFileSystem, root: str, shard: Shard, columns: list[str],
             row_groups: list[int] | None = None, group_rows: int = 0) -> pa.Table:
        """The shard's columns (of `row_groups` only, when given), from the local copy (fetched first if needed)."""
        self._check_inside(shard)
        remote = f"{root}/{shard.path}"
        try:
            info = fs.info(remote)
        except FileNotFoundError as e:
            raise CacheError(f"shard {shard.path} is missing from the cache") from e
        if info["size"] != shard.num_bytes:
            raise CacheError(
                f"shard {shard.path} is corrupt: {info['size']} bytes on storage, manifest says {shard.num_bytes}"
            )
        version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
        key = hashlib.sha256(f"{fs.unstrip_protocol(remote)}|{info['size']}|{version}".encode()).hexdigest()[:32]
        entry = os.path.join(self.directory, key)
        local = os.path.join(entry, shard.path)
        fetched = False
        for _ in range(READ_ATTEMPTS):
            with self._locked(f"{entry}.lock", fcntl.LOCK_SH):
                if os.path.exists(local):
                    now = time.time_ns()  # explicit: the clock the kernel stamps files with is coarse
                    os.utime(local, ns=(now, now))  # most recently used
                    if not fetched:
                        with self._count_lock:
                            self.hits += 1
                    return self._read_local(entry, local, shard, columns, row_groups, group_rows)
            with self._locked(f"{entry}.lock", fcntl.LOCK_EX):
                if not os.path.exists(local):  # another process may have fetched it meanwhile
                    self._fetch(fs, remote, local, shard)
                    fetched = True
        raise CacheError(
            f"shard {shard.path} was evicted from the local shard cache {self.directory} before it could be "
            f"read, {READ_ATTEMPTS} times: the cache ({self.max_bytes / 1e9:.1f} GB) is too small for the "
            "blocks being served"
        )

    def _check_inside(self, shard: Shard) -> None:
        """An entry's files stay under its directory, whatever path a Shard carries."""
        probe = os.path.join(self.directory, "entry")
        local = os.path.normpath(os.path.join(probe, shard.path))
        if os.path.isabs(shard.path) or os.path.commonpath([probe, local]) != probe or local == probe:
            raise CacheError(f"shard path {shard.path!r} would leave the local shard cache {self.directory}")

    def _read_local(self, entry: str, local: str, shard: Shard, columns: list[str],
                    row_groups: list[int] | None, group_rows: int) -> pa.Table:
        try:
            return read_shard(self.local_fs, entry, shard, columns, row_groups, group_rows)
        except CacheError:
            os.remove(local)  # a damaged copy: fetch it again next time rather than keep failing
            raise

    def _fetch(self, fs: fsspec.AbstractFileSystem, remote: str, local: str, shard: Shard) -> None:
        self._evict_for(shard.num_bytes)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        size = shard.num_bytes

        def fetch(target: str) -> None:
            with open(target, "wb") as out:
                step = FETCH_BLOCK * FETCH_PARALLEL
                for first in range(0, size, step):
                    starts = list(range(first, min(size, first + step), FETCH_BLOCK))
                    ends = [min(s + FETCH_BLOCK, size) for s in starts]
                    for part in fs.cat_ranges([remote] * len(starts), starts, ends):
                        out.write(part)
            if os.path.getsize(target) != size:
                raise CacheError(f"shard {shard.path} is corrupt: fetched {os.path.getsize(target)} bytes, manifest says {size}")

        with shard_errors(shard, f"could not be fetched from {remote}"):
            atomic_write(self.local_fs, local, fetch)
        with self._count_lock:
            self.fetches += 1

    def _evict_for(self, incoming: int) -> None:
        with self._locked(os.path.join(self.directory, ".evict.lock"), fcntl.LOCK_EX):
            entries = []  # (mtime, size, entry dir)
            for entry in os.scandir(self.directory):
                if entry.is_dir():
                    files = [os.path.join(d, f) for d, _, names in os.walk(entry.path) for f in names]
                    stats = [os.stat(f) for f in files]
                    entries.append((max((s.st_mtime for s in stats), default=0), sum(s.st_size for s in stats), entry.path))
            used = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries):
                if used + incoming <= self.max_bytes:
                    break
                with self._try_locked(f"{path}.lock") as acquired:
                    if acquired:  # nobody is reading or fetching it
                        shutil.rmtree(path, ignore_errors=True)
                        used -= size

    @contextlib.contextmanager
    def _locked(self, path: str, mode: int):
        with open(path, "a") as f:
            fcntl.flock(f, mode)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _try_locked(self, path: str):
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
