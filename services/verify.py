"""`actserve cache verify`: every committed shard of a cache checked fully (size, whole-file
sha256 when the manifest records one, every data page's CRC32 and row count by reading it)."""
from __future__ import annotations

import hashlib

from actserve.services.manifest import SPLITS, read_manifest
from actserve.services.shard_format import read_shard
from actserve.services.storage import CacheError, open_url

HASH_CHUNK = 8 << 20  # bytes read at a time when hashing a shard through fsspec (any URL)


def verify_cache(url: str, storage_options: dict | None = None) -> list[str]:
    """One line per problem found in the cache at `url`; empty when every shard is sound and the
    manifest is complete. CacheError when there is no readable manifest at all."""
    manifest = read_manifest(url, storage_options)
    if manifest is None:
        raise CacheError(f"no cache at {url} (no manifest.json there)")
    fs, root = open_url(url, storage_options)
    problems = [] if manifest.complete else ["the manifest is not complete (build still running or interrupted)"]
    for name in SPLITS:
        for shard in getattr(manifest, name).shards:
            try:
                check_sha256(fs, root, shard)
                read_shard(fs, root, shard)
            except CacheError as e:
                problems.append(str(e))
    return problems


def check_sha256(fs, root: str, shard) -> None:
    if not shard.sha256:
        return  # not recorded by the build that wrote it
    path = f"{root}/{shard.path}"
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    except FileNotFoundError as e:
        raise CacheError(f"shard {shard.path} is missing from the cache") from e
    except OSError as e:
        raise CacheError(f"shard {shard.path} could not be read: {e}") from e
    if digest.hexdigest() != shard.sha256:
        raise CacheError(f"shard {shard.path} is corrupt: sha256 {digest.hexdigest()[:16]}..., "
                         f"manifest says {shard.sha256[:16]}...")
