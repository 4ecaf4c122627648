"""A stream request, validated against the cache's manifest and the server's limits, becomes a
StreamPlan: what to read, in which order, and what to send. A pure function of (request, manifest,
limits), testable without a server, like the order functions of `shuffle.py`."""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from google.protobuf.message import DecodeError

from actserve.proto.manifest_pb2 import Manifest
from actserve.proto.stream_pb2 import StreamRequest
from actserve.services.manifest import SPLITS, split_complete
from actserve.services.shard_format import (META_COLUMNS, bytes_per_value, rows_per_row_group, shard_row_bytes,
                                            shard_schema)
from actserve.services.shuffle import Order, consumer_rows, epoch_buffers

MODES = {StreamRequest.SHUFFLED_TOKENS: "SHUFFLED_TOKENS", StreamRequest.SEQUENCES: "SEQUENCES"}


@dataclass(frozen=True)
class StreamLimits:
    """The server's bounds on what a request may ask for."""
    max_batch_size: int        # tokens
    buffer_tokens: int         # default shuffle buffer, in tokens (lowered to what stream_memory_bytes allows)
    max_buffer_tokens: int
    stream_memory_bytes: int   # the most one stream's buffers may hold (StreamPlan.memory_bytes)


@dataclass(frozen=True)
class StreamPlan:
    """A validated request: what to read and how to send it."""
    request: StreamRequest     # every default resolved: the ticket get_flight_info hands out
    order: Order
    schema: pa.Schema          # sent
    cache_dtype: str           # of the shards; schema's dtype differs when the server converts to float32
    d_model: int
    row_bytes: int             # bytes of one sent row
    consumer_rows: int | None  # rows of this consumer's epoch; None while a followed cache grows
    memory_bytes: int          # server memory the stream's buffers take at most (buffer_memory)


# Buffers a stream's memory holds at once: the one being sent and the next one, being filled (from
# the page cache for local shards; remote shards' row groups are decoded one shard at a time: plus
# those, at most one shard's columns).
BUFFERS_HELD = 2


def group_rows(manifest: Manifest) -> int:
    """Rows per row group of the cache's shards (write_shard's layout)."""
    config = manifest.config
    return rows_per_row_group(shard_row_bytes(len(config.hooks), manifest.d_model, config.dtype), config.context_size)


def cached_row_bytes(manifest: Manifest, hooks: list[str], include_meta: bool) -> int:
    """Bytes of one row of the requested columns, in the cache's dtype."""
    return len(hooks) * manifest.d_model * bytes_per_value(manifest.config.dtype) + (16 if include_meta else 0)


def largest_shard_rows(manifest: Manifest, split_name: str) -> int:
    config = manifest.config
    return max([s.num_rows for s in getattr(manifest, split_name).shards] + [config.sequences_per_shard * config.context_size])


def largest_piece_rows(manifest: Manifest, split_name: str) -> int:
    return min(group_rows(manifest), largest_shard_rows(manifest, split_name))


def buffer_memory(manifest: Manifest, split_name: str, hooks: list[str], include_meta: bool,
                  buffer_tokens: int, num_consumers: int) -> int:
    """Bytes of the requested columns (in the cache's dtype) a stream holds at most: BUFFERS_HELD
    of this consumer's slices of the largest buffer (buffer_tokens plus one piece), and one
    shard's row groups being read into the next."""
    slice_rows = -(-(buffer_tokens + largest_piece_rows(manifest, split_name)) // num_consumers)
    row_bytes = cached_row_bytes(manifest, hooks, include_meta)
    return (BUFFERS_HELD * slice_rows + largest_shard_rows(manifest, split_name)) * row_bytes


def fitting_buffer_tokens(manifest: Manifest, split_name: str, hooks: list[str], include_meta: bool,
                          num_consumers: int, memory_bytes: int) -> int:
    """The largest buffer_tokens whose buffer_memory is within memory_bytes (0 if none is)."""
    rows = memory_bytes // cached_row_bytes(manifest, hooks, include_meta) - largest_shard_rows(manifest, split_name)
    return max(0, rows // BUFFERS_HELD * num_consumers - largest_piece_rows(manifest, split_name))


def decode_request(raw: bytes) -> StreamRequest:
    try:
        request = StreamRequest.FromString(raw)
    except (DecodeError, ValueError) as e:
        raise ValueError(f"the ticket is not a serialized actserve.v1.StreamRequest ({e}); see proto/stream.proto") from e
    if not request.cache:
        raise ValueError("StreamRequest.cache is empty: name the cache to stream (the `list-caches` action lists them)")
    return request


def plan_stream(request: StreamRequest, manifest: Manifest, cache_name: str, limits: StreamLimits) -> StreamPlan:
    """The plan for `request` on the cache `manifest` describes; ValueError says what is wrong."""
    config = manifest.config
    split_name = request.split or "train"
    if split_name not in SPLITS:
        raise ValueError(f"unknown split {request.split!r}; choose one of {', '.join(SPLITS)}")
    split = getattr(manifest, split_name)
    hooks = list(request.hooks) or list(config.hooks)
    unknown = [h for h in hooks if h not in config.hooks]
    if unknown or len(set(hooks)) != len(hooks):
        raise ValueError(f"unknown or repeated hooks {unknown or hooks} for cache {cache_name}; "
                         f"its hooks: {', '.join(config.hooks)}")
    if request.mode not in MODES:
        raise ValueError(f"unknown mode {request.mode}; choose {MODES}")
    num_consumers = request.num_consumers or 1
    if request.consumer_index >= num_consumers:
        raise ValueError(f"consumer_index {request.consumer_index} is out of range for num_consumers {num_consumers}")
    if request.buffer_tokens > limits.max_buffer_tokens:
        raise ValueError(f"buffer_tokens {request.buffer_tokens:,} exceeds this server's limit of "
                         f"{limits.max_buffer_tokens:,} (--max-buffer-tokens)")
    fits = fitting_buffer_tokens(manifest, split_name, hooks, request.include_meta, num_consumers,
                                 limits.stream_memory_bytes)
    buffer_tokens = request.buffer_tokens or min(limits.buffer_tokens, fits)
    memory = buffer_memory(manifest, split_name, hooks, request.include_meta, buffer_tokens, num_consumers)
    if buffer_tokens < 1 or memory > limits.stream_memory_bytes:
        raise ValueError(
            f"buffer_tokens {buffer_tokens:,} with {len(hooks)} hooks and {num_consumers} consumers needs "
            f"{memory / 1e6:,.1f} MB of server memory ({BUFFERS_HELD} buffers held), over this server's per-stream "
            f"limit of {limits.stream_memory_bytes / 1e6:,.1f} MB (--stream-memory-gb): ask for at most "
            f"{fits:,} buffer_tokens, or fewer hooks")
    if not 1 <= request.batch_size <= limits.max_batch_size:
        raise ValueError(f"batch_size must be in 1..{limits.max_batch_size} tokens, got {request.batch_size}")
    if request.dtype not in ("", config.dtype, "float32"):
        raise ValueError(f"dtype {request.dtype!r} is not served; ask for '' (the cache's {config.dtype}) or 'float32'")
    order = Order(
        seed=request.seed, epoch=request.epoch, buffer_tokens=buffer_tokens, context_size=config.context_size,
        group_rows=group_rows(manifest),
        drop_bos=request.drop_bos and config.prepend_bos, num_consumers=num_consumers,
        consumer_index=request.consumer_index, shuffle=request.mode == StreamRequest.SHUFFLED_TOKENS,
        follow=request.follow,
    )
    if not order.shuffle and request.batch_size % order.rows_per_sequence:
        raise ValueError(f"SEQUENCES mode sends whole sequences: batch_size must be a multiple of "
                         f"{order.rows_per_sequence} rows per sequence, got {request.batch_size}")
    split_done = split_complete(manifest, split_name)
    if not request.follow and not split_done:
        raise ValueError(f"the {split_name} split of cache {cache_name} is still being built "
                         f"({len(split.shards)}/{split.planned_shards} shards committed): set follow to stream it as it grows")
    rows = None
    if split_done:
        if not split.shards:
            raise ValueError(f"the {split_name} split of cache {cache_name} is empty")
        rows = consumer_rows(epoch_buffers(split.shards, order))
        if request.start > rows:
            raise ValueError(f"start {request.start} is past the end of this consumer's part of the epoch ({rows} tokens)")

    out_dtype = request.dtype or config.dtype
    schema = shard_schema(hooks, manifest.d_model, out_dtype)
    if not request.include_meta:
        schema = pa.schema([f for f in schema if f.name not in META_COLUMNS])
    resolved = StreamRequest()
    resolved.CopyFrom(request)
    resolved.split, resolved.num_consumers, resolved.buffer_tokens, resolved.dtype = (
        split_name, num_consumers, buffer_tokens, out_dtype)
    resolved.ClearField("hooks")
    resolved.hooks.extend(hooks)
    row_bytes = sum(f.type.byte_width for f in schema)
    return StreamPlan(resolved, order, schema, config.dtype, manifest.d_model, row_bytes, rows, memory)
