"""Cache build benchmarks (issue 2). Each figure prints next to its reference from the same run.

  1. build tokens/s (Ray actor, one forward for all hooks, cast, Parquet, commit) against the
     bare model forward (`run_with_cache` over the same batches, in-process, nothing kept): end to
     end (the model host's start and model load included), and on a model host started before the
     clock (build_cache's `hosts`: the pipeline itself, what a long build runs at);
  2. shard write and read GB/s against pyarrow writing / reading the same bytes as one plain
     fixed_size_binary table (no actserve code), and the shard write beside a thread that runs
     Python without a pause (as a GPU host's forward holds the GIL), at Python's GIL switch
     interval and at the model host's, against the same write alone.

  python bench/cache_build.py                       # the tiny model (made under --workdir if missing), 1M
                                                    # tokens (the offline corpus repeated to hold them)
  python bench/cache_build.py --gpt2-small-random   # a GPT-2-small-shaped model with random weights
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from actserve.demo import prepare_model
from actserve.services.build import build_cache, start_model_hosts
from actserve.services.build_options import BuildOptions
from actserve.services.data import DatasetSpec, iter_documents
from actserve.services.model import layers_needed, load_model, resolve_hooks
from actserve.services.model_host import GIL_SWITCH_INTERVAL
from actserve.services.ray_runtime import ensure_ray
from actserve.services.process_memory import keep_freed_heap_memory
from actserve.services.shard_format import (
    decode_activations, in_sequence_order, read_shard, shard_group_rows, write_shard,
)
from actserve.services.storage import open_url, write_local_file


def gpt2_small_random(workdir: Path, tokenizer_dir: Path) -> Path:
    """GPT-2 small's shape (12 layers, d_model 768, vocab 50257), random weights: speed does not
    depend on weight values, and no hub is reachable."""
    out = workdir / "gpt2-small-random"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, n_ctx=1024)
        GPT2LMHeadModel(cfg).save_pretrained(out)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def corpus_holding(corpus: Path, model_dir: Path, tokens: int, context: int) -> Path:
    """`corpus`, or beside it `corpus` repeated as often as it takes to hold `tokens` (the offline
    corpus holds ~0.6M): the build's start is a fixed cost, so a build cut short by the dataset
    would read as slower than the one asked for. The model's speed does not depend on the text."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    held = sum(len(ids) + 1 for ids in iter_documents(DatasetSpec(str(corpus)), tokenizer))  # + BOS between
    copies = math.ceil(tokens * context / (context - 1) / held)  # each sequence spends a token on BOS
    if copies <= 1:
        return corpus
    repeated = corpus.with_name(f"{corpus.stem}-x{copies}{corpus.suffix}")
    if not repeated.exists():
        write_local_file(repeated, corpus.read_bytes() * copies)
    print(f"corpus {corpus.name} holds {held:,} tokens: the build reads it {copies} times ({repeated.name})")
    return repeated


def bench_build(model_dir: Path, corpus: Path, hooks: str, tokens: int, context: int, batch: int, workdir: Path,
                reps: int, writers: int):
    """Build (end to end, then on a started host) and bare forward `reps` times each,
    interleaved; prints median tokens/s and the median of each rep's ratio."""
    out = workdir / "bench-cache"
    opts = BuildOptions(model=str(model_dir), dataset=str(corpus), hooks=hooks, out=str(out), tokens=tokens,
                        context_size=context, batch_sequences=batch, writers=writers)
    ensure_ray()
    # warm-up: Ray start and the first worker's imports are one-off costs; each timed build still
    # starts its own actor and loads the model (part of the end-to-end time)
    shutil.rmtree(workdir / "warmup", ignore_errors=True)
    build_cache(BuildOptions(**{**opts.__dict__, "out": str(workdir / "warmup"), "tokens": batch * context}),
                progress=False)
    threads = os.cpu_count() or 1

    # the bare forward: the same model as the hosts load, over exactly the cached token batches, in
    # this process, with the torch thread count the model host uses: every core, torch's default;
    # and glibc's freed memory kept, as the model host keeps it: with glibc's defaults the forward
    # faulted its freed megabytes in again, at 0.5-0.7 of its speed on some runs and not others
    keep_freed_heap_memory()
    model = load_model(str(model_dir), device="cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    names = resolve_hooks(model, hooks)
    stop = layers_needed(names, model.cfg.n_layers)
    build_times, started_times, start_times, bare_times, seqs = [], [], [], [], None
    for rep in range(reps):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        manifest = build_cache(opts, progress=False)
        build_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hosts = start_model_hosts(opts)
        described = ray.get([host.describe.remote() for host in hosts])  # started and its model loaded
        start_times.append(time.perf_counter() - t0)
        if rep == 0:
            print(f"  model host on {described[0]['device']}, {described[0]['shards_at_once']} shards in flight", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        build_cache(opts, progress=False, hosts=hosts)
        started_times.append(time.perf_counter() - t0)
        for host in hosts:
            ray.kill(host)
        if seqs is None:
            fs, root = open_url(str(out))
            seqs = np.concatenate([
                read_shard(fs, root, s, columns=["token"]).column("token").to_numpy().reshape(-1, context)
                for s in manifest.train.shards
            ])
            batches = [b.to(model.cfg.device) for b in torch.from_numpy(seqs).split(batch)]
        bare_times.append(bare_forward(model, batches, names, stop, threads))
        n = seqs.size
        print(f"  rep {rep}: build {n / build_times[-1]:10,.0f} tok/s   on a started host {n / started_times[-1]:10,.0f} "
              f"tok/s   bare forward {n / bare_times[-1]:10,.0f} tok/s", flush=True)
    ray.shutdown()
    start_s, bare_s = float(np.median(start_times)), float(np.median(bare_times))
    for times, what in ((build_times, "end to end: host start, model load, tokenize, commits"),
                        (started_times, "on a started host: tokenize, commits")):
        # this machine's speed drifts over minutes: each rep's build is paired with the bare
        # forward run right after it, and the ratio is the median of those pairs
        ratios = [bare / t for t, bare in zip(times, bare_times)]
        print(f"build   {n / float(np.median(times)):12,.0f} tok/s   bare forward {n / bare_s:12,.0f} tok/s   "
              f"ratio {np.median(ratios):.2f} (goal >= 0.9; reps {min(ratios):.2f}-{max(ratios):.2f})   [{what}]")
    print(f"        [medians of {reps}, {len(names)} hooks, {n:,} tokens, torch threads {threads}; the model host's start "
          f"(worker, torch and TransformerLens imports, model load) took {start_s:.1f} s, once per build]")
    return out, manifest


def bare_forward(model, batches, names, stop, threads: int) -> float:
    """Seconds of `run_with_cache` over `batches` with `threads` torch threads, nothing kept."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            model.run_with_cache(batches[0], names_filter=names, stop_at_layer=stop)
            t0 = time.perf_counter()
            for b in batches:
                model.run_with_cache(b, names_filter=names, stop_at_layer=stop)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def bench_shard_io(out: Path, manifest, repeats: int = 3):
    fs, root = open_url(str(out))
    shard = max(manifest.train.shards, key=lambda s: s.num_bytes)
    config = manifest.config
    hooks = list(config.hooks)
    ctx = config.context_size
    table = read_shard(fs, root, shard)  # activations in the shard's row order, as the model host hands them over
    tokens = in_sequence_order(table, ctx, config.position_major).column("token").to_numpy().reshape(-1, ctx)
    acts = {h: decode_activations(table.column(h), manifest.config.dtype, manifest.d_model) for h in hooks}
    plain = pa.table({h: table.column(h) for h in hooks})  # same activation bytes, no actserve code
    nbytes = sum(a.numel() * a.element_size() for a in acts.values())
    tmp = Path(tempfile.mkdtemp())

    def best(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    def ours_write():
        write_shard(fs, str(tmp / "ours.parquet"), tokens, 0, acts, hooks, config.dtype,
                    shard_group_rows(config, manifest.d_model), config.position_major)

    def plain_write():
        pq.write_table(plain, tmp / "plain.parquet", compression="none", use_dictionary=False, write_statistics=False)

    def ours_read():
        t = pq.read_table(tmp / "ours.parquet", columns=hooks)
        for h in hooks:
            decode_activations(t.column(h), manifest.config.dtype, manifest.d_model).sum()

    def plain_read():
        t = pq.read_table(tmp / "plain.parquet")
        for h in hooks:
            col = t.column(h).combine_chunks()
            torch.from_numpy(np.frombuffer(col.buffers()[1], dtype=np.float16)).sum()

    def beside_python(fn, switch_interval: float) -> float:
        """best(fn) while another thread runs Python without a pause, holding the GIL as a GPU model
        host's forward does between kernel launches: a writer that takes the GIL back waits up to
        `switch_interval` each time."""
        stop = threading.Event()

        def spin():
            while not stop.is_set():
                pass

        default = sys.getswitchinterval()
        sys.setswitchinterval(switch_interval)
        spinner = threading.Thread(target=spin)
        spinner.start()
        try:
            return best(fn)
        finally:
            stop.set()
            spinner.join()
            sys.setswitchinterval(default)

    w_ours, w_plain = best(ours_write), best(plain_write)
    r_ours, r_plain = best(ours_read), best(plain_read)
    gb = nbytes / 1e9
    print(f"write   {gb / w_ours:6.2f} GB/s   plain pyarrow {gb / w_plain:6.2f} GB/s   ratio {w_plain / w_ours:.2f} (goal >= 0.8)")
    for interval, what in ((sys.getswitchinterval(), "Python's default"), (GIL_SWITCH_INTERVAL, "the model host's")):
        w_beside = beside_python(ours_write, interval)
        print(f"write beside a thread running Python, GIL switch interval {interval * 1e3:.1f} ms ({what}) "
              f"{gb / w_beside:6.2f} GB/s   alone {gb / w_ours:6.2f} GB/s   ratio {w_ours / w_beside:.2f}")
    print(f"read    {gb / r_ours:6.2f} GB/s   plain pyarrow {gb / r_plain:6.2f} GB/s   ratio {r_plain / r_ours:.2f} (goal >= 0.8)"
          f"   [{nbytes / 1e6:.0f} MB shard, decode included]")
    shutil.rmtree(tmp)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="actserve-work", type=Path)
    p.add_argument("--gpt2-small-random", action="store_true")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch-sequences", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="interleaved build / bare-forward runs (the ratio: the median of their pairs)")
    p.add_argument("--writers", type=int, default=0, help="the build's --writers (0: its default)")
    args = p.parse_args()
    corpus, tiny = prepare_model(args.workdir)
    if args.gpt2_small_random:
        model, hooks, tokens = gpt2_small_random(args.workdir, tiny), "blocks.*.hook_resid_pre", args.tokens or 65536
    else:
        model, hooks, tokens = tiny, "blocks.*.hook_resid_pre", args.tokens or 1_000_000
    print(f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads {torch.get_num_threads()}")
    corpus = corpus_holding(corpus, model, tokens, args.context_size)
    out, manifest = bench_build(model, corpus, hooks, tokens, args.context_size, args.batch_sequences,
                                 args.workdir, args.reps, args.writers)
    bench_shard_io(out, manifest)


if __name__ == "__main__":
    main()
