"""The epoch order as a pure function: exactly once, disjoint consumers, seeds, cursors, follow."""
from __future__ import annotations

import numpy as np
import pytest

from actserve.proto.manifest_pb2 import Shard
from actserve.services.storage import CacheError
from actserve.services.shuffle import Order, consumer_rows, epoch_blocks, locate, row_indices

CTX = 8


def make_shards(sequences: list[int]) -> list[Shard]:
    shards, first = [], 0
    for i, n in enumerate(sequences):
        shards.append(Shard(path=f"train/shard-{i:05d}.parquet", num_rows=n * CTX, num_bytes=1,
                            first_sequence=first, num_sequences=n))
        first += n
    return shards


SHARDS = make_shards([5, 7, 5, 5, 6, 5, 5, 2])  # uneven, a short last shard


def epoch_rows(shards: list[Shard], order: Order, complete: bool = True) -> np.ndarray:
    """Global row ids (index in the split) this consumer reads, in order."""
    offsets = np.cumsum([0] + [s.num_rows for s in shards])
    out = []
    for block in epoch_blocks(shards, order, complete):
        # map indices into the block's concatenation back to split row ids
        starts = np.cumsum([0] + [shards[i].num_rows for i in block.shards])
        idx = row_indices(block, order)
        which = np.searchsorted(starts, idx, side="right") - 1
        out.append(offsets[np.array(block.shards)[which]] + idx - starts[which])
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def order(**kw) -> Order:
    return Order(**{"seed": 0, "epoch": 0, "block_shards": 3, "context_size": CTX, **kw})


@pytest.mark.parametrize("num_consumers", [1, 3])
@pytest.mark.parametrize("drop_bos", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_consumers_partition_the_epoch(num_consumers, drop_bos, shuffle):
    total = sum(s.num_rows for s in SHARDS)
    wanted = [r for r in range(total) if not (drop_bos and r % CTX == 0)]
    parts = [epoch_rows(SHARDS, order(num_consumers=num_consumers, consumer_index=c, drop_bos=drop_bos, shuffle=shuffle))
             for c in range(num_consumers)]
    union = np.concatenate(parts)
    assert sorted(union.tolist()) == wanted  # every row once, across consumers: disjoint and complete
    sizes = [len(p) for p in parts]
    # near-equal: one row per block apart (shuffled), one sequence apart (whole sequences)
    assert max(sizes) - min(sizes) <= (len(epoch_blocks(SHARDS, order())) if shuffle else CTX)


def test_shuffle_mixes_shards_within_blocks():
    rows = epoch_rows(SHARDS, order(block_shards=4))
    shard_of = rows // CTX // 5  # roughly: consecutive rows should come from several shards
    assert len(set(shard_of[:20].tolist())) > 1
    assert not np.array_equal(rows, np.sort(rows))


def test_order_depends_on_seed_and_epoch_only():
    a = epoch_rows(SHARDS, order(seed=1))
    assert np.array_equal(a, epoch_rows(SHARDS, order(seed=1)))
    assert not np.array_equal(a, epoch_rows(SHARDS, order(seed=2)))
    assert not np.array_equal(a, epoch_rows(SHARDS, order(seed=1, epoch=1)))


def test_cursor_resumes_within_one_block():
    o = order(num_consumers=3, consumer_index=1, drop_bos=True)
    blocks = epoch_blocks(SHARDS, o)
    full = epoch_rows(SHARDS, o)
    for start in (0, 1, 17, blocks[0].num_rows, len(full) - 1, len(full)):
        first, offset = locate(blocks, start)
        tail = [row_indices(b, o) for b in blocks[first:]]
        if tail:
            tail[0] = tail[0][offset:]  # only the block holding the cursor is re-read
        assert sum(map(len, tail)) == len(full) - start
    assert locate(blocks, len(full) + 5) == (len(blocks), 5)


def test_follow_blocks_are_a_stable_prefix():
    o = order(follow=True)
    final = epoch_blocks(SHARDS, o)
    for committed in range(len(SHARDS) + 1):
        growing = epoch_blocks(SHARDS[:committed], o, complete=False)
        assert growing == final[:len(growing)]
        assert all(len(b.shards) == o.block_shards for b in growing)  # a partial group waits
    assert [s for b in final for s in b.shards] == list(range(len(SHARDS)))  # commit order


def test_sequence_mode_reads_whole_sequences_in_order():
    for drop_bos in (False, True):
        parts = [epoch_rows(SHARDS, order(shuffle=False, num_consumers=3, consumer_index=c, drop_bos=drop_bos))
                 for c in range(3)]
        rows = np.concatenate(parts)
        assert np.array_equal(rows, np.sort(rows))
        for part in parts:
            assert len(part) % (CTX - drop_bos) == 0 and part[0] % CTX == int(drop_bos)


def test_bad_orders_and_shards():
    with pytest.raises(ValueError, match="consumer_index"):
        order(num_consumers=2, consumer_index=2)
    with pytest.raises(ValueError, match="block_shards"):
        order(block_shards=0)
    bad = [Shard(path="train/shard-00000.parquet", num_rows=CTX * 2 + 1, num_sequences=2)]
    with pytest.raises(CacheError, match="shard-00000"):
        epoch_blocks(bad, order())
    assert consumer_rows(epoch_blocks([], order())) == 0
