"""The order in which a consumer reads one epoch of a split: a pure function of the request and
the manifest, so any server process computes the same order and a cursor (rows consumed) is all a
client needs to resume.

The unit of reading is a PIECE: one row group of one shard (shards are written with row groups of
`group_rows` rows; the last row group of a shard may be smaller). Reading the requested columns of
a piece reads only those column chunks. Shards are position-major (manifest.proto: row p * N + s is
position p of the shard's sequence s), so a piece holds r = group_rows / N rows of each of the
shard's N sequences (2 in GPT-2 small's 12-hook layout); in caches built before, rows are in
sequence order and a piece holds whole sequences (r = context_size).

Shuffled-token mode:
  1. `piece_order`: every piece of the split (shard by shard, row group by row group) in a random
     order drawn from (seed, epoch);
  2. consecutive pieces of that order form BUFFERS: a buffer takes pieces until it holds at least
     `buffer_tokens` kept rows (the last buffer of the epoch may hold fewer);
  3. `buffer_permutation`: the buffer's rows (BOS rows left out when drop_bos) permuted at random,
     drawn from (seed, epoch, buffer index);
  4. `consumer_slice`: the permuted rows are cut into num_consumers contiguous near-equal slices;
     consumer c reads slice c of every buffer, buffer after buffer.
Consumers are therefore disjoint and together read the whole epoch. A cursor maps to (buffer,
offset in that buffer's slice), so a resume re-reads at most one buffer.

Mixing: a buffer holds about S = kept rows / r sequences drawn from all over the split (pieces of
distinct shards), so a batch of b rows has about `expected_distinct(S, b)` distinct sequences, as
a batch of a uniform global shuffle has `expected_distinct(split sequences, b)`; the ratio is
>= 0.9 once S >= 5 b, i.e. buffer_tokens >= 5 * b * r (bench/shuffle_quality.py measures it).

Whole-sequence mode: the split's sequences in cache order, unshuffled; consumer c reads the c-th of
num_consumers contiguous near-equal ranges of whole sequences. Buffers are then runs of consecutive
pieces (of whole shards when position-major), read in sequence order.

Follow mode (a cache still being built): pieces of shards not committed yet cannot be shuffled, so
buffers are formed from the pieces of committed shards in COMMIT order, once they hold
buffer_tokens (the last, smaller buffer once the manifest is complete); rows are still permuted
within each buffer and sliced among consumers. The order is the same whether the build has
finished or not, so cursors stay valid while the cache grows.

Every shard holds whole sequences of exactly context_size rows (manifest.proto), so BOS rows are
found by arithmetic, without reading the position column: a position-major shard's first N rows,
every context_size-th row of a shard in sequence order.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from actserve.proto.manifest_pb2 import Shard
from actserve.services.storage import CacheError


@dataclass(frozen=True)
class Order:
    """What decides the order of one consumer's epoch, apart from the shards themselves."""
    seed: int
    epoch: int
    buffer_tokens: int            # kept rows a buffer takes pieces up to
    context_size: int
    group_rows: int               # rows per row group of the cache's shards (in sequence order: whole sequences)
    drop_bos: bool = False        # leave out position-0 rows (only pass True for prepend_bos caches)
    num_consumers: int = 1
    consumer_index: int = 0
    shuffle: bool = True          # False: whole-sequence mode
    follow: bool = False          # buffers from committed shards' pieces in commit order
    position_major: bool = False  # the shards' rows are position-major (manifest.proto), not in sequence order

    def __post_init__(self):
        if self.buffer_tokens < 1:
            raise ValueError(f"buffer_tokens must be >= 1, got {self.buffer_tokens}")
        if self.num_consumers < 1 or not 0 <= self.consumer_index < self.num_consumers:
            raise ValueError(f"consumer_index must be in 0..{self.num_consumers - 1}, got {self.consumer_index}")
        if self.context_size < 1 + self.drop_bos:
            raise ValueError(f"context_size {self.context_size} leaves no rows")
        if self.group_rows < 1 or (not self.position_major and self.group_rows % self.context_size):
            raise ValueError(f"group_rows {self.group_rows} is not a whole number of sequences of {self.context_size}")

    @property
    def rows_per_sequence(self) -> int:
        return self.context_size - self.drop_bos


Piece = tuple[int, int]  # (index into the split's shard list, row group of that shard)


@dataclass(frozen=True)
class Buffer:
    """One buffer of the epoch, and this consumer's part of it.

    Its rows are the kept rows (BOS dropped or not) of `pieces`, concatenated in that order; the
    consumer reads rows `row_indices(...)`, which index the FULL concatenation (BOS rows included),
    i.e. what reading the pieces gives."""
    index: int                    # position in the epoch's buffer order; seeds the permutation
    pieces: tuple[Piece, ...]     # in concatenation order
    piece_rows: tuple[int, ...]   # rows of each piece (BOS included)
    piece_kept: tuple[int, ...]   # rows of each piece after dropping BOS
    kept_rows: int                # rows of the buffer after dropping BOS
    lo: int                       # this consumer's slice of the (permuted) kept rows
    hi: int

    @property
    def num_rows(self) -> int:
        return self.hi - self.lo


def rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


def piece_order(seed: int, epoch: int, num_pieces: int) -> np.ndarray:
    return rng(seed, epoch).permutation(num_pieces)


def buffer_permutation(seed: int, epoch: int, buffer_index: int, num_rows: int) -> np.ndarray:
    # a third key word keeps buffer streams apart from piece_order's (seed, epoch) stream
    return rng(seed, epoch, 1, buffer_index).permutation(num_rows)


def consumer_slice(num_rows: int, num_consumers: int, consumer_index: int) -> tuple[int, int]:
    """Consumer c's contiguous part of num_rows: sizes differ by at most one row between consumers."""
    return num_rows * consumer_index // num_consumers, num_rows * (consumer_index + 1) // num_consumers


def expected_distinct(sequences: int, batch: int) -> float:
    """E[distinct sequences] in a batch of `batch` rows drawn uniformly from `sequences` sequences
    of equal length: S * (1 - (1 - 1/S)^b)."""
    if sequences <= 1:
        return float(min(sequences, batch))
    return -sequences * math.expm1(batch * math.log1p(-1 / sequences))


def check_shards(shards: Sequence[Shard], context_size: int) -> None:
    for s in shards:
        if s.num_rows != s.num_sequences * context_size:
            raise CacheError(
                f"shard {s.path} holds {s.num_rows} rows for {s.num_sequences} sequences of {context_size}: "
                "not whole sequences, cannot stream it"
            )


@dataclass(frozen=True)
class Pieces:
    """Every piece of the split, in shard order, as arrays (a GPT-2-small split has millions)."""
    shard: np.ndarray  # index into the split's shard list
    group: np.ndarray  # row group of that shard
    rows: np.ndarray   # rows (BOS included)
    kept: np.ndarray   # rows drop_bos keeps: BOS rows are every context_size-th row in sequence
                       # order, a position-major shard's first num_sequences rows


def split_pieces(shards: Sequence[Shard], order: Order) -> Pieces:
    num_rows = np.array([s.num_rows for s in shards], dtype=np.int64)
    num_sequences = np.array([s.num_sequences for s in shards], dtype=np.int64)
    counts = -(-num_rows // order.group_rows)  # row groups of each shard, as shard_format.shard_groups lays them out
    shard = np.repeat(np.arange(len(shards)), counts)
    group = np.arange(len(shard)) - np.repeat(np.cumsum(counts) - counts, counts)
    first = group * order.group_rows
    rows = np.minimum(order.group_rows, num_rows[shard] - first)
    if not order.drop_bos:
        kept = rows
    elif order.position_major:
        kept = rows - np.clip(num_sequences[shard] - first, 0, rows)
    else:
        kept = rows // order.context_size * order.rows_per_sequence
    return Pieces(shard, group, rows, kept)


def run_bounds(kept: np.ndarray, buffer_tokens: int, complete: bool) -> list[tuple[int, int]]:
    """[start, stop) of consecutive runs of units holding `kept` rows each (in order), each run
    the fewest units holding at least buffer_tokens; the last run is kept short only when the
    epoch is complete."""
    held = np.concatenate([[0], np.cumsum(kept)])
    bounds, start = [], 0
    while start < len(kept):
        stop = int(np.searchsorted(held, held[start] + buffer_tokens, side="left"))
        if stop > len(kept):
            if complete:
                bounds.append((start, len(kept)))
            break
        bounds.append((start, stop))
        start = stop
    return bounds


def make_buffer(index: int, run: np.ndarray, pieces: Pieces, lo: int, hi: int) -> Buffer:
    kept = pieces.kept[run]
    return Buffer(index, tuple(zip(pieces.shard[run].tolist(), pieces.group[run].tolist())),
                  tuple(pieces.rows[run].tolist()), tuple(kept.tolist()), int(kept.sum()), lo, hi)


Slice = tuple[np.ndarray, int, int]  # a buffer's piece ids (into Pieces, in order) and this consumer's lo, hi


def epoch_slices(shards: Sequence[Shard], order: Order, complete: bool) -> tuple[Pieces, list[Slice]]:
    """The pieces of the split and, for each buffer of the epoch in reading order, its pieces and
    this consumer's slice of it (epoch_buffers without building the Buffers)."""
    check_shards(shards, order.context_size)
    pieces = split_pieces(shards, order)
    if not order.shuffle:
        return pieces, sequence_slices(pieces, order)
    ids = np.arange(len(pieces.shard)) if order.follow else piece_order(order.seed, order.epoch, len(pieces.shard))
    slices = []
    for a, b in run_bounds(pieces.kept[ids], order.buffer_tokens, complete):
        run = ids[a:b]
        slices.append((run, *consumer_slice(int(pieces.kept[run].sum()), order.num_consumers, order.consumer_index)))
    return pieces, slices


def sequence_slices(pieces: Pieces, order: Order) -> list[Slice]:
    """Whole-sequence mode: the consumer's range of sequences, cut at buffer boundaries: between
    pieces, or between shards when position-major (a sequence's rows are in every row group)."""
    ctx, rps = order.context_size, order.rows_per_sequence
    first, last = consumer_slice(int(pieces.rows.sum()) // ctx, order.num_consumers, order.consumer_index)
    if order.position_major:  # units of whole shards: unit u is pieces starts[u]..starts[u + 1]
        starts = np.flatnonzero(np.diff(pieces.shard, prepend=-1))
        unit_kept = np.add.reduceat(pieces.kept, starts) if len(starts) else pieces.kept
        starts = np.append(starts, len(pieces.shard))
    else:
        unit_kept, starts = pieces.kept, np.arange(len(pieces.shard) + 1)
    slices, seq = [], 0
    for a, b in run_bounds(unit_kept, order.buffer_tokens, complete=True):
        run = np.arange(starts[a], starts[b])
        sequences = int(pieces.rows[run].sum()) // ctx
        lo, hi = max(first, seq) - seq, min(last, seq + sequences) - seq
        if lo < hi:
            slices.append((run, lo * rps, hi * rps))
        seq += sequences
    return slices


def epoch_buffers(shards: Sequence[Shard], order: Order, complete: bool = True) -> list[Buffer]:
    """The consumer's buffers of the epoch, in reading order, that the committed `shards` allow.

    complete=False (follow mode on a cache still being built) leaves out a trailing run of pieces
    holding fewer than buffer_tokens rows: more pieces will join it."""
    pieces, slices = epoch_slices(shards, order, complete)
    return [make_buffer(index, run, pieces, lo, hi) for index, (run, lo, hi) in enumerate(slices)]


def consumer_rows(shards: Sequence[Shard], order: Order) -> int:
    """Rows of this consumer's epoch of a complete split."""
    return sum(hi - lo for _, lo, hi in epoch_slices(shards, order, complete=True)[1])


def row_indices(buffer: Buffer, order: Order) -> np.ndarray:
    """Indices, into the concatenated rows of the buffer's pieces, of the rows this consumer reads,
    in reading order."""
    if order.shuffle:
        rows = buffer_permutation(order.seed, order.epoch, buffer.index, buffer.kept_rows)[buffer.lo:buffer.hi]
    else:
        rows = np.arange(buffer.lo, buffer.hi)
    if not order.position_major:  # sequence order: kept row k is row k + k // (ctx - 1) + 1
        return rows + rows // order.rows_per_sequence + 1 if order.drop_bos else rows
    if not order.shuffle:  # the buffer's sequences, in order, BOS left out or not
        if order.drop_bos:
            rows = rows + rows // order.rows_per_sequence + 1
        return position_major_index(rows, buffer, order.context_size)
    if order.drop_bos:  # each piece's kept rows are its last ones (its BOS rows, if any, come first)
        kept_starts = np.cumsum([0, *buffer.piece_kept])
        piece = np.searchsorted(kept_starts, rows, side="right") - 1
        dropped = np.cumsum([0, *(r - k for r, k in zip(buffer.piece_rows, buffer.piece_kept))])
        rows = rows + dropped[piece + 1]
    return rows


def position_major_index(rows: np.ndarray, buffer: Buffer, context_size: int) -> np.ndarray:
    """Rows of a buffer of whole position-major shards: from their index in sequence order to
    their index in the pieces' concatenation (row p * N + s of each shard of N sequences)."""
    shard_ids = np.array([shard for shard, _ in buffer.pieces])
    firsts = np.flatnonzero(np.diff(shard_ids, prepend=-1))
    shard_rows = np.add.reduceat(np.array(buffer.piece_rows), firsts)
    starts = np.cumsum([0, *shard_rows])
    shard = np.searchsorted(starts, rows, side="right") - 1
    within = rows - starts[shard]
    return starts[shard] + within % context_size * (shard_rows[shard] // context_size) + within // context_size


def locate(sizes: Sequence[int], start: int) -> tuple[int, int]:
    """(buffer number, offset in its slice) of the consumer's row `start`, given the rows of each
    buffer's slice in reading order.

    A cursor at or past the end gives (len(sizes), rows past the end): an error for a complete
    epoch, a wait for buffers still to come in follow mode."""
    for i, size in enumerate(sizes):
        if start < size:
            return i, start
        start -= size
    return len(sizes), start
