"""Where a build's time goes: the model host's parts timed apart, without Ray.

On a GPU the build ran at 0.41-0.45 of the bare forward, to the disk and to memory alike, and 8
writers did no better than 4 (bench/README.md). This tells which part holds it back: the host's
forward with its statistics and copies against the bare forward; shard writes alone, by 1, 4 and 8
threads at once; the host's forward beside 4 or 8 writers that never stop, as threads of its
process (as the actor runs them) and as processes of their own; and the host as its actor runs
it (the forward under its lock, 4 or 8 writes beside it), to the disk and to /dev/shm.

If the forward slows beside writing threads but not beside writing processes, the writers' share
of the host's process (the GIL, between a GPU forward's many small launches) holds the build back,
and writers belong in a process of their own; if it slows beside both, the machine does (memory
bandwidth, the page cache).

  python bench/build_parts.py --workdir actserve-work [--model DIR] [--shards 36]

The model defaults to bench/cache_build.py's GPT-2-small-shaped one with random weights; shards are
written under WORKDIR/build-parts and /dev/shm/build-parts.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from actserve.services.build_options import WeightProcessing
from actserve.services.model import layers_needed
from actserve.services.model_host import ModelHost
from actserve.services.shard_format import shard_group_rows, write_shard
from actserve.services.storage import open_url
from cache_build import gpt2_small_random  # bench/ is this script's directory

CTX, SEQ_PER_SHARD, BATCH = 128, 56, 32  # GPT-2 small's 12 hooks at float16: 56 sequences fill a 128 MiB shard
HOOKS = "blocks.*.hook_resid_pre"


def clock(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def shard_layout(hooks: list[str]) -> SimpleNamespace:
    """The cache config a build lays these shards out by: position-major rows, the builder's row groups."""
    return SimpleNamespace(hooks=hooks, dtype="float16", position_major=True, sequences_per_shard=SEQ_PER_SHARD,
                           context_size=CTX)


def write_forever(where: str, index: int, n_hooks: int, d_model: int, ready, stop, written) -> None:
    """One writer: a shard of random values in the build's layout, written to its own file over and
    over until `stop` is set; `ready` counts the writers started, `written` the shards written."""
    hooks = [f"blocks.{i}.hook_resid_pre" for i in range(n_hooks)]
    acts = {h: torch.randn(SEQ_PER_SHARD * CTX, d_model).half() for h in hooks}
    tokens = np.zeros((SEQ_PER_SHARD, CTX), dtype=np.int32)
    group_rows = shard_group_rows(shard_layout(hooks), d_model)
    fs, root = open_url(where)
    with ready.get_lock():
        ready.value += 1
    while not stop.is_set():
        write_shard(fs, f"{root}/w{index}.parquet", tokens, 0, acts, hooks, "float16", group_rows, True)
        with written.get_lock():
            written.value += 1


@contextlib.contextmanager
def writing(where: Path, writers: int, processes: bool, n_hooks: int, d_model: int):
    """`writers` write_forever threads of this process, or processes of their own, writing under
    `where` from when this enters until it exits; yields the count of shards written."""
    spawn = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
    ready, written, stop = spawn.Value("i", 0), spawn.Value("i", 0), spawn.Event()
    kind = spawn.Process if processes else threading.Thread
    workers = [kind(target=write_forever, args=(str(where), i, n_hooks, d_model, ready, stop, written))
               for i in range(writers)]
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    for worker in workers:
        worker.start()
    while ready.value < writers:
        if not all(worker.is_alive() for worker in workers):
            stop.set()
            raise RuntimeError("a writer ended before it started writing (its error is above)")
        time.sleep(0.05)
    try:
        yield written
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        shutil.rmtree(where, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("actserve-work"),
                   help="holds tiny-model/ (its tokenizer) and gets the model and the shards written")
    p.add_argument("--model", default=None, help="a local model directory (default: GPT-2 small's shape, random weights)")
    p.add_argument("--shards", type=int, default=36, help="shards of 56 x 128 tokens (36: the GPU bench's 262,144 tokens)")
    args = p.parse_args()
    places = (args.workdir / "build-parts", Path("/dev/shm/build-parts"))  # the disk, and memory
    model_dir = args.model or str(gpt2_small_random(args.workdir, args.workdir / "tiny-model"))
    host = ModelHost(model_dir, WeightProcessing(), writers=4)
    print(f"{model_dir} on {host.device}", flush=True)
    hooks = host.resolve_hooks(HOOKS)
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 4096, (SEQ_PER_SHARD, CTX)).astype(np.int32) for _ in range(args.shards)]
    tokens = args.shards * SEQ_PER_SHARD * CTX
    model, stop = host.model, layers_needed(hooks, host.model.cfg.n_layers)

    def bare():
        with torch.inference_mode():
            for s in shards:
                for b in torch.from_numpy(s).split(BATCH):
                    model.run_with_cache(b.to(host.device), names_filter=hooks, stop_at_layer=stop)

    def acts_only():
        for s in shards:
            host.activations(s, hooks, "float16", BATCH, True, True)

    def line(what, seconds):
        print(f"{what:<62} {seconds:7.3f} s  {tokens / seconds:10,.0f} tok/s", flush=True)

    bare()
    line("bare forward (run_with_cache, nothing kept)", clock(bare))
    line("host.activations: forward, stats, cast, copy to pinned, cold", clock(acts_only))
    line("host.activations: the same, warm", clock(acts_only))
    line("bare forward again", clock(bare))

    group_rows = shard_group_rows(shard_layout(hooks), model.cfg.d_model)
    acts, _ = host.activations(shards[0], hooks, "float16", BATCH, True, True)
    gb = sum(a.numel() * a.element_size() for a in acts.values()) / 1e9
    for where in places:
        fs, root = open_url(str(where))
        for threads in (1, 4, 8):
            shutil.rmtree(where, ignore_errors=True)
            n = 2 * threads
            with ThreadPoolExecutor(threads) as pool:
                seconds = clock(lambda: list(pool.map(
                    lambda i: write_shard(fs, f"{root}/s{i}.parquet", shards[0], 0, acts, hooks, "float16", group_rows,
                                          True), range(n))))
            print(f"write_shard to {where}, {threads} thread(s) at once, {n} shards: {n * gb / seconds:6.2f} GB/s "
                  f"({n * gb / seconds / threads:.2f} GB/s a thread)", flush=True)
        shutil.rmtree(where, ignore_errors=True)

    # the host's forward beside writes that never stop, to the disk: in threads, then in processes
    for writers in (4, 8):
        for processes in (False, True):
            with writing(places[0], writers, processes, len(hooks), model.cfg.d_model) as written:
                before = written.value
                seconds = clock(acts_only)
                shards_written = written.value - before
            line(f"host.activations beside {writers} writing {'processes' if processes else 'threads'} "
                 f"({shards_written * gb / seconds:.2f} GB/s)", seconds)

    # the model host as its actor runs it: 1 + writers threads each calling write_shard (the
    # forward under the host's lock, the write beside the next shard's forward)
    for where in places:
        for writers in (4, 8):
            shutil.rmtree(where, ignore_errors=True)
            with ThreadPoolExecutor(1 + writers) as pool:
                seconds = clock(lambda: list(pool.map(
                    lambda i: host.write_shard(str(where), {}, f"s{i}.parquet", shards[i], 0, hooks, "float16", BATCH,
                                               True, group_rows, True), range(len(shards)))))
            line(f"host.write_shard to {where}, {writers} writers", seconds)
        shutil.rmtree(where, ignore_errors=True)

if __name__ == "__main__":
    main()
