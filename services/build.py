"""`actserve cache build`: tokens -> ModelHost actors -> Parquet shards -> committed manifest.

The driver tokenizes, hands each shard's sequences to a ModelHost actor (round robin, 1 + writers
in flight per actor: one in its forward while the others are written), and commits finished
shards strictly in order: after shard k is written, the manifest listing shards 0..k replaces the
old one in one write.
The split of the token stream into shards is a pure function of the config, so a rerun after a
crash skips the committed prefix and produces byte-identical shards.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict
from itertools import islice

import numpy as np
import ray
from tqdm import tqdm

from actserve import __version__
from actserve.proto.manifest_pb2 import BuildConfig, Manifest, Shard
from actserve.proto.manifest_pb2 import WeightProcessing as WeightProcessingMsg
from actserve.services.build_options import BuildOptions
from actserve.services.data import DatasetError, DatasetSpec, iter_documents, iter_sequences
from actserve.services.manifest import (
    FORMAT_VERSION, SPLITS, add_stats, config_differences, read_manifest, write_manifest,
)
from actserve.services.model_host import ModelHost
from actserve.services.ray_runtime import ensure_ray
from actserve.services.shard_format import DTYPES, shard_group_rows, shard_path
from actserve.services.storage import CacheError, check_writable, open_url, remove_temporaries


# A GPU's forward of GPT-2 small yields activations far faster than one writer thread stores them
# (~0.5 GB/s: 12 hooks at float16 are 18 KB a token, so ~27k tokens/s); on a CPU host the forward
# is the slow part and takes the cores, so one writer keeps up. On an H100 host 4 writers doubled
# one writer's build and 8 did no better than 4.
GPU_WRITERS = 4


def model_reference(model: str) -> str:
    """What the manifest records as the model: a local directory as an absolute path (so `eval`
    run from anywhere finds it), a TransformerLens name as given."""
    return os.path.abspath(model) if os.path.isdir(model) else model


def start_model_hosts(opts: BuildOptions) -> list:
    # The driver may run on a CPU-only head node: ask the cluster, not this process, for GPUs.
    gpu = opts.device == "cuda" or (opts.device is None and ray.cluster_resources().get("GPU", 0) > 0)
    cpus = 1 if gpu else max(1, (os.cpu_count() or 1) // opts.actors)
    resources = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": cpus}
    writers = opts.writers or (GPU_WRITERS if gpu else 1)
    actor_class = ray.remote(max_concurrency=1 + writers, **resources)(ModelHost)
    threads = None if gpu else cpus
    return [actor_class.remote(opts.model, opts.processing, opts.device, threads, writers) for _ in range(opts.actors)]


def sequences_per_shard(opts: BuildOptions, n_hooks: int, d_model: int) -> int:
    row_bytes = n_hooks * d_model * DTYPES[opts.dtype].itemsize
    return max(1, int(opts.shard_mb * 2**20) // (row_bytes * opts.context_size))


def build_cache(opts: BuildOptions, progress: bool = True, ray_address: str | None = None,
                hosts: list | None = None) -> Manifest:
    """Build (or resume) the cache described by `opts`; returns the final manifest. `hosts`: model
    hosts already started for opts' model (start_model_hosts), left running, so that several
    builds pay one start (a fresh host imports torch and TransformerLens and loads the model:
    seconds); by default they are started here and killed at the end."""
    fs, root = open_url(opts.out, opts.storage_options)
    existing = read_manifest(opts.out, opts.storage_options)
    if existing is None:
        check_writable(fs, root, opts.out)
    else:  # resuming: what a killed build left half-written goes
        remove_temporaries(fs, root)

    ensure_ray(ray_address)
    started = hosts is None
    hosts = start_model_hosts(opts) if started else hosts
    try:
        info = ray.get(hosts[0].describe.remote())
        if info["loaded"] != (opts.model, opts.processing):
            raise ValueError(f"the model hosts given hold {info['loaded'][0]} ({info['loaded'][1]}); this build is for "
                             f"{opts.model} ({opts.processing})")
        if opts.context_size > info["n_ctx"]:
            raise ValueError(f"--context-size {opts.context_size} exceeds the model's n_ctx {info['n_ctx']}")
        hooks = ray.get(hosts[0].resolve_hooks.remote(opts.hooks))
        config = BuildConfig(
            model=model_reference(opts.model), dataset=opts.dataset, dataset_split=opts.dataset_split,
            text_column=opts.text_column, token_column=opts.token_column,
            context_size=opts.context_size, prepend_bos=opts.prepend_bos, hooks=hooks, dtype=opts.dtype,
            train_tokens=opts.tokens, eval_tokens=opts.eval_tokens,
            sequences_per_shard=sequences_per_shard(opts, len(hooks), info["d_model"]),
            batch_sequences=opts.batch_sequences,
            processing=WeightProcessingMsg(**asdict(opts.processing)),
            # a build resumed into a cache started before position-major shards keeps its layout
            position_major=existing is None or existing.config.position_major,
        )
        if existing is not None:
            diffs = config_differences(existing.config, config)
            if diffs:
                raise CacheError(
                    f"{opts.out} already holds a cache built with a different config ({'; '.join(diffs)}); "
                    "choose another --out or delete it"
                )
            if existing.complete:
                return existing
        manifest = existing or new_manifest(config, info)
        tokenizer = ray.get(hosts[0].tokenizer.remote())
        run_build(opts, manifest, hosts, tokenizer, info, progress)
        return manifest
    finally:
        for host in hosts if started else []:
            ray.kill(host)


def new_manifest(config: BuildConfig, info: dict) -> Manifest:
    spsh = config.sequences_per_shard
    manifest = Manifest(
        format_version=FORMAT_VERSION, config=config, d_model=info["d_model"], n_ctx=info["n_ctx"],
        d_vocab=info["d_vocab"], bos_token_id=info["bos_token_id"], tokenizer=info["tokenizer"],
        created_by=f"actserve {__version__}",
    )
    for split, tokens in (("eval", config.eval_tokens), ("train", config.train_tokens)):
        getattr(manifest, split).planned_shards = math.ceil(math.ceil(tokens / config.context_size) / spsh)
    return manifest


def shard_tasks(manifest: Manifest, sequences):
    """(split, shard index, first sequence id, tokens [n, ctx]) for every shard not yet committed.

    Eval shards come first (the held-out split is small), then train; global sequence ids run on
    across both, so the splits never share a sequence."""
    cfg = manifest.config
    spsh = cfg.sequences_per_shard
    next_id = 0
    for split in ("eval", "train"):
        wanted = math.ceil(getattr(cfg, f"{split}_tokens") / cfg.context_size)
        s = getattr(manifest, split)
        done = sum(sh.num_sequences for sh in s.shards)
        if done:  # committed already: skip its sequences in the deterministic stream
            for _ in islice(sequences, done):
                pass
        next_id += done
        for index in range(len(s.shards), s.planned_shards):
            n = min(spsh, wanted - index * spsh)
            rows = list(islice(sequences, n))
            if not rows:
                return
            yield split, index, next_id, np.stack(rows)
            next_id += len(rows)
            if len(rows) < n:
                return


def run_build(opts: BuildOptions, manifest: Manifest, hosts: list, tokenizer, info: dict, progress: bool) -> None:
    cfg = manifest.config
    fs, root = open_url(opts.out, opts.storage_options)
    spec = DatasetSpec(opts.dataset, opts.dataset_split, opts.text_column, opts.token_column)
    sequences = iter_sequences(iter_documents(spec, tokenizer), cfg.context_size, info["bos_token_id"], cfg.prepend_bos)

    total = sum(math.ceil(t / cfg.context_size) for t in (cfg.train_tokens, cfg.eval_tokens)) * cfg.context_size
    done_tokens = manifest.train.num_tokens + manifest.eval.num_tokens
    bar = tqdm(total=total, initial=done_tokens, unit="tok", unit_scale=True, desc="cache build",
               disable=not progress, smoothing=0.1)

    in_flight: dict = {}  # ObjectRef -> (task order, split, shard path)
    finished: dict[int, dict] = {}
    next_commit = 0
    tasks = enumerate(shard_tasks(manifest, sequences))
    max_in_flight = info["shards_at_once"] * len(hosts)
    exhausted = False
    while True:
        while not exhausted and len(in_flight) < max_in_flight:
            try:
                order, (split, index, first_id, tokens) = next(tasks)
            except StopIteration:
                exhausted = True
                break
            host = hosts[order % len(hosts)]
            path = shard_path(split, index)
            ref = host.write_shard.remote(
                opts.out, opts.storage_options, path, tokens, first_id,
                list(cfg.hooks), cfg.dtype, cfg.batch_sequences, cfg.prepend_bos,
                shard_group_rows(cfg, manifest.d_model), cfg.position_major,
            )
            in_flight[ref] = (order, split, path)
        if not in_flight:
            break
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            order, split, path = in_flight.pop(ref)
            finished[order] = (split, shard_result(ref, path, opts.out))
        while next_commit in finished:  # commit strictly in order
            split, result = finished.pop(next_commit)
            commit_shard(fs, root, manifest, split, result)
            bar.update(result["num_rows"])
            next_commit += 1
    bar.close()

    for split in SPLITS:
        s = getattr(manifest, split)
        if len(s.shards) < s.planned_shards:  # the dataset ran out before the requested tokens
            if split == "eval" and not s.shards and cfg.eval_tokens:
                raise DatasetError(f"dataset {opts.dataset!r} ran out before the eval split was filled")
            warnings.warn(f"dataset ran out: the {split} split holds {s.num_tokens:,} tokens, fewer than requested")
            s.planned_shards = len(s.shards)
    manifest.complete = True
    write_manifest(fs, root, manifest)


def shard_result(ref, path: str, url: str) -> dict:
    """A finished write_shard call's result. An error raised by the host arrives as itself (Ray
    wraps it as the same type); a host process that died (killed, out of memory) becomes one
    CacheError naming the shard. Either way nothing uncommitted is in the manifest."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as e:
        raise CacheError(
            f"the model host writing {path} of {url} died before finishing it ({type(e).__name__}); "
            "the shards committed before it are kept: rerun the same command to resume"
        ) from e


def commit_shard(fs, root: str, manifest: Manifest, split: str, result: dict) -> None:
    s = getattr(manifest, split)
    s.shards.append(Shard(
        path=result["path"], num_rows=result["num_rows"], num_bytes=result["num_bytes"],
        sha256=result["sha256"], first_sequence=result["first_sequence"], num_sequences=result["num_sequences"],
    ))
    s.num_tokens += result["num_rows"]
    if split == "train":
        for hook, sums in result["sums"].items():
            add_stats(manifest.stats[hook], sums)
    write_manifest(fs, root, manifest)
