"""From a plan to record batches: the buffers of this consumer's epoch (waiting for new commits in
follow mode), each assembled on the stream's reader thread while the previous one is sent, and
cut into batches of exactly batch_size.

A buffer is assembled once, already in the consumer's order: its pieces (row groups) are read
shard by shard, the requested columns only, and each piece's rows are scattered straight to their
places in one contiguous table (numpy fancy indexing, which releases the GIL). That is the one
copy after Parquet's decode; a batch is then a zero-copy slice of the table, so the per-batch
Python work is a slice and a yield, and one server process serves many streams.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
import numpy as np
import pyarrow as pa

from actserve.services.admission import StreamEnded
from actserve.services.manifest import split_complete
from actserve.services.shard_format import META_COLUMNS, decode_activations, encode_activations, shard_schema
from actserve.services.shuffle import Buffer, epoch_buffers, locate, row_indices
from actserve.services.sources import CacheSource
from actserve.services.stream_plan import StreamPlan

FOLLOW_POLL = (0.05, 2.0)  # seconds: first and longest wait between manifest polls in follow mode
CANCEL_CHECK = 1.0  # seconds between checks that the client of a waiting stream is still there


class BufferRows:
    """This consumer's rows of one buffer, in sending order, as one record batch of the cache's
    dtype. `release` drops it (the server ending the stream frees its memory at once)."""

    def __init__(self, rows: pa.RecordBatch, plan: StreamPlan):
        self.rows: pa.RecordBatch | None = rows
        self.num_rows, self.plan = rows.num_rows, plan
        self.released: str | None = None

    def release(self, reason: str) -> None:
        self.rows, self.released = None, reason

    def __len__(self) -> int:
        return self.num_rows

    def batch(self, start: int, stop: int) -> pa.RecordBatch:
        """Rows start..stop: a zero-copy slice (converted when the stream is float32 and the cache is not)."""
        rows = self.rows
        if rows is None:
            raise StreamEnded(self.released)
        batch = rows.slice(start, stop - start)
        plan = self.plan
        if plan.request.dtype == plan.cache_dtype:
            return batch
        columns = [c if name in META_COLUMNS else
                   encode_activations(decode_activations(c, plan.cache_dtype, plan.d_model).float())
                   for name, c in zip(plan.schema.names, batch.columns)]
        return pa.RecordBatch.from_arrays(columns, schema=plan.schema)


def stream_buffers(source: CacheSource, plan: StreamPlan, context,
                  hold: Callable[[BufferRows], BufferRows] = lambda buffer: buffer) -> Iterator[BufferRows]:
    """This consumer's rows of each buffer from the cursor on; the next buffer is assembled on the
    stream's reader thread while this one is sent. `hold` sees every buffer read (the stream's
    lease, which can release them)."""
    stop = threading.Event()
    todo = pending_buffers(source, plan, stop)
    reader = ThreadPoolExecutor(1, thread_name_prefix="actserve-read")

    def read_next():
        item = next(todo, None)
        return None if item is None else hold(read_buffer(source, plan, *item))

    try:
        future = reader.submit(read_next)
        while (buffer := result_unless_cancelled(future, context)) is not None:
            future = reader.submit(read_next)
            yield buffer
    finally:
        stop.set()
        reader.shutdown(wait=False, cancel_futures=True)


def pending_buffers(source: CacheSource, plan: StreamPlan, stop: threading.Event) -> Iterator[tuple]:
    """(shards, buffer, offset in the buffer's slice) from the cursor on. In follow mode, waits
    for buffers still to be committed, polling the manifest with backoff."""
    skip = plan.request.start
    served = 0
    wait = FOLLOW_POLL[0]
    while True:
        manifest = source.manifest()
        shards = getattr(manifest, plan.request.split).shards
        final = split_complete(manifest, plan.request.split) or not plan.request.follow
        buffers = epoch_buffers(shards, plan.order, complete=final)[served:]
        first, skip = locate(buffers, skip)
        for buffer in buffers[first:]:
            if buffer.num_rows:  # a buffer with fewer rows than consumers leaves some none
                yield shards, buffer, skip
            skip = 0
        served += len(buffers)
        if buffers:
            wait = FOLLOW_POLL[0]
        if final:
            if skip:
                raise ValueError(f"start {plan.request.start} is past the end of this consumer's part of the epoch")
            return
        if stop.wait(wait):
            return
        wait = min(2 * wait, FOLLOW_POLL[1])


def read_buffer(source: CacheSource, plan: StreamPlan, shards, buffer: Buffer, offset: int) -> BufferRows:
    """The consumer's rows of the buffer from `offset` on, in order, in one record batch."""
    wanted = row_indices(buffer, plan.order)[offset:]
    # where each piece's rows go: rows of the pieces' concatenation sorted, with their destinations
    by_row = np.argsort(wanted, kind="stable")
    sorted_rows = wanted[by_row]
    starts = np.cumsum([0, *buffer.piece_rows])
    cuts = np.searchsorted(sorted_rows, starts)
    full = shard_schema(list(plan.request.hooks), plan.d_model, plan.cache_dtype)  # columns as the shards hold them
    cached = pa.schema([full.field(name) for name in plan.schema.names])
    widths = [f.type.byte_width for f in cached]
    # in pyarrow's memory pool, which returns freed buffers to the system and counts them
    # (glibc's malloc kept ~2x the live buffers resident under many streams)
    out = [np.frombuffer(pa.allocate_buffer(len(wanted) * w), np.uint8).reshape(len(wanted), w) for w in widths]
    by_shard: dict[int, list[int]] = {}  # shard -> its pieces' positions in the buffer
    for k, (shard, _) in enumerate(buffer.pieces):
        by_shard.setdefault(shard, []).append(k)
    for shard, ks in by_shard.items():
        if all(cuts[k] == cuts[k + 1] for k in ks):
            continue  # none of this consumer's rows are there
        table = source.read(shards[shard], plan.schema.names, [buffer.pieces[k][1] for k in ks], plan.order.group_rows)
        at = 0
        for k in ks:
            n = buffer.piece_rows[k]
            dst, local = by_row[cuts[k]:cuts[k + 1]], sorted_rows[cuts[k]:cuts[k + 1]] - starts[k]
            if len(dst):
                piece = table.slice(at, n)
                for name, target, width in zip(plan.schema.names, out, widths):
                    rows = rows_view(piece.column(name), width)
                    target[dst] = rows if len(local) == n else rows[local]
            at += n
        del table
    arrays = [pa.Array.from_buffers(f.type, len(wanted), [None, pa.py_buffer(o)]) for f, o in zip(cached, out)]
    return BufferRows(pa.RecordBatch.from_arrays(arrays, schema=cached), plan)


def rows_view(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A fixed-width column's rows as a [rows, width] uint8 array over Arrow's buffer (no copy
    when it has one chunk)."""
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    data = np.frombuffer(array.buffers()[1], np.uint8)
    return data[array.offset * width:(array.offset + len(array)) * width].reshape(len(array), width)


def result_unless_cancelled(future: Future, context) -> BufferRows | None:
    """The future's result, or None once the client has gone away: a follow stream can wait for
    the build for long. Asked on the call's own thread, where its context is alive."""
    while True:
        try:
            return future.result(timeout=CANCEL_CHECK)
        except FutureTimeout:
            if context.is_cancelled():
                return None


def cut_batches(buffers: Iterator[BufferRows], batch_size: int) -> Iterator[pa.RecordBatch]:
    """Batches of exactly batch_size rows (the last may be short) out of buffers of any size; a
    batch that spans buffers is sliced from each and concatenated."""
    pieces: list[pa.RecordBatch] = []
    rows = 0
    for buffer in buffers:
        pos = 0
        while pos < len(buffer):
            n = min(batch_size - rows, len(buffer) - pos)
            pieces.append(buffer.batch(pos, pos + n))
            rows += n
            pos += n
            if rows == batch_size:
                yield joined(pieces)
                pieces, rows = [], 0
    if pieces:
        yield joined(pieces)


def joined(pieces: list[pa.RecordBatch]) -> pa.RecordBatch:
    return pieces[0] if len(pieces) == 1 else pa.concat_batches(pieces)
