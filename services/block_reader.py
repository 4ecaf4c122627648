"""From a plan to record batches: the buffers of this consumer's epochs (waiting for new commits in
follow mode), each filled on the stream's reader thread while the previous one is sent, also
across epochs, and cut into batches of exactly batch_size.

A buffer is one contiguous array per requested column, already in the consumer's order, in the
memory of the stream's buffer before last once nothing views that any more (process_memory.py:
ReusedBlocks; fresh memory costs the kernel a fault and a zeroing per page): the rows of each
piece (row group) are copied straight to their places (numpy fancy indexing, which
releases the GIL). Local shards are not decoded at all: the rows are copied from the
memory-mapped pages of their column chunks (column_pages.py), each page's CRC32 checked once per
buffer, so that copy is the only one before Flight's; remote shards are read with pyarrow first.
The pieces of different local shards are copied by READ_THREADS threads at once, each page's
rows of the buffer in one scatter. (Filling a buffer in 8 ranges, each range's batches sent as it
was filled, cost a gather per page and range: the reader alone ran at 0.5 of a pyarrow read of the
same column, against 1.0-1.1 in one pass, and streams were no faster for it.) A batch is a
zero-copy slice of the buffer, so the per-batch Python work is a slice and a yield, and one server
process serves many streams.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from functools import partial
from operator import attrgetter
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from actserve.proto.manifest_pb2 import Shard
from actserve.services.admission import StreamEnded
from actserve.services.column_pages import Page, ShardPages
from actserve.services.manifest import split_complete
from actserve.services.process_memory import BlocksReleased, ReusedBlocks
from actserve.services.shard_format import META_COLUMNS, decode_activations, encode_activations
from actserve.services.shuffle import Buffer, Order, epoch_slices, locate, make_buffer, row_indices
from actserve.services.sources import CacheSource
from actserve.services.stream_plan import StreamPlan

FOLLOW_POLL = (0.05, 2.0)  # seconds: first and longest wait between manifest polls in follow mode
CANCEL_CHECK = 1.0  # seconds between checks that the client of a waiting stream is still there
READ_THREADS = 2  # threads of a stream copying the pieces of different local shards into a buffer at once


class PendingBuffer(NamedTuple):
    """A buffer still to read, and where the stream stands in it."""
    shards: Sequence[Shard]  # the split's, as the manifest listed them when the buffer was planned
    order: Order             # of the buffer's epoch
    buffer: Buffer
    offset: int              # rows of the consumer's slice already sent
    ends_epoch: bool         # the epoch's last: its last batch may be short


class BufferRows:
    """This consumer's rows of one buffer, in sending order, as one record batch of the cache's
    dtype, filled from its start (`filled` rows so far). `release` drops it (the server ending the
    stream frees its memory at once)."""

    def __init__(self, plan: StreamPlan, pending: PendingBuffer):
        self.rows: pa.RecordBatch | None = None  # its memory, once allocated
        self.blocks: ReusedBlocks | None = None  # where that memory came from
        self.num_rows, self.plan = pending.buffer.num_rows - pending.offset, plan
        self.ends_epoch = pending.ends_epoch
        self.released: str | None = None
        self.filled = 0
        self.error: BaseException | None = None  # why filling it failed
        self.changed = threading.Condition()

    def allocate(self, blocks: ReusedBlocks) -> list[np.ndarray]:
        """Its memory, from `blocks`: its columns as [rows, bytes per row] arrays to fill."""
        cached = self.plan.buffer_schema
        try:
            columns = blocks.take(self.num_rows, [f.type.byte_width for f in cached])
        except BlocksReleased:
            raise StreamEnded(self.released or "the stream ended") from None
        arrays = [pa.Array.from_buffers(f.type, self.num_rows, [None, pa.py_buffer(c)]) for f, c in zip(cached, columns)]
        with self.changed:
            released = self.released is not None
            if not released:
                self.rows, self.blocks = pa.RecordBatch.from_arrays(arrays, schema=cached), blocks
        if released:  # ended meanwhile
            blocks.release()
        return columns

    def release(self, reason: str) -> None:
        with self.changed:  # the error goes too: its traceback's frames view the buffer's memory
            self.rows, self.released, self.error, blocks = None, reason, None, self.blocks
            self.changed.notify_all()
        if blocks is not None:  # the memory the stream keeps for reuse goes too
            blocks.release()

    def mark_filled(self, rows: int) -> None:
        with self.changed:
            self.filled = rows
            self.changed.notify_all()

    def fail(self, error: BaseException) -> None:
        """Filling it failed; its batches raise `error`. Ignored once released: a fill that fails
        because its stream ended (its copiers shut down) would otherwise keep the buffer's memory in
        a reference cycle (this, the error, its traceback's frames) until the cycle collector runs."""
        with self.changed:
            if self.released is None:
                self.error = error
                self.changed.notify_all()

    def __len__(self) -> int:
        return self.num_rows

    def batch(self, start: int, stop: int) -> pa.RecordBatch:
        """Rows start..stop once filled: a zero-copy slice (converted when the stream is float32
        and the cache is not)."""
        with self.changed:
            while self.filled < stop and self.error is None and self.released is None:
                self.changed.wait()
            if self.error is not None:  # raised from self, not a local, so that `release` breaks the cycle
                raise self.error          # of the error's traceback through this frame
            rows, released = self.rows, self.released
        if released is not None:
            raise StreamEnded(released)
        batch = rows.slice(start, stop - start)
        plan = self.plan
        if plan.request.dtype == plan.cache_dtype:
            return batch
        columns = [c if name in META_COLUMNS else
                   encode_activations(decode_activations(c, plan.cache_dtype, plan.d_model).float())
                   for name, c in zip(plan.schema.names, batch.columns)]
        return pa.RecordBatch.from_arrays(columns, schema=plan.schema)


def stream_buffers(source: CacheSource, plan: StreamPlan, context, blocks: ReusedBlocks,
                   hold: Callable[[BufferRows], BufferRows] = lambda buffer: buffer) -> Iterator[BufferRows]:
    """This consumer's rows of each buffer from the cursor on, each handed out while it is filled,
    in memory from `blocks`; the next buffer is filled on the stream's reader thread while this one
    is sent. `hold` sees every buffer (the stream's lease, which can release them)."""
    stop = threading.Event()
    todo = pending_buffers(source, plan, stop)
    reader = ThreadPoolExecutor(1, thread_name_prefix="actserve-read")
    copiers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="actserve-copy")

    def fill(pending: PendingBuffer, rows: BufferRows, columns: list[np.ndarray]) -> None:
        try:
            fill_buffer(source, plan, pending, rows, columns, copiers)
        except Exception as e:  # noqa: BLE001 - raised where the buffer's batches are taken (a corrupt shard...)
            rows.fail(e)

    def read_next():
        pending = next(todo, None)
        if pending is None:
            return None
        rows = hold(BufferRows(plan, pending))  # the lease lets go of the one before the last first,
        columns = rows.allocate(blocks)          # so that its memory can serve this one
        reader.submit(fill, pending, rows, columns)  # runs before the next read_next
        return rows

    try:
        future = reader.submit(read_next)
        while (buffer := result_unless_cancelled(future, context)) is not None:
            future = reader.submit(read_next)
            yield buffer
    finally:
        stop.set()
        reader.shutdown(wait=False, cancel_futures=True)
        copiers.shutdown(wait=False, cancel_futures=True)


def pending_buffers(source: CacheSource, plan: StreamPlan, stop: threading.Event) -> Iterator[PendingBuffer]:
    """The buffers of each of the request's epochs, one after the other, from the cursor on."""
    yield from epoch_pending(source, plan, plan.order, plan.request.start, stop)
    for later in range(1, plan.request.epochs):
        yield from epoch_pending(source, plan, replace(plan.order, epoch=plan.order.epoch + later), 0, stop)


def epoch_pending(source: CacheSource, plan: StreamPlan, order: Order, skip: int,
                  stop: threading.Event) -> Iterator[PendingBuffer]:
    """The buffers of one epoch from row `skip` on. In follow mode, waits for buffers still to be
    committed, polling the manifest with backoff."""
    start = skip
    served = 0
    wait = FOLLOW_POLL[0]
    while True:
        manifest = source.manifest()
        shards = getattr(manifest, plan.request.split).shards
        final = split_complete(manifest, plan.request.split) or not plan.request.follow
        pieces, slices = epoch_slices(shards, order, complete=final)
        slices = slices[served:]
        first, skip = locate([hi - lo for _, lo, hi in slices], skip)
        last = max((i for i, (_, lo, hi) in enumerate(slices) if hi > lo), default=-1)
        for i, (run, lo, hi) in enumerate(slices[first:], start=first):
            if hi > lo:  # a buffer with fewer rows than consumers leaves some none
                buffer = make_buffer(served + i, run, pieces, lo, hi)  # built when read: an epoch has ~1,000
                yield PendingBuffer(shards, order, buffer, skip, final and i == last)
            skip = 0
        served += len(slices)
        if slices:
            wait = FOLLOW_POLL[0]
        if final:
            if skip:
                raise ValueError(f"start {start} is past the end of this consumer's part of the epoch")
            return
        if stop.wait(wait):
            return
        wait = min(2 * wait, FOLLOW_POLL[1])


def fill_buffer(source: CacheSource, plan: StreamPlan, pending: PendingBuffer, rows: BufferRows,
                columns: list[np.ndarray], copiers: ThreadPoolExecutor) -> None:
    """Copy the consumer's rows of the buffer, from its offset on, to their places in `columns`,
    and mark `rows` filled."""
    shards, buffer = pending.shards, pending.buffer
    wanted = row_indices(buffer, pending.order)[pending.offset:]
    starts = np.cumsum([0, *buffer.piece_rows])
    widths = [c.shape[1] for c in columns]
    checked: set[tuple] = set()  # pages whose checksum matched, once per buffer
    # where each piece's rows go: the wanted rows (distinct) in ascending order, with their
    # destinations; by inverting the order in O(rows), where a sort took ~7% of the server's CPU
    destination = np.full(starts[-1], -1, np.int32 if len(wanted) < 2**31 else np.int64)
    destination[wanted] = np.arange(len(wanted))
    sorted_rows = np.flatnonzero(destination >= 0)
    by_row = destination[sorted_rows]
    cuts = np.searchsorted(sorted_rows, starts)
    by_shard: dict[int, list[int]] = {}  # shard -> its pieces' positions in the buffer, if it has rows here
    for k, (shard, _) in enumerate(buffer.pieces):
        if cuts[k] < cuts[k + 1]:
            by_shard.setdefault(shard, []).append(k)

    def copy_shard(shard: int, ks: list[int]) -> None:
        if rows.released:
            return
        groups = [buffer.pieces[k][1] for k in ks]
        for k, pieces in zip(ks, piece_columns(source, plan, shards[shard], groups, widths, checked)):
            dst, local = by_row[cuts[k]:cuts[k + 1]], sorted_rows[cuts[k]:cuts[k + 1]] - starts[k]
            for target, (pages, values) in zip(columns, pieces):
                copy_rows(target, dst, local, pages, values)

    if source.local:  # map, as no local holds a failed future: its error's traceback would hold this frame
        for _ in copiers.map(copy_shard, by_shard.keys(), by_shard.values()):
            pass
    else:  # one shard's decoded row groups in memory at a time (StreamPlan.memory_bytes counts one)
        for shard, ks in by_shard.items():
            copy_shard(shard, ks)
    rows.mark_filled(len(wanted))


def piece_columns(source: CacheSource, plan: StreamPlan, shard, groups: list[int], widths: list[int],
                  checked: set[tuple]):
    """For each row group of the shard, for each requested column: (its pages, a function giving a
    page's rows, checked)."""
    names, group_rows = plan.schema.names, plan.order.group_rows
    if source.local:
        mapped = source.pages(shard, group_rows)
        for g in groups:
            yield [(mapped.column(g, name, w), partial(checked_once, checked, mapped, (shard.path, g, name)))
                   for name, w in zip(names, widths)]
        return
    table = source.read(shard, names, groups, group_rows)  # pyarrow verified its pages' checksums
    at = 0
    for g in groups:
        piece = table.slice(at, min(group_rows, shard.num_rows - g * group_rows))
        yield [([Page(0, rows_view(piece.column(name), w), None)], attrgetter("values")) for name, w in zip(names, widths)]
        at += piece.num_rows


def checked_once(checked: set[tuple], mapped: ShardPages, column: tuple, page: Page) -> np.ndarray:
    """The page's rows, its checksum verified unless `checked` says it already was."""
    key = (*column, page.first_row)
    if key not in checked:
        mapped.values(page)
        checked.add(key)
    return page.values


def copy_rows(target: np.ndarray, dst: np.ndarray, local: np.ndarray, pages: list[Page], values) -> None:
    """target[dst] = rows `local` (ascending) of a row group's column held in `pages`."""
    bounds = [0, *np.searchsorted(local, [p.first_row for p in pages[1:]]), len(local)]
    for page, a, b in zip(pages, bounds, bounds[1:]):
        if a == b:
            continue  # none of our rows there: not even its checksum is needed
        rows = values(page)
        target[dst[a:b]] = rows if b - a == len(rows) else rows[local[a:b] - page.first_row]


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
    """Batches of exactly batch_size rows (each epoch's last may be short) out of buffers of any
    size; a batch that spans buffers of one epoch is sliced from each and concatenated (its rows of
    a buffer copied once that buffer is done)."""
    pieces: list[pa.RecordBatch] = []
    rows = 0
    for buffer in buffers:
        pos = 0
        while pos < len(buffer):
            n = min(batch_size - rows, len(buffer) - pos)
            pieces.append(buffer.batch(pos, pos + n))
            rows += n
            pos += n
            if rows == batch_size or (buffer.ends_epoch and pos == len(buffer)):  # an epoch's last may be short
                yield joined(pieces)
                pieces, rows = [], 0
        if pieces:  # copied: a view would keep this buffer's block from serving the buffer after next
            pieces = [pa.concat_batches(pieces)]
    if pieces:  # a followed split's last buffer (not known to be the last when it was read)
        yield joined(pieces)


def joined(pieces: list[pa.RecordBatch]) -> pa.RecordBatch:
    return pieces[0] if len(pieces) == 1 else pa.concat_batches(pieces)
