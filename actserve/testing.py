"""Test and benchmark helpers, kept out of the service.

* Synthetic activation caches: random activations written through the real shard encoder and
  manifest writer, so readers see exactly what `cache build` produces, in seconds and without a
  model. A cache can be committed shard by shard, as a running build does.
* `spawn_server`: a real `actserve serve` process, for notebooks, tests and benchmarks.
* `TensorBatches`: batches from tensors in memory, with a stream's resume interface: the
  reference that the server's data-wait figures are measured against.

Shard k of a split holds sequences first_sequence.. of context_size tokens (BOS first); sequence
ids run over the eval split first, then train, as in services/build.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from actserve.proto.manifest_pb2 import BuildConfig, Manifest, Shard
from actserve.services.shard_format import (DTYPES, decode_activations, in_row_order, in_sequence_order, read_shard,
                                            shard_group_rows, shard_path, write_shard)
from actserve.services.manifest import FORMAT_VERSION, add_stats, write_manifest
from actserve.services.serve_options import ServeOptions
from actserve.services.storage import open_url

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
    position_major: bool = True  # False: shards in sequence order, as caches built before it was added


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
            position_major=spec.position_major,
        )
        self.manifest = Manifest(format_version=FORMAT_VERSION, config=config, d_model=spec.d_model,
                                 n_ctx=spec.context_size, d_vocab=spec.d_vocab, bos_token_id=BOS,
                                 tokenizer="synthetic", created_by="actserve synthetic")
        self.manifest.train.planned_shards = spec.train_shards
        self.manifest.eval.planned_shards = spec.eval_shards
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
            in_rows = {h: in_row_order(v, s.sequences_per_shard, s.position_major) for h, v in acts.items()}
            written = write_shard(self.fs, f"{self.root}/{path}", tokens, first, in_rows, list(s.hooks), s.dtype,
                                  shard_group_rows(self.manifest.config, s.d_model), s.position_major)
            target.shards.append(Shard(path=path, num_rows=rows, num_bytes=written.size, sha256=written.sha256,
                                       first_sequence=first,
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
            add_stats(self.manifest.stats[hook], (x.sum(0), norms.sum(), (norms ** 2).sum(), len(x)))

    def finish(self) -> Manifest:
        self.commit("eval", self.spec.eval_shards)
        self.commit("train", self.spec.train_shards)
        self.manifest.complete = True
        write_manifest(self.fs, self.root, self.manifest)
        return self.manifest


def write_synthetic_cache(url: str, spec: SyntheticSpec = SyntheticSpec(), storage_options: dict | None = None) -> Manifest:
    return SyntheticCache(url, spec, storage_options).finish()


def flip_byte(url: str, shard: Shard) -> None:
    """Flip one byte in the middle of a local shard's file: inside an activation data page (the
    activation columns are nearly all of a shard's bytes), as a failing disk or copy would."""
    fs, root = open_url(url)
    path = f"{root}/{shard.path}"
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    with open(path, "r+b") as f:  # in place: same size, so only a checksum can tell
        f.write(data)


def read_split(url: str, manifest: Manifest, split: str, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """Every row of a split, in shard order, as numpy arrays by column (activations as raw bytes
    [rows, d_model * bytes per value]). Row (sequence - first sequence of the split) * context_size
    + position holds that token."""
    fs, root = open_url(url, storage_options)
    config = manifest.config
    tables = [in_sequence_order(read_shard(fs, root, shard), config.context_size, config.position_major)
              for shard in getattr(manifest, split).shards]
    out = {}
    for name in tables[0].schema.names:
        chunks = [t.column(name).combine_chunks() for t in tables]
        if name in manifest.config.hooks:
            out[name] = np.concatenate([
                decode_activations(c, manifest.config.dtype, manifest.d_model).view(torch.uint8).numpy() for c in chunks])
        else:
            out[name] = np.concatenate([c.to_numpy() for c in chunks])
    return out


def spawn_server(options: ServeOptions) -> tuple[subprocess.Popen, str]:
    """`serve(options)` in a new Python process (servers=1); returns it and its location once it
    listens. The process is the caller's to stop."""
    code = ("import json, sys; from actserve.services.serve_options import ServeOptions; "
            "from actserve.services.run_server import serve; serve(ServeOptions(**json.loads(sys.argv[1])))")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(asdict(options))], stdout=subprocess.PIPE, text=True)
    location = proc.stdout.readline().strip()
    if not location:
        raise RuntimeError(f"the server process exited with code {proc.wait()} before listening (its stderr says why)")
    return proc, location


class TensorBatches:
    """Batches from tensors already in memory, with the same resume interface as ActivationStream
    (the reference the data-wait benchmark compares the server against)."""

    def __init__(self, activations: torch.Tensor, hook: str, batch_size: int):
        self.activations, self.hook, self.batch_size, self.position = activations, hook, batch_size, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:  # endless, like a stream with epochs=None
            start = self.position % len(self.activations)
            self.position += self.batch_size
            yield {self.hook: self.activations[start:start + self.batch_size]}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
