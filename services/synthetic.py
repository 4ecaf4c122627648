"""Synthetic activation caches, for tests and benchmarks: random activations written through the
real shard encoder and manifest writer, so readers see exactly what `cache build` produces, in
seconds and without a model. A cache can be committed shard by shard, as a running build does.

Shard k of a split holds sequences first_sequence.. of context_size tokens (BOS first); sequence
ids run over the eval split first, then train, as in services/build.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from proto.manifest_pb2 import BuildConfig, HookStats, Manifest, Shard
from services.cache import (
    DTYPES, FORMAT_VERSION, decode_activations, open_url, read_shard, shard_path, write_manifest, write_shard,
)

BOS = 0


@dataclass(frozen=True)
class SyntheticSpec:
    hooks: tuple[str, ...] = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre")
    d_model: int = 16
    context_size: int = 8
    sequences_per_shard: int = 16
    train_shards: int = 6
    eval_shards: int = 2
    dtype: str = "float16"
    seed: int = 0
    d_vocab: int = 1000


class SyntheticCache:
    """A cache at `url` whose shards are committed on demand: `commit(split, n)`, then `finish()`."""

    def __init__(self, url: str, spec: SyntheticSpec, storage_options: dict | None = None):
        self.url, self.spec = url, spec
        self.fs, self.root = open_url(url, storage_options)
        self.fs.makedirs(self.root, exist_ok=True)
        config = BuildConfig(
            model="synthetic", dataset="synthetic", context_size=spec.context_size, prepend_bos=True,
            hooks=list(spec.hooks), dtype=spec.dtype, sequences_per_shard=spec.sequences_per_shard,
            train_tokens=spec.train_shards * spec.sequences_per_shard * spec.context_size,
            eval_tokens=spec.eval_shards * spec.sequences_per_shard * spec.context_size,
        )
        self.manifest = Manifest(format_version=FORMAT_VERSION, config=config, d_model=spec.d_model,
                                 n_ctx=spec.context_size, d_vocab=spec.d_vocab, bos_token_id=BOS,
                                 tokenizer="synthetic", created_by="actserve synthetic")
        self.manifest.train.planned_shards = spec.train_shards
        self.manifest.eval.planned_shards = spec.eval_shards
        self.sums = {h: [np.zeros(spec.d_model), 0.0, 0.0, 0] for h in spec.hooks}
        write_manifest(self.fs, self.root, self.manifest)

    def commit(self, split: str, count: int = 1) -> None:
        s = self.spec
        target = getattr(self.manifest, split)
        for _ in range(count):
            index = len(target.shards)
            if index == target.planned_shards:
                return
            first = (s.eval_shards if split == "train" else 0) * s.sequences_per_shard + index * s.sequences_per_shard
            rng = np.random.default_rng([s.seed, first])
            tokens = rng.integers(1, s.d_vocab, size=(s.sequences_per_shard, s.context_size), dtype=np.int32)
            tokens[:, 0] = BOS
            rows = tokens.size
            acts = {h: torch.from_numpy(rng.standard_normal((rows, s.d_model), dtype=np.float32)).to(DTYPES[s.dtype])
                    for h in s.hooks}
            path = shard_path(split, index)
            num_bytes = write_shard(self.fs, f"{self.root}/{path}", tokens, first, acts, list(s.hooks), s.dtype)
            target.shards.append(Shard(path=path, num_rows=rows, num_bytes=num_bytes, first_sequence=first,
                                       num_sequences=s.sequences_per_shard))
            target.num_tokens += rows
            if split == "train":
                self.add_stats(acts)
            write_manifest(self.fs, self.root, self.manifest)

    def add_stats(self, acts: dict[str, torch.Tensor]) -> None:
        keep = np.arange(len(next(iter(acts.values())))) % self.spec.context_size != 0  # not BOS
        for hook, values in acts.items():
            x = values.double().numpy()[keep]
            norms = np.linalg.norm(x, axis=1)
            sums = self.sums[hook]
            sums[0] += x.sum(0)
            sums[1] += norms.sum()
            sums[2] += (norms ** 2).sum()
            sums[3] += len(x)
            n = sums[3]
            self.manifest.stats[hook].CopyFrom(HookStats(count=n, mean=(sums[0] / n).tolist(),
                                                         mean_norm=sums[1] / n, mean_sq_norm=sums[2] / n))

    def finish(self) -> Manifest:
        self.commit("eval", self.spec.eval_shards)
        self.commit("train", self.spec.train_shards)
        self.manifest.complete = True
        write_manifest(self.fs, self.root, self.manifest)
        return self.manifest


def write_synthetic_cache(url: str, spec: SyntheticSpec = SyntheticSpec(), storage_options: dict | None = None) -> Manifest:
    return SyntheticCache(url, spec, storage_options).finish()


def read_split(url: str, manifest: Manifest, split: str, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """Every row of a split, in shard order, as numpy arrays by column (activations as raw bytes
    [rows, d_model * bytes per value]). Row (sequence - first sequence of the split) * context_size
    + position holds that token."""
    fs, root = open_url(url, storage_options)
    tables = [read_shard(fs, root, shard) for shard in getattr(manifest, split).shards]
    out = {}
    for name in tables[0].schema.names:
        chunks = [t.column(name).combine_chunks() for t in tables]
        if name in manifest.config.hooks:
            out[name] = np.concatenate([
                decode_activations(c, manifest.config.dtype, manifest.d_model).view(torch.uint8).numpy() for c in chunks])
        else:
            out[name] = np.concatenate([c.to_numpy() for c in chunks])
    return out
