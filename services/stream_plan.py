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
from actserve.services.process_memory import rounded_up
from actserve.services.shard_format import META_COLUMNS, shard_group_rows, shard_schema
from actserve.services.shuffle import Order, consumer_rows

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
    buffer_schema: pa.Schema   # the same columns as a buffer holds them: in the cache's dtype
    cache_dtype: str           # of the shards; schema's dtype differs when the server converts to float32
    d_model: int
    row_bytes: int             # bytes of one sent row
    consumer_rows: int | None  # rows of this consumer's epoch; None while a followed cache grows
    memory: StreamMemory       # what the stream holds at most


# What one stream holds at once (stream_memory):
BUFFERS_HELD = 2       # of its buffer slices: the one being sent and the next, read on the reader thread
BATCHES_IN_FLIGHT = 2  # the batch gRPC is sending and the next being cut
INDEX_BYTES = 8        # int64 row indices while a buffer is read: its whole permutation, and per slice row
INDEXES_PER_ROW = 4    # the rows read, their order, their destinations and the drop_bos shift


@dataclass(frozen=True)
class StreamMemory:
    """Bytes one stream holds at most, by what holds them."""
    slice_rows: int                # the most rows of one buffer this consumer gets
    block_bytes: tuple[int, ...]   # one slice's memory per requested column, in the cache's dtype, whole pages
    reading: int   # reading the next buffer: one remote shard's requested columns as Parquet decodes them (local
                   # shards are copied from their mapped pages, page cache: counted all the same), the row indices
    batches: int   # BATCHES_IN_FLIGHT batches, each sent rows plus the cache-dtype rows they are made of (a batch
                   # that spans two buffers is concatenated; float32 is converted from the cache's dtype)

    @property
    def buffers(self) -> int:
        """BUFFERS_HELD slices' blocks (process_memory.ReusedBlocks holds no more)."""
        return BUFFERS_HELD * sum(self.block_bytes)

    @property
    def total(self) -> int:
        return self.buffers + self.reading + self.batches

    def describe(self) -> str:
        return (f"{self.total / 1e6:,.1f} MB ({self.buffers / 1e6:,.1f} MB of {BUFFERS_HELD} buffers, "
                f"{self.reading / 1e6:,.1f} MB reading, {self.batches / 1e6:,.1f} MB of {BATCHES_IN_FLIGHT} batches in flight)")


def group_rows(manifest: Manifest) -> int:
    """Rows per row group of the cache's shards (write_shard's layout)."""
    return shard_group_rows(manifest.config, manifest.d_model)


def stream_schema(manifest: Manifest, hooks: list[str], include_meta: bool, dtype: str = "") -> pa.Schema:
    """The requested columns, activations in `dtype` ('' for the cache's: as the shards and a
    stream's buffers hold them)."""
    schema = shard_schema(hooks, manifest.d_model, dtype or manifest.config.dtype)
    return schema if include_meta else pa.schema([f for f in schema if f.name not in META_COLUMNS])


def schema_row_bytes(schema: pa.Schema) -> int:
    return sum(f.type.byte_width for f in schema)


def largest_shard_rows(manifest: Manifest, split_name: str) -> int:
    config = manifest.config
    return max([s.num_rows for s in getattr(manifest, split_name).shards] + [config.sequences_per_shard * config.context_size])


def largest_piece_rows(manifest: Manifest, split_name: str) -> int:
    return min(group_rows(manifest), largest_shard_rows(manifest, split_name))


def stream_memory(manifest: Manifest, split_name: str, hooks: list[str], include_meta: bool, buffer_tokens: int,
                  num_consumers: int, batch_size: int, dtype: str = "", sequences: bool = False) -> StreamMemory:
    """What a stream of these columns, buffer and batch size holds at most (StreamMemory). A buffer
    holds under buffer_tokens plus one unit of pieces (shuffle.run_bounds): a piece, or in
    `sequences` mode on a position-major cache a whole shard. A consumer gets its share of each
    shuffled buffer, and in `sequences` mode up to a whole buffer (its range of sequences)."""
    unit = largest_shard_rows if sequences and manifest.config.position_major else largest_piece_rows
    buffer_rows = buffer_tokens + unit(manifest, split_name)
    slice_rows = buffer_rows if sequences else -(-buffer_rows // num_consumers)
    widths = [f.type.byte_width for f in stream_schema(manifest, hooks, include_meta)]
    row_bytes = sum(widths)
    return StreamMemory(
        slice_rows=slice_rows,
        block_bytes=tuple(rounded_up(slice_rows * width) for width in widths),
        reading=largest_shard_rows(manifest, split_name) * row_bytes
        + INDEX_BYTES * (buffer_rows + INDEXES_PER_ROW * slice_rows),
        batches=BATCHES_IN_FLIGHT * batch_size * (schema_row_bytes(stream_schema(manifest, hooks, include_meta, dtype))
                                                  + row_bytes),
    )


def fitting_buffer_tokens(manifest: Manifest, split_name: str, hooks: list[str], include_meta: bool,
                          num_consumers: int, batch_size: int, dtype: str, memory_bytes: int,
                          sequences: bool = False) -> int:
    """The largest buffer_tokens whose stream_memory is within memory_bytes (0 if none is)."""
    def fits(tokens: int) -> bool:
        return stream_memory(manifest, split_name, hooks, include_meta, tokens, num_consumers, batch_size,
                             dtype, sequences).total <= memory_bytes

    lo, hi = 0, 1  # fits(lo) or lo == 0; not fits(hi)
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # stream_memory grows with buffer_tokens
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


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
    if not 1 <= request.batch_size <= limits.max_batch_size:
        raise ValueError(f"batch_size must be in 1..{limits.max_batch_size} tokens, got {request.batch_size}")
    if request.dtype not in ("", config.dtype, "float32"):
        raise ValueError(f"dtype {request.dtype!r} is not served; ask for '' (the cache's {config.dtype}) or 'float32'")
    shape = (manifest, split_name, hooks, request.include_meta)
    sequences = request.mode == StreamRequest.SEQUENCES
    fits = fitting_buffer_tokens(*shape, num_consumers, request.batch_size, request.dtype, limits.stream_memory_bytes,
                                 sequences)
    buffer_tokens = request.buffer_tokens or min(limits.buffer_tokens, fits)
    memory = stream_memory(*shape, max(buffer_tokens, 1), num_consumers, request.batch_size, request.dtype, sequences)
    if memory.total > limits.stream_memory_bytes:
        ask = (f"ask for at most {fits:,} buffer_tokens, or fewer hooks" if fits else
               "ask for a smaller batch_size or fewer hooks")
        raise ValueError(
            f"buffer_tokens {max(buffer_tokens, 1):,} with {len(hooks)} hooks, {num_consumers} consumers and batch_size "
            f"{request.batch_size:,} needs {memory.describe()} of server memory, over this server's per-stream "
            f"limit of {limits.stream_memory_bytes / 1e6:,.1f} MB (--stream-memory-gb): {ask}")
    order = Order(
        seed=request.seed, epoch=request.epoch, buffer_tokens=buffer_tokens, context_size=config.context_size,
        group_rows=group_rows(manifest),
        drop_bos=request.drop_bos and config.prepend_bos, num_consumers=num_consumers,
        consumer_index=request.consumer_index, shuffle=request.mode == StreamRequest.SHUFFLED_TOKENS,
        follow=request.follow, position_major=config.position_major,
    )
    if not order.shuffle and request.batch_size % order.rows_per_sequence:
        raise ValueError(f"SEQUENCES mode sends whole sequences: batch_size must be a multiple of "
                         f"{order.rows_per_sequence} rows per sequence, got {request.batch_size}")
    if request.follow and request.epochs > 1:
        raise ValueError(f"epochs {request.epochs} with follow: a followed split is sent one epoch a call")
    split_done = split_complete(manifest, split_name)
    if not request.follow and not split_done:
        raise ValueError(f"the {split_name} split of cache {cache_name} is still being built "
                         f"({len(split.shards)}/{split.planned_shards} shards committed): set follow to stream it as it grows")
    rows = None
    if split_done:
        if not split.shards:
            raise ValueError(f"the {split_name} split of cache {cache_name} is empty")
        rows = consumer_rows(split.shards, order)
        if request.start > rows:
            raise ValueError(f"start {request.start} is past the end of this consumer's part of the epoch ({rows} tokens)")

    out_dtype = request.dtype or config.dtype
    schema = stream_schema(manifest, hooks, request.include_meta, out_dtype)
    resolved = StreamRequest()
    resolved.CopyFrom(request)
    resolved.split, resolved.num_consumers, resolved.buffer_tokens, resolved.dtype = (
        split_name, num_consumers, buffer_tokens, out_dtype)
    resolved.ClearField("hooks")
    resolved.hooks.extend(hooks)
    return StreamPlan(resolved, order, schema, stream_schema(manifest, hooks, request.include_meta), config.dtype,
                      manifest.d_model, schema_row_bytes(schema), rows, memory)
