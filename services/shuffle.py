"""The order in which a consumer reads one epoch of a split: a pure function of the request and
the manifest, so any server process computes the same order and a cursor (rows consumed) is all a
client needs to resume.

Shuffled-token mode, in the style of MosaicML Streaming's block shuffles:
  1. `shard_order`: the split's shards in a random order drawn from (seed, epoch);
  2. consecutive shards of that order form blocks of `block_shards` shards (the last may be smaller);
  3. `block_permutation`: the block's rows (BOS rows left out when drop_bos) permuted at random,
     drawn from (seed, epoch, block index);
  4. `consumer_slice`: the permuted rows are cut into num_consumers contiguous near-equal slices;
     consumer c reads slice c of every block, block after block.
Consumers are therefore disjoint and together read the whole epoch, and a reader holds one block
(plus the next one, prefetched). A cursor maps to (block, offset in that block's slice), so a
resume re-reads at most one block.

Whole-sequence mode: the split's sequences in cache order, unshuffled; consumer c reads the c-th of
num_consumers contiguous near-equal ranges of whole sequences. Blocks are then just groups of
block_shards consecutive shards, read in order.

Follow mode (a cache still being built): shards not committed yet cannot be shuffled, so blocks are
groups of block_shards shards in COMMIT order, formed once all their shards are committed (the last,
smaller block once the manifest is complete); rows are still permuted within each block and sliced
among consumers. The order is the same whether the build has finished or not, so cursors stay valid
while the cache grows.

Every shard holds whole sequences of exactly context_size rows in sequence order (manifest.proto),
so the row at index i of a shard has position i % context_size: BOS rows are found by arithmetic,
without reading the position column.
"""
from __future__ import annotations

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
    block_shards: int
    context_size: int
    drop_bos: bool = False        # leave out position-0 rows (only pass True for prepend_bos caches)
    num_consumers: int = 1
    consumer_index: int = 0
    shuffle: bool = True          # False: whole-sequence mode
    follow: bool = False          # blocks from shards in commit order

    def __post_init__(self):
        if self.block_shards < 1:
            raise ValueError(f"block_shards must be >= 1, got {self.block_shards}")
        if self.num_consumers < 1 or not 0 <= self.consumer_index < self.num_consumers:
            raise ValueError(f"consumer_index must be in 0..{self.num_consumers - 1}, got {self.consumer_index}")
        if self.context_size < 1 + self.drop_bos:
            raise ValueError(f"context_size {self.context_size} leaves no rows")

    @property
    def rows_per_sequence(self) -> int:
        return self.context_size - self.drop_bos


@dataclass(frozen=True)
class Block:
    """One block of the epoch, and this consumer's part of it.

    Its rows are the kept rows (BOS dropped or not) of `shards`, concatenated in that order; the
    consumer reads rows `row_indices(...)`, which index the FULL concatenation (BOS rows included),
    i.e. what reading the shards gives."""
    index: int                    # position in the epoch's block order; seeds the permutation
    shards: tuple[int, ...]       # indices into the split's shard list, in read order
    kept_rows: int                # rows of the block after dropping BOS
    lo: int                       # this consumer's slice of the (permuted) kept rows
    hi: int

    @property
    def num_rows(self) -> int:
        return self.hi - self.lo


def rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


def shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    return rng(seed, epoch).permutation(num_shards)


def block_permutation(seed: int, epoch: int, block_index: int, num_rows: int) -> np.ndarray:
    # a third key word keeps block streams apart from shard_order's (seed, epoch) stream
    return rng(seed, epoch, 1, block_index).permutation(num_rows)


def consumer_slice(num_rows: int, num_consumers: int, consumer_index: int) -> tuple[int, int]:
    """Consumer c's contiguous part of num_rows: sizes differ by at most one row between consumers."""
    return num_rows * consumer_index // num_consumers, num_rows * (consumer_index + 1) // num_consumers


def kept_rows(num_rows: int, order: Order) -> int:
    return num_rows // order.context_size * order.rows_per_sequence


def check_shards(shards: Sequence[Shard], context_size: int) -> None:
    for s in shards:
        if s.num_rows != s.num_sequences * context_size:
            raise CacheError(
                f"shard {s.path} holds {s.num_rows} rows for {s.num_sequences} sequences of {context_size}: "
                "not whole sequences, cannot stream it"
            )


def epoch_blocks(shards: Sequence[Shard], order: Order, complete: bool = True) -> list[Block]:
    """The consumer's blocks of the epoch, in reading order, that the committed `shards` allow.

    complete=False (follow mode on a cache still being built) leaves out a trailing group of fewer
    than block_shards shards: more shards will join it."""
    check_shards(shards, order.context_size)
    if not order.shuffle:
        return sequence_blocks(shards, order)
    n = len(shards)
    ids = np.arange(n) if order.follow else shard_order(order.seed, order.epoch, n)
    groups = [tuple(int(i) for i in ids[k:k + order.block_shards]) for k in range(0, n, order.block_shards)]
    if not complete and groups and len(groups[-1]) < order.block_shards:
        groups.pop()
    blocks = []
    for index, group in enumerate(groups):
        rows = sum(kept_rows(shards[i].num_rows, order) for i in group)
        lo, hi = consumer_slice(rows, order.num_consumers, order.consumer_index)
        blocks.append(Block(index, group, rows, lo, hi))
    return blocks


def sequence_blocks(shards: Sequence[Shard], order: Order) -> list[Block]:
    """Whole-sequence mode: the consumer's range of sequences, cut at block boundaries."""
    total_sequences = sum(s.num_sequences for s in shards)
    first, last = consumer_slice(total_sequences, order.num_consumers, order.consumer_index)
    blocks, seq = [], 0
    for k in range(0, len(shards), order.block_shards):
        group = tuple(range(k, min(k + order.block_shards, len(shards))))
        sequences = sum(shards[i].num_sequences for i in group)
        lo, hi = max(first, seq) - seq, min(last, seq + sequences) - seq
        if lo < hi:
            rps = order.rows_per_sequence
            blocks.append(Block(len(blocks), group, sequences * rps, lo * rps, hi * rps))
        seq += sequences
    return blocks


def row_indices(block: Block, order: Order) -> np.ndarray:
    """Indices, into the concatenated rows of the block's shards, of the rows this consumer reads,
    in reading order."""
    if order.shuffle:
        rows = block_permutation(order.seed, order.epoch, block.index, block.kept_rows)[block.lo:block.hi]
    else:
        rows = np.arange(block.lo, block.hi)
    if order.drop_bos:  # kept row k is row k + k // (ctx - 1) + 1 of the full concatenation
        rows = rows + rows // order.rows_per_sequence + 1
    return rows


def locate(blocks: Sequence[Block], start: int) -> tuple[int, int]:
    """(block number in `blocks`, offset in its slice) of the consumer's row `start`.

    A cursor at or past the end of `blocks` gives (len(blocks), rows past the end): an error for a
    complete epoch, a wait for blocks still to come in follow mode."""
    for i, block in enumerate(blocks):
        if start < block.num_rows:
            return i, start
        start -= block.num_rows
    return len(blocks), start


def consumer_rows(blocks: Sequence[Block]) -> int:
    return sum(b.num_rows for b in blocks)
