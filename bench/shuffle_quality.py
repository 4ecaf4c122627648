"""Shuffle quality: distinct sequences per batch, the shuffle's order vs a uniform global shuffle.

Pure order functions on a manifest built in memory (no data): GPT-2 small's layout, 12
hook_resid_pre hooks of d_model 768 in float16 at context 128, 56 sequences per shard (~128 MB),
row groups as shard_format.shard_group_rows lays them out, a 300M-token train split; one
consumer reading one hook with drop_bos. Each line, for position-major shards (what builds write)
and for shards in sequence order (caches built before): the mean distinct sequences per batch over
the first batches of the epoch, the computed expectation of a uniform shuffle of the whole split,
and the ratio (goal >= 0.9); "stated" is the expectation for a buffer of S = buffer_tokens / r
sequences (r rows of each: 127 in sequence order, row group rows / sequences per shard when
position-major), the figure proto/stream.proto states.

    python bench/shuffle_quality.py [--tokens 300000000] [--batches 64]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from actserve.proto.manifest_pb2 import BuildConfig, Manifest, Shard
from actserve.services.shard_format import shard_group_rows
from actserve.services.shuffle import (Order, consumer_rows, epoch_buffers, epoch_slices, expected_distinct, make_buffer,
                                       row_indices)
from actserve.services.stream_plan import fitting_buffer_tokens

CTX, D_MODEL, SEQUENCES_PER_SHARD = 128, 768, 56
HOOKS = [f"blocks.{i}.hook_resid_pre" for i in range(12)]


def gpt2_manifest(tokens: int, position_major: bool) -> Manifest:
    config = BuildConfig(model="gpt2", context_size=CTX, prepend_bos=True, hooks=HOOKS, dtype="float16",
                         sequences_per_shard=SEQUENCES_PER_SHARD, position_major=position_major)
    manifest = Manifest(config=config, d_model=D_MODEL, complete=True)
    rows = SEQUENCES_PER_SHARD * CTX
    num_shards = tokens // rows
    manifest.train.shards.extend(Shard(path=f"train/shard-{i:05d}.parquet", num_rows=rows, num_bytes=1,
                                       first_sequence=i * SEQUENCES_PER_SHARD, num_sequences=SEQUENCES_PER_SHARD)
                                 for i in range(num_shards))
    manifest.train.planned_shards = num_shards
    return manifest


def batch_sequences(manifest: Manifest, order: Order, rows_needed: int) -> np.ndarray:
    """Global sequence id of each of the consumer's first rows_needed rows."""
    shards = manifest.train.shards
    out, have = [], 0
    for buffer in epoch_buffers(shards, order):
        starts = np.cumsum([0, *buffer.piece_rows])
        idx = row_indices(buffer, order)
        which = np.searchsorted(starts, idx, side="right") - 1
        first_seq = np.array([shards[s].first_sequence for s, _ in buffer.pieces])[which]
        stored = np.array([g * order.group_rows for _, g in buffer.pieces])[which] + idx - starts[which]
        # stored row p * N + s is sequence s when position-major, row s * CTX + p otherwise
        out.append(first_seq + (stored % SEQUENCES_PER_SHARD if order.position_major else stored // CTX))
        have += len(idx)
        if have >= rows_needed:
            break
    return np.concatenate(out)[:rows_needed]


def measure(manifest: Manifest, what: str, buffer_tokens: int, batch: int, batches: int,
            group_rows: int | None = None) -> float:
    major = manifest.config.position_major
    group_rows = group_rows or shard_group_rows(manifest.config, D_MODEL)
    order = Order(seed=0, epoch=0, buffer_tokens=buffer_tokens, context_size=CTX, group_rows=group_rows, drop_bos=True,
                  position_major=major)
    seqs = batch_sequences(manifest, order, batch * batches)
    ours = np.mean([len(np.unique(seqs[k:k + batch])) for k in range(0, len(seqs) - batch + 1, batch)])
    total_sequences = sum(s.num_sequences for s in manifest.train.shards)
    uniform = expected_distinct(total_sequences, batch)
    rows_each = group_rows / SEQUENCES_PER_SHARD if major else CTX - 1
    bound = expected_distinct(int(buffer_tokens / rows_each), batch)
    layout = "position-major" if major else "sequence order"
    print(f"  {layout:<15} {what:<46} batch {batch:>6,}: {ours:>8,.1f} distinct | uniform global {uniform:>8,.1f} | "
          f"ratio {ours / uniform:.3f} (stated {bound / uniform:.3f})")
    return ours / uniform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=300_000_000)
    parser.add_argument("--batches", type=int, default=64, help="batches measured from the start of the epoch")
    args = parser.parse_args()
    start = time.perf_counter()
    layouts = {major: gpt2_manifest(args.tokens, major) for major in (True, False)}
    groups = {major: shard_group_rows(m.config, D_MODEL) for major, m in layouts.items()}
    print(f"GPT-2 small layout: {len(layouts[True].train.shards):,} shards of {SEQUENCES_PER_SHARD} sequences, "
          f"row groups of {groups[True]:,} rows position-major ({groups[False]:,} in sequence order), "
          f"{args.tokens / 1e6:,.0f}M tokens; one hook, drop_bos")
    one_gb = fitting_buffer_tokens(layouts[True], "train", HOOKS[:1], False, 1, 4096, "", 10**9)
    took = {"consumer_rows (plan_stream)": {}, "the reader's first buffer": {}, "epoch_buffers (all built)": {}}
    for major, manifest in layouts.items():  # what a stream's start computes: plan_stream, then the reader
        order = Order(seed=0, epoch=0, buffer_tokens=one_gb, context_size=CTX, group_rows=groups[major],
                      drop_bos=True, position_major=major)
        t0 = time.perf_counter()
        consumer_rows(manifest.train.shards, order)
        t1 = time.perf_counter()
        pieces, slices = epoch_slices(manifest.train.shards, order, complete=True)  # block_reader.pending_buffers
        run, lo, hi = slices[0]
        make_buffer(0, run, pieces, lo, hi)
        t2 = time.perf_counter()
        epoch_buffers(manifest.train.shards, order)
        for what, t in zip(took, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
            took[what][major] = t
    for what, t in took.items():
        print(f"  {what:<28} default buffer: {t[True]:.2f} s position-major | "
              f"{t[False]:.2f} s sequence order | ratio {t[True] / t[False]:.1f}")
    measure(layouts[False], "before: blocks of 4 whole shards", 4 * SEQUENCES_PER_SHARD * (CTX - 1), 4096,
            args.batches, group_rows=SEQUENCES_PER_SHARD * CTX)
    for batch in (4096, 16384):
        for manifest in layouts.values():
            measure(manifest, f"default buffer, --stream-memory-gb 1 ({one_gb / 1e6:.2f}M)", one_gb, batch,
                    args.batches)
    for batch in (4096, 16384):
        for manifest in layouts.values():
            measure(manifest, f"5 x batch x context ({5 * batch * CTX / 1e6:.1f}M tokens)", 5 * batch * CTX, batch,
                    args.batches)
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
