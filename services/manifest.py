"""manifest.json: the one file that says what a cache holds (the protobuf message `Manifest` of
proto/manifest.proto, in JSON). Readers trust it, never a directory listing, so a shard the
builder wrote but never committed (it died first) is never read, and the next build overwrites it.
"""
from __future__ import annotations

import json
import posixpath

import fsspec
import numpy as np
from google.protobuf import json_format

from actserve.proto.manifest_pb2 import BuildConfig, HookStats, Manifest
from actserve.services.shard_format import bytes_per_value
from actserve.services.storage import CacheError, atomic_write, open_url, storage_error, write_bytes

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "eval")


def manifest_to_json(manifest: Manifest) -> str:
    """The manifest's JSON, the same bytes for the same content: fields in proto order, the `stats`
    map by hook name (protobuf map order depends on insertion history, e.g. a resumed build)."""
    fields = json_format.MessageToDict(manifest, preserving_proto_field_name=True)
    if "stats" in fields:
        fields["stats"] = dict(sorted(fields["stats"].items()))
    return json.dumps(fields, indent=1, ensure_ascii=False) + "\n"


def check_shard_path(path: str, where: str) -> None:
    """A shard path must name a file inside the cache root: relative, normalised, no `..`."""
    inside = (bool(path) and not path.startswith("/") and "\\" not in path and ":" not in path
              and posixpath.normpath(path) == path and ".." not in path.split("/"))
    if not inside:
        raise CacheError(f"{where} is invalid: shard path {path!r} is not a normalised relative path inside "
                         "the cache root")


def read_manifest(url: str, storage_options: dict | None = None) -> Manifest | None:
    """The committed manifest of the cache at `url`, or None when there is no cache there."""
    fs, root = open_url(url, storage_options)
    path = f"{root}/{MANIFEST_NAME}"
    try:
        raw = fs.cat_file(path)
    except (FileNotFoundError, NotADirectoryError) as e:
        if "bucket does not exist" in str(e):
            raise storage_error(url, "read", e) from e
        return None
    except Exception as e:  # noqa: BLE001 - every backend raises its own types
        raise storage_error(url, "read", e) from e
    try:
        manifest = json_format.Parse(raw, Manifest())
    except (json_format.ParseError, UnicodeDecodeError) as e:
        raise CacheError(f"{url}/{MANIFEST_NAME} is not an actserve manifest: {e}") from e
    if manifest.format_version != FORMAT_VERSION:
        raise CacheError(
            f"{url} has cache format {manifest.format_version}; this actserve reads {FORMAT_VERSION}"
        )
    for name in SPLITS:
        for shard in getattr(manifest, name).shards:
            check_shard_path(shard.path, f"{url}/{MANIFEST_NAME}")
    return manifest


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> None:
    atomic_write(fs, f"{root}/{MANIFEST_NAME}", write_bytes(manifest_to_json(manifest).encode()))


def config_differences(old: BuildConfig, new: BuildConfig) -> list[str]:
    """Human-readable `field: old -> new` lines for every field two build configs disagree on."""
    a = json_format.MessageToDict(old, preserving_proto_field_name=True)
    b = json_format.MessageToDict(new, preserving_proto_field_name=True)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def split_complete(manifest: Manifest, split_name: str) -> bool:
    """Every shard of the split is committed (the eval split is built first, so it completes early)."""
    split = getattr(manifest, split_name)
    return manifest.complete or len(split.shards) >= split.planned_shards


def add_stats(stats: HookStats, sums: tuple) -> None:
    """Fold one shard's float64 sums (vector sum, norm sum, squared-norm sum, count) into the
    running means, in shard order, so that a resumed build gives the same numbers."""
    vec, norm_sum, sq_sum, count = sums
    total = stats.count + count
    mean = np.asarray(stats.mean, dtype=np.float64) if stats.count else np.zeros_like(vec)
    new_mean = (mean * stats.count + vec) / total
    stats.mean_norm = (stats.mean_norm * stats.count + norm_sum) / total
    stats.mean_sq_norm = (stats.mean_sq_norm * stats.count + sq_sum) / total
    stats.count = total
    del stats.mean[:]
    stats.mean.extend(new_mean.tolist())


def summary(manifest: Manifest, url: str) -> str:
    """The `actserve cache info` text."""
    c = manifest.config
    lines = [
        f"cache        {url}",
        f"model        {c.model}  (d_model {manifest.d_model}, n_ctx {manifest.n_ctx}, vocab {manifest.d_vocab})",
        f"dataset      {c.dataset}  [{c.dataset_split}]",
        f"hooks        {len(c.hooks)}: {', '.join(c.hooks)}",
        f"dtype        {c.dtype}   context {c.context_size}   prepend_bos {c.prepend_bos}   "
        f"rows {'position-major' if c.position_major else 'in sequence order'}",
        "processing   " + ", ".join(
            f"{k}={v}" for k, v in json_format.MessageToDict(
                c.processing, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            ).items()
        ),
    ]
    row_bytes = len(c.hooks) * manifest.d_model * bytes_per_value(c.dtype)
    for name in SPLITS:
        split = getattr(manifest, name)
        size = sum(s.num_bytes for s in split.shards)
        lines.append(
            f"{name:<12} {split.num_tokens:,} tokens in {len(split.shards)}/{split.planned_shards} shards,"
            f" {size / 1e6:,.1f} MB ({row_bytes:,} activation bytes per token)"
        )
    for hook, st in manifest.stats.items():
        lines.append(f"  {hook:<32} mean |x| {st.mean_norm:9.3f}   mean |x|^2 {st.mean_sq_norm:11.3f}")
    lines.append("status       " + ("complete (not verified: run actserve cache verify)" if manifest.complete
                                  else "incomplete (build still running or interrupted)"))
    return "\n".join(lines)
