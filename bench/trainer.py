"""Trainer and evaluator benchmarks (issues 5 and 6). Each figure prints next to its reference.

  1. one trainer: fraction of time waiting for data and tokens/s, fed by the server vs from tensors
     already in memory (same hook, same SAE, the same activations in the order the server sends
     them, fetched from it before the runs), with 1 torch thread (as the demo's trainers run: Ray
     tasks of 1 CPU) and with every core;
  2. K concurrent trainers (Ray tasks, as the demo runs them; `--trainers`, default one per hook,
     hooks taken in turn): tokens trained per second summed over all trainers, fed by one server vs
     each from in-memory tensors of its own stream's order;
     (1) and (2) are measured over Flight and, as a trainer on the server's node can read, with
     `read_from` (the server plans the stream, the trainer cuts the batches from the shards);
  3. evaluator: logits from the cached activations with `start_at_layer` vs the full forward with a
     replacement hook, for the first and the last layer's hook.

  python bench/trainer.py --cache actserve-work/cache-2000000 --tokens 400000 [--trainers 8]

`--gpt2-small DIR` measures (1) only, at GPT-2 small's size: a synthetic cache of one d_model 768
float16 hook (written to DIR once), an SAE of d_sae 24576 (expansion 32), batches of 4096 tokens;
keep --tokens small (a step takes seconds on a CPU):

  python bench/trainer.py --gpt2-small /tmp/actserve-gpt2-synthetic --tokens 16384

`--device cuda` trains on the GPU; the in-memory reference then reads its batches from GPU memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
import tempfile

import ray
import torch

from actserve.clients.evaluator import logits_from
from actserve.clients.stream import ActivationStream
from actserve.clients.train_options import TrainOptions
from actserve.clients.trainer import train, train_from_server
from actserve.services.manifest import read_manifest
from actserve.services.model import load_model
from actserve.services.ray_runtime import ensure_ray
from actserve.services.serve_options import ServeOptions
from actserve.testing import SyntheticSpec, TensorBatches, spawn_server, write_synthetic_cache


def served_order(server: str, url: str, hook: str, tokens: int, batch_size: int, seed: int) -> torch.Tensor:
    """The first `tokens` activations a trainer of `hook` with this seed and batch size is served,
    as float32 in memory: the reference trainer gets the same activations in the same order. (The
    order changes what the SAE learns and so what a step costs: fed the split in sequence order,
    the same trainer ends at L0 ~400 instead of ~1,050, and `count_nonzero`, whose cost grows with
    the nonzeros, takes 6.7 instead of 13.7 ms a step: it ran 5-23% faster.)"""
    stream = ActivationStream(server, cache=url, hooks=[hook], batch_size=batch_size, seed=seed, epochs=None,
                              drop_bos=True)
    parts, have = [], 0
    try:
        for batch in stream:
            parts.append(batch[hook].float())
            have += len(parts[-1])
            if have >= tokens:
                break
    finally:
        stream.close()
    return torch.cat(parts)[:tokens]


def last_record(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


GPT2_SMALL = SyntheticSpec(hooks=("blocks.8.hook_resid_pre",), d_model=768, context_size=128, sequences_per_shard=64,
                           train_shards=4, eval_shards=0, dtype="float16")


def gpt2_small_cache(directory: str) -> str:
    url = str(Path(directory) / "gpt2-small-synthetic")
    manifest = read_manifest(url)
    if manifest is None or not manifest.complete or manifest.d_model != GPT2_SMALL.d_model:
        write_synthetic_cache(url, GPT2_SMALL)
    return url


def options(hook: str, out: Path, tokens: int, args, seed: int = 0, read_from: str = "") -> TrainOptions:
    return TrainOptions(hook=hook, out=str(out), tokens=tokens, expansions=(args.expansion,), batch_size=args.batch_size,
                        l1_coefficients=(1e-3,), lr_warmup_steps=10, log_every=10**9, checkpoint_every=10**12,
                        seed=seed, read_from=read_from, device=args.device)


def one_trainer(server: str, url: str, manifest, hook: str, source: torch.Tensor, args, work: Path, threads: int):
    torch.set_num_threads(threads)
    runs = {"Flight": [], "read_from": [], "in memory": []}
    for r in range(args.rounds):  # interleaved rounds, medians
        for path, read_from in (("Flight", ""), ("read_from", url)):
            out = work / f"{threads}-{path}-{r}"
            train_from_server(options(hook, out, args.tokens, args, read_from=read_from), server, url, progress=False)
            runs[path].append(last_record(out))
        out = work / f"{threads}-memory-{r}"
        train(options(hook, out, args.tokens, args), TensorBatches(source, hook, args.batch_size), manifest.d_model,
              manifest.stats[hook], progress=False)
        runs["in memory"].append(last_record(out))

    def median(path, key):
        return statistics.median(r[key] for r in runs[path])

    print(f"one trainer ({hook}, d_sae {manifest.d_model * args.expansion}, batch {args.batch_size}, "
          f"{threads} torch thread{'s' if threads > 1 else ''}, median of {args.rounds}):")
    for path in ("Flight", "read_from"):
        a, b = median(path, "tokens_per_s"), median("in memory", "tokens_per_s")
        print(f"  {path:<9} data wait {median(path, 'data_wait_fraction'):6.1%} (in memory "
              f"{median('in memory', 'data_wait_fraction'):6.1%})   tokens/s {a:9,.0f}   in memory {b:9,.0f}   "
              f"ratio {a / b:.2f}")


def concurrent_trainers(server: str, url: str, manifest, args, work: Path):
    count = args.trainers or len(manifest.config.hooks)
    hooks = [manifest.config.hooks[i % len(manifest.config.hooks)] for i in range(count)]  # trainer i's hook

    def from_server(i, read_from):
        train_from_server(options(hooks[i], work / "c-served" / str(i), args.tokens, args, seed=i, read_from=read_from),
                          server, url, progress=False)

    def from_memory(i, acts):
        train(options(hooks[i], work / "c-memory" / str(i), args.tokens, args, seed=i),
              TensorBatches(acts, hooks[i], args.batch_size), manifest.d_model, manifest.stats[hooks[i]], progress=False)

    # every trainer runs at once, however few CPUs Ray sees (it would queue tasks asking for a whole one)
    share = min(1.0, (os.cpu_count() or 1) / count)
    task_served, task_memory = ray.remote(num_cpus=share)(from_server), ray.remote(num_cpus=share)(from_memory)
    data = [ray.put(served_order(server, url, hooks[i], args.tokens, args.batch_size, seed=i)) for i in range(count)]
    ray.get([task_memory.remote(i, data[i]) for i in range(count)])  # warm the workers' imports
    seconds = {"Flight": [], "read_from": [], "in memory": []}
    for _ in range(args.rounds):  # interleaved rounds, medians
        for path, read_from in (("Flight", ""), ("read_from", url)):
            t0 = time.perf_counter()
            ray.get([task_served.remote(i, read_from) for i in range(count)])
            seconds[path].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ray.get([task_memory.remote(i, data[i]) for i in range(count)])
        seconds["in memory"].append(time.perf_counter() - t0)
    memory_s = statistics.median(seconds["in memory"])
    total = args.tokens * count
    for path in ("Flight", "read_from"):
        served_s = statistics.median(seconds[path])
        print(f"{count} concurrent trainers, one server, {path:<9}: {total / served_s:9,.0f} tok/s summed   "
              f"in memory {total / memory_s:9,.0f} tok/s   ratio {memory_s / served_s:.2f}   (median of {args.rounds})")


@torch.no_grad()
def evaluator_cost(manifest, args):
    model = load_model(manifest.config.model)
    tokens = torch.randint(0, manifest.d_vocab, (args.eval_sequences, manifest.config.context_size))
    for hook in (manifest.config.hooks[0], manifest.config.hooks[-1]):
        acts = torch.randn(args.eval_sequences, manifest.config.context_size, manifest.d_model)
        times = {}
        for name, fn in (("start_at_layer", lambda: logits_from(model, tokens, acts, hook)),
                         ("full forward", lambda: model.run_with_hooks(tokens, return_type="logits",
                                                                        fwd_hooks=[(hook, lambda _a, hook: acts)]))):
            fn()
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                fn()
            times[name] = (time.perf_counter() - t0) / args.repeats
        print(f"evaluator {hook}: start_at_layer {times['start_at_layer'] * 1e3:7.1f} ms   full forward "
              f"{times['full forward'] * 1e3:7.1f} ms   ratio {times['start_at_layer'] / times['full forward']:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--cache", help="a local cache (e.g. the demo's)")
    source.add_argument("--gpt2-small", metavar="DIR",
                        help="one GPT-2-small-sized trainer (d_in 768, d_sae 24576, batch 4096) on a synthetic cache in DIR")
    p.add_argument("--tokens", type=int, default=400_000, help="tokens per trainer")
    p.add_argument("--batch-size", type=int, default=None, help="default 2048 (--gpt2-small: 4096)")
    p.add_argument("--expansion", type=int, default=None, help="default 8 (--gpt2-small: 32)")
    p.add_argument("--trainers", type=int, default=0, help="concurrent trainers (default: one per hook)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of each figure, served and in memory interleaved; medians")
    p.add_argument("--eval-sequences", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the SAEs train (cuda: the in-memory reference reads GPU memory)")
    args = p.parse_args()
    if args.tokens < 1 or args.trainers < 0 or args.rounds < 1:
        p.error("--tokens and --rounds must be >= 1, --trainers >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device on this machine")
    args.batch_size = args.batch_size or (4096 if args.gpt2_small else 2048)
    args.expansion = args.expansion or (32 if args.gpt2_small else 8)
    if args.gpt2_small:
        args.cache = gpt2_small_cache(args.gpt2_small)
    manifest = read_manifest(args.cache)
    ensure_ray()
    proc, server = spawn_server(ServeOptions(caches=(args.cache,)))
    print(f"torch threads {torch.get_num_threads()}, cache {args.cache}: {len(manifest.config.hooks)} hooks, d_model {manifest.d_model}")
    try:
        with tempfile.TemporaryDirectory() as work:
            hook = manifest.config.hooks[-1]
            source = served_order(server, args.cache, hook, args.tokens, args.batch_size, seed=0).to(args.device)
            # 1 thread: a demo trainer's (a Ray task of 1 CPU gets OMP_NUM_THREADS=1); and every core
            for threads in sorted({1, torch.get_num_threads()}):
                one_trainer(server, args.cache, manifest, hook, source, args, Path(work), threads)
            if not args.gpt2_small:
                concurrent_trainers(server, args.cache, manifest, args, Path(work))
        if not args.gpt2_small:  # the synthetic cache has no model to evaluate with
            evaluator_cost(manifest, args)
    finally:
        proc.terminate()
        ray.shutdown()


if __name__ == "__main__":
    main()
