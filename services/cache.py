"""The activation cache on any fsspec URL: manifest, shard files, atomic commits.

Layout and the Parquet schema are documented in proto/manifest.proto. The rules that keep a cache
crash-safe, on local disk and on S3 alike (which has no rename):
  * a shard or manifest becomes visible in ONE write: a local file is written under a temporary
    name and renamed; an object store gets a single PUT, which it publishes atomically;
  * readers trust manifest.json, never a directory listing, so a shard the builder wrote but never
    committed (it died first) is never read, and the next build overwrites it.
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from google.protobuf import json_format

from proto.manifest_pb2 import BuildConfig, Manifest, Shard

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "eval")
META_COLUMNS = ("sequence", "position", "token")

# bytes per value, and the torch dtype activations decode to
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ROW_GROUP_BYTES = 16 << 20  # one row group per ~16 MiB: a good size for one ranged GET


class CacheError(Exception):
    """A cache that cannot be used as asked: the message says which cache and why."""


def bytes_per_value(dtype: str) -> int:
    return DTYPES[dtype].itemsize


# --- storage -----------------------------------------------------------------------------------


def open_url(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of a cache URL (local path, file://, s3://, ...)."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, root.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, write: Callable) -> int:
    """Create `path` so that readers see either no file (or the old one) or the whole new one, and
    return its size. `write(target)` writes the content to `target`: a local path (a temporary
    name, fsynced and renamed) or, for object stores, an Arrow buffer then sent in one PUT."""
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # the data is on disk before any manifest can name it
            finally:
                os.close(fd)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return os.path.getsize(path)
    sink = pa.BufferOutputStream()
    write(sink)
    data = sink.getvalue().to_pybytes()
    fs.pipe_file(path, data)  # one PUT (or one completed multipart upload): atomic
    return len(data)


def write_bytes(data: bytes) -> Callable:
    """An `atomic_write` writer for bytes already in memory."""
    def write(target):
        if isinstance(target, str):
            with open(target, "wb") as f:
                f.write(data)
        else:
            target.write(data)
    return write


def check_writable(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    """Fail early, before any work, if the cache location cannot be written."""
    probe = f"{root}/.actserve-probe-{uuid.uuid4().hex}"
    try:
        if is_local(fs):  # object stores have no directories; makedirs there could create a bucket
            fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as e:  # noqa: BLE001 - every backend raises its own types
        raise storage_error(url, "write to cache URL", e) from e


def storage_error(url: str, action: str, error: Exception) -> CacheError:
    """One line saying what went wrong with the storage behind `url`, and what to set."""
    name, text = type(error).__name__, str(error)
    if name == "NoCredentialsError":
        hint = ("no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "attach an instance profile, or pass key/secret in --storage-options")
    elif name in ("EndpointConnectionError", "ConnectTimeoutError") or isinstance(error, ConnectionError):
        hint = "the storage endpoint did not answer: is it running? check endpoint_url in --storage-options"
    elif isinstance(error, PermissionError):
        hint = "access denied: the credentials lack permission on this location"
    elif "bucket does not exist" in text or "NoSuchBucket" in text:
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        hint = f"bucket {bucket!r} does not exist: create it or fix the URL"
    else:
        hint = f"{name}"
    return CacheError(f"cannot {action} {url}: {hint} ({text.splitlines()[0] if text else name})")


# --- manifest ----------------------------------------------------------------------------------


def manifest_to_json(manifest: Manifest) -> str:
    return json_format.MessageToJson(manifest, preserving_proto_field_name=True, indent=1) + "\n"


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
    return manifest


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> None:
    atomic_write(fs, f"{root}/{MANIFEST_NAME}", write_bytes(manifest_to_json(manifest).encode()))


def config_differences(old: BuildConfig, new: BuildConfig) -> list[str]:
    """Human-readable `field: old -> new` lines for every field two build configs disagree on."""
    a = json_format.MessageToDict(old, preserving_proto_field_name=True)
    b = json_format.MessageToDict(new, preserving_proto_field_name=True)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


# --- shard encoding ----------------------------------------------------------------------------


def hook_field(hook: str, d_model: int, dtype: str) -> pa.Field:
    width = d_model * bytes_per_value(dtype)
    return pa.field(hook, pa.binary(width), nullable=False,
                    metadata={"dtype": dtype, "d_model": str(d_model)})


def shard_schema(hooks: list[str], d_model: int, dtype: str) -> pa.Schema:
    return pa.schema(
        [pa.field("sequence", pa.int64(), nullable=False),
         pa.field("position", pa.int32(), nullable=False),
         pa.field("token", pa.int32(), nullable=False)]
        + [hook_field(h, d_model, dtype) for h in hooks]
    )


def encode_activations(values: torch.Tensor) -> pa.FixedSizeBinaryArray:
    """[rows, d_model] CPU tensor -> fixed_size_binary column over the same bytes (no copy)."""
    values = values.contiguous()
    raw = values.view(torch.uint8).numpy()  # works for bfloat16 too, which numpy lacks
    width = raw.shape[1]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(raw), [None, pa.py_buffer(raw)])


def decode_activations(column: pa.Array | pa.ChunkedArray, dtype: str, d_model: int) -> torch.Tensor:
    """fixed_size_binary column -> [rows, d_model] tensor of `dtype`, viewing Arrow's buffer."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    width = d_model * bytes_per_value(dtype)
    data = column.buffers()[1]
    start = column.offset * width
    view = memoryview(data)[start:start + len(column) * width]
    if len(view) == 0:
        return torch.empty((0, d_model), dtype=DTYPES[dtype])
    return torch.frombuffer(view, dtype=DTYPES[dtype]).view(len(column), d_model)


def rows_per_row_group(row_bytes: int, context_size: int) -> int:
    """Whole sequences per row group, about ROW_GROUP_BYTES each."""
    sequences = max(1, ROW_GROUP_BYTES // (row_bytes * context_size))
    return sequences * context_size


def write_shard(
    fs: fsspec.AbstractFileSystem,
    path: str,
    tokens: np.ndarray,
    first_sequence: int,
    activations: dict[str, torch.Tensor],
    hooks: list[str],
    dtype: str,
) -> int:
    """Write one shard (tokens [n_seq, ctx], activations {hook: [n_seq*ctx, d_model]}) atomically;
    returns its size in bytes. Not committed until a manifest lists it."""
    n_seq, ctx = tokens.shape
    d_model = activations[hooks[0]].shape[1]
    schema = shard_schema(hooks, d_model, dtype)
    columns = [
        pa.array(np.repeat(np.arange(first_sequence, first_sequence + n_seq, dtype=np.int64), ctx)),
        pa.array(np.tile(np.arange(ctx, dtype=np.int32), n_seq)),
        pa.array(tokens.reshape(-1).astype(np.int32, copy=False)),
    ] + [encode_activations(activations[h]) for h in hooks]
    table = pa.Table.from_arrays(columns, schema=schema)
    row_bytes = sum(f.type.byte_width for f in schema if pa.types.is_fixed_size_binary(f.type)) + 16
    # Uncompressed, no dictionary, statistics only on the small columns: FIELD-NOTES measured zstd
    # saving 6% on float16 activations at 2-3x the read cost, and min/max of raw vectors is noise.
    return atomic_write(fs, path, lambda target: pq.write_table(
        table, target, row_group_size=rows_per_row_group(row_bytes, ctx), compression="none",
        use_dictionary=False, write_statistics=list(META_COLUMNS)))


def shard_path(split: str, index: int) -> str:
    return f"{split}/shard-{index:05d}.parquet"


def read_shard(
    fs: fsspec.AbstractFileSystem,
    root: str,
    shard: Shard,
    columns: list[str] | None = None,
) -> pa.Table:
    """Read one committed shard, checking it against the manifest; CacheError names a bad shard."""
    path = f"{root}/{shard.path}"
    try:
        size = fs.size(path)
        if size != shard.num_bytes:
            raise CacheError(
                f"shard {shard.path} is corrupt: {size} bytes on storage, manifest says {shard.num_bytes}"
            )
        if is_local(fs):  # pyarrow reads a memory map itself: no Python file object taking the GIL per read
            table = pq.read_table(path, columns=columns, memory_map=True)
        else:
            with fs.open(path, "rb", block_size=ROW_GROUP_BYTES) as f:
                table = pq.read_table(f, columns=columns, pre_buffer=True)
    except CacheError:
        raise
    except FileNotFoundError as e:
        raise CacheError(f"shard {shard.path} is missing from the cache") from e
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for damaged files
        raise CacheError(f"shard {shard.path} is corrupt: {type(e).__name__}: {e}") from e
    if table.num_rows != shard.num_rows:
        raise CacheError(
            f"shard {shard.path} is corrupt: {table.num_rows} rows, manifest says {shard.num_rows}"
        )
    return table


def summary(manifest: Manifest, url: str) -> str:
    """The `actserve cache info` text."""
    c = manifest.config
    lines = [
        f"cache        {url}",
        f"model        {c.model}  (d_model {manifest.d_model}, n_ctx {manifest.n_ctx}, vocab {manifest.d_vocab})",
        f"dataset      {c.dataset}  [{c.dataset_split}]",
        f"hooks        {len(c.hooks)}: {', '.join(c.hooks)}",
        f"dtype        {c.dtype}   context {c.context_size}   prepend_bos {c.prepend_bos}",
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
    lines.append("status       " + ("complete" if manifest.complete else "incomplete (build still running or interrupted)"))
    return "\n".join(lines)


def manifest_dict(manifest: Manifest) -> dict:
    return json.loads(manifest_to_json(manifest))
