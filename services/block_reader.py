"""From a plan to record batches: the blocks of this consumer's epoch (waiting for new commits in
follow mode), each block's shards read into one table on the stream's reader thread while the
previous block is sent, and rows gathered and cut into batches of exactly batch_size.

Per batch, the Python work is one `take` call and a yield: pyarrow reads the shards and gathers
rows in C++ (both release the GIL), so one server process serves many streams.
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
from actserve.services.shard_format import META_COLUMNS, decode_activations, encode_activations
from actserve.services.shuffle import Block, epoch_blocks, locate, row_indices
from actserve.services.sources import CacheSource
from actserve.services.stream_plan import StreamPlan

FOLLOW_POLL = (0.05, 2.0)  # seconds: first and longest wait between manifest polls in follow mode
CANCEL_CHECK = 1.0  # seconds between checks that the client of a waiting stream is still there


class BlockRows:
    """This consumer's rows of one block: the block's table and the order to send its rows in.
    `release` drops the table (the server ending the stream frees its memory at once)."""

    def __init__(self, table: pa.Table, order: np.ndarray, plan: StreamPlan):
        self.table: pa.Table | None = table
        self.order, self.plan = order, plan
        self.released: str | None = None

    def release(self, reason: str) -> None:
        self.table, self.released = None, reason

    def __len__(self) -> int:
        return len(self.order)

    def batch(self, start: int, stop: int) -> pa.RecordBatch:
        """Rows order[start:stop], gathered by `take` in C++. A batch at a time, not the whole block
        at once: the allocator then reuses the memory of batches already sent (fewer page faults)."""
        table = self.table
        if table is None:
            raise StreamEnded(self.released)
        (batch,) = table.take(self.order[start:stop]).to_batches()
        plan = self.plan
        columns = batch.columns
        if plan.request.dtype != plan.cache_dtype:  # the server converts to float32
            columns = [c if name in META_COLUMNS else
                       encode_activations(decode_activations(c, plan.cache_dtype, plan.d_model).float())
                       for name, c in zip(plan.schema.names, columns)]
        return pa.RecordBatch.from_arrays(columns, schema=plan.schema)


def stream_blocks(source: CacheSource, plan: StreamPlan, context,
                  hold: Callable[[BlockRows], BlockRows] = lambda block: block) -> Iterator[BlockRows]:
    """This consumer's rows of each block from the cursor on; the next block is read on the
    stream's reader thread while this one is sent. `hold` sees every block read (the stream's
    lease, which can release them)."""
    stop = threading.Event()
    todo = pending_blocks(source, plan, stop)
    reader = ThreadPoolExecutor(1, thread_name_prefix="actserve-read")

    def read_next():
        item = next(todo, None)
        return None if item is None else hold(read_block(source, plan, *item))

    try:
        future = reader.submit(read_next)
        while (block := result_unless_cancelled(future, context)) is not None:
            future = reader.submit(read_next)
            yield block
    finally:
        stop.set()
        reader.shutdown(wait=False, cancel_futures=True)


def pending_blocks(source: CacheSource, plan: StreamPlan, stop: threading.Event) -> Iterator[tuple]:
    """(shards, block, offset in the block's slice) from the cursor on. In follow mode, waits
    for blocks still to be committed, polling the manifest with backoff."""
    skip = plan.request.start
    served = 0
    wait = FOLLOW_POLL[0]
    while True:
        manifest = source.manifest()
        shards = getattr(manifest, plan.request.split).shards
        final = split_complete(manifest, plan.request.split) or not plan.request.follow
        blocks = epoch_blocks(shards, plan.order, complete=final)[served:]
        first, skip = locate(blocks, skip)
        for block in blocks[first:]:
            if block.num_rows:  # a block with fewer rows than consumers leaves some none
                yield shards, block, skip
            skip = 0
        served += len(blocks)
        if blocks:
            wait = FOLLOW_POLL[0]
        if final:
            if skip:
                raise ValueError(f"start {plan.request.start} is past the end of this consumer's part of the epoch")
            return
        if stop.wait(wait):
            return
        wait = min(2 * wait, FOLLOW_POLL[1])


def read_block(source: CacheSource, plan: StreamPlan, shards, block: Block, offset: int) -> BlockRows:
    """The block's shards in one table, and the consumer's rows of it from `offset` on."""
    tables = [source.read(shards[i], plan.schema.names) for i in block.shards]
    # one chunk per column: `take` from a chunked column is several times slower
    table = pa.concat_tables(tables).combine_chunks()
    return BlockRows(table, row_indices(block, plan.order)[offset:], plan)


def result_unless_cancelled(future: Future, context) -> BlockRows | None:
    """The future's result, or None once the client has gone away: a follow stream can wait for
    the build for long. Asked on the call's own thread, where its context is alive."""
    while True:
        try:
            return future.result(timeout=CANCEL_CHECK)
        except FutureTimeout:
            if context.is_cancelled():
                return None


def cut_batches(blocks: Iterator[BlockRows], batch_size: int) -> Iterator[pa.RecordBatch]:
    """Batches of exactly batch_size rows (the last may be short) out of blocks of any size; a
    batch that spans blocks is gathered from each and concatenated."""
    pieces: list[pa.RecordBatch] = []
    rows = 0
    for block in blocks:
        pos = 0
        while pos < len(block):
            n = min(batch_size - rows, len(block) - pos)
            pieces.append(block.batch(pos, pos + n))
            rows += n
            pos += n
            if rows == batch_size:
                yield joined(pieces)
                pieces, rows = [], 0
    if pieces:
        yield joined(pieces)


def joined(pieces: list[pa.RecordBatch]) -> pa.RecordBatch:
    return pieces[0] if len(pieces) == 1 else pa.concat_batches(pieces)
