"""The epoch order as a pure function: exactly once, disjoint consumers, seeds, cursors, follow, and
how a batch's mix of sequences compares with a uniform global shuffle."""
from __future__ import annotations

import numpy as np
import pytest

from actserve.proto.manifest_pb2 import Shard
from actserve.services.storage import CacheError
from actserve.services.shuffle import (Order, consumer_rows, epoch_buffers, expected_distinct, locate, row_indices,
                                       split_pieces)

CTX = 8
GROUP = 2 * CTX  # two sequences per row group: a shard of 5 sequences has pieces of 2, 2, 1


def make_shards(sequences: list[int]) -> list[Shard]:
    shards, first = [], 0
    for i, n in enumerate(sequences):
        shards.append(Shard(path=f"train/shard-{i:05d}.parquet", num_rows=n * CTX, num_bytes=1,
                            first_sequence=first, num_sequences=n))
        first += n
    return shards


SHARDS = make_shards([5, 7, 5, 5, 6, 5, 5, 2])  # uneven, a short last shard


def epoch_rows(shards: list[Shard], order: Order, complete: bool = True) -> np.ndarray:
    """Global row ids (index in the split, sequence order: sequence * CTX + position) this consumer
    reads, in order."""
    offsets = np.cumsum([0] + [s.num_rows for s in shards])
    out = []
    for buffer in epoch_buffers(shards, order, complete):
        # map indices into the buffer's concatenation back to the stored rows of their shards
        starts = np.cumsum([0, *buffer.piece_rows])
        idx = row_indices(buffer, order)
        which = np.searchsorted(starts, idx, side="right") - 1
        shard = np.array([s for s, _ in buffer.pieces])[which]
        stored = np.array([g * order.group_rows for _, g in buffer.pieces])[which] + idx - starts[which]
        if order.position_major:  # stored row p * N + s is sequence s, position p
            n = np.array([shards[t].num_sequences for t in range(len(shards))])[shard]
            stored = stored % n * CTX + stored // n
        out.append(offsets[shard] + stored)
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def piece_ids(shards: list[Shard]) -> list[tuple[int, int]]:
    """(shard, row group) of every piece of the split, in shard order."""
    pieces = split_pieces(shards, order())
    return list(zip(pieces.shard.tolist(), pieces.group.tolist()))


def order(**kw) -> Order:
    return Order(**{"seed": 0, "epoch": 0, "buffer_tokens": 6 * CTX, "context_size": CTX, "group_rows": GROUP, **kw})


layouts = pytest.mark.parametrize("position_major", [True, False], ids=["position-major", "sequence-order"])


@pytest.mark.parametrize("num_consumers", [1, 3])
@pytest.mark.parametrize("drop_bos", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
@layouts
def test_consumers_partition_the_epoch(num_consumers, drop_bos, shuffle, position_major):
    total = sum(s.num_rows for s in SHARDS)
    wanted = [r for r in range(total) if not (drop_bos and r % CTX == 0)]
    parts = [epoch_rows(SHARDS, order(num_consumers=num_consumers, consumer_index=c, drop_bos=drop_bos, shuffle=shuffle,
                                      position_major=position_major))
             for c in range(num_consumers)]
    union = np.concatenate(parts)
    assert sorted(union.tolist()) == wanted  # every row once, across consumers: disjoint and complete
    sizes = [len(p) for p in parts]
    # near-equal: one row per buffer apart (shuffled), one sequence apart (whole sequences)
    assert max(sizes) - min(sizes) <= (len(epoch_buffers(SHARDS, order())) if shuffle else CTX)


def test_shuffle_mixes_shards_within_buffers():
    rows = epoch_rows(SHARDS, order(buffer_tokens=20 * CTX))
    shard_of = rows // CTX // 5  # roughly: consecutive rows should come from several shards
    assert len(set(shard_of[:20].tolist())) > 1
    assert not np.array_equal(rows, np.sort(rows))


def test_order_depends_on_seed_and_epoch_only():
    a = epoch_rows(SHARDS, order(seed=1))
    assert np.array_equal(a, epoch_rows(SHARDS, order(seed=1)))
    assert not np.array_equal(a, epoch_rows(SHARDS, order(seed=2)))
    assert not np.array_equal(a, epoch_rows(SHARDS, order(seed=1, epoch=1)))


@layouts
def test_cursor_resumes_within_one_buffer(position_major):
    o = order(num_consumers=3, consumer_index=1, drop_bos=True, position_major=position_major)
    blocks = epoch_buffers(SHARDS, o)
    full = epoch_rows(SHARDS, o)
    sizes = [b.num_rows for b in blocks]
    for start in (0, 1, 17, sizes[0], len(full) - 1, len(full)):
        first, offset = locate(sizes, start)
        tail = [row_indices(b, o) for b in blocks[first:]]
        if tail:
            tail[0] = tail[0][offset:]  # only the buffer holding the cursor is re-read
        assert sum(map(len, tail)) == len(full) - start
    assert locate(sizes, len(full) + 5) == (len(blocks), 5)


def test_follow_buffers_are_a_stable_prefix():
    o = order(follow=True)
    final = epoch_buffers(SHARDS, o)
    for committed in range(len(SHARDS) + 1):
        growing = epoch_buffers(SHARDS[:committed], o, complete=False)
        assert growing == final[:len(growing)]
        assert all(b.kept_rows >= o.buffer_tokens for b in growing)  # a partial buffer waits
    assert [p for b in final for p in b.pieces] == piece_ids(SHARDS)  # commit order


def test_buffers_are_pieces_of_row_groups():
    o = order()
    buffers = epoch_buffers(SHARDS, o)
    assert sorted(p for b in buffers for p in b.pieces) == piece_ids(SHARDS)  # every piece once
    assert all(b.kept_rows >= o.buffer_tokens for b in buffers[:-1])
    assert all(b.kept_rows - b.piece_rows[-1] < o.buffer_tokens for b in buffers)  # no piece more than needed
    assert len({s for b in buffers[:2] for s, _ in b.pieces}) > 2  # a buffer draws row groups of many shards


def batch_mix(shards: list[Shard], o: Order, batch: int) -> float:
    """Mean distinct sequences per batch of the consumer's epoch."""
    sequence = epoch_rows(shards, o) // CTX
    return np.mean([len(np.unique(sequence[k:k + batch])) for k in range(0, len(sequence) - batch + 1, batch)])


@layouts
def test_batch_mix_matches_a_global_shuffle(position_major):
    """Distinct sequences per batch, against the computed expectation of a uniform global shuffle:
    the ratio the buffer guarantees (>= 0.9 for buffer_tokens >= 5 * batch * rows per sequence)."""
    shards = make_shards([3] * 400)  # 1200 sequences of many small shards
    batch = 48
    o = order(buffer_tokens=5 * batch * CTX, drop_bos=True, position_major=position_major)
    ours, uniform = batch_mix(shards, o, batch), expected_distinct(len(shards) * 3, batch)
    assert abs(ours / uniform - 1) <= 0.1, (ours, uniform)
    # and the stated bound: a buffer of S sequences gives S (1 - (1 - 1/S)^b), >= 0.9 of global at S = 5b
    assert expected_distinct(5 * batch, batch) / uniform >= 0.9


def test_position_major_shards_mix_more_sequences_per_buffer_token():
    """Shards of many sequences in row groups of a few sequences' rows (GPT-2's layout: 56
    sequences, 8 row groups): in sequence order a buffer of 2 x batch x CTX rows holds 2 x batch
    sequences (0.79 of a global shuffle's mix); position-major, each row group holds 2 rows of each
    of its shard's 16 sequences, so the same buffer holds up to 8 x batch sequences."""
    shards = make_shards([16] * 60)
    batch = 24
    uniform = expected_distinct(16 * 60, batch)
    mixes = {major: batch_mix(shards, order(buffer_tokens=2 * batch * CTX, position_major=major), batch) / uniform
             for major in (True, False)}
    assert mixes[True] >= 0.9 and mixes[False] < 0.9, mixes


@layouts
def test_sequence_mode_reads_whole_sequences_in_order(position_major):
    for drop_bos in (False, True):
        parts = [epoch_rows(SHARDS, order(shuffle=False, num_consumers=3, consumer_index=c, drop_bos=drop_bos,
                                          position_major=position_major))
                 for c in range(3)]
        rows = np.concatenate(parts)
        assert np.array_equal(rows, np.sort(rows))
        for part in parts:
            assert len(part) % (CTX - drop_bos) == 0 and part[0] % CTX == int(drop_bos)


def test_bad_orders_and_shards():
    with pytest.raises(ValueError, match="consumer_index"):
        order(num_consumers=2, consumer_index=2)
    with pytest.raises(ValueError, match="buffer_tokens"):
        order(buffer_tokens=0)
    with pytest.raises(ValueError, match="group_rows"):
        order(group_rows=CTX + 1)
    bad = [Shard(path="train/shard-00000.parquet", num_rows=CTX * 2 + 1, num_sequences=2)]
    with pytest.raises(CacheError, match="shard-00000"):
        epoch_buffers(bad, order())
    assert consumer_rows([], order()) == 0
