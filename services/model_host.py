"""ModelHost: a Ray actor that holds one HookedTransformer and turns token sequences into shards.

Every requested hook comes from ONE forward pass (`run_with_cache` with a names filter, stopped
after the last block any hook needs), activations are cast to the cache dtype on the device, and
the actor writes the finished shard straight to storage: only the shard's metadata and statistics
travel back to the builder.

The actor takes 1 + `writers` `write_shard` calls at once: a lock lets one run its forward while
the others encode, hash and write the shards before it, so the model never waits for storage
while the writers keep up. One writer thread does ~0.5 GB/s (Parquet encode, sha256, fsync), and
the writes release the GIL, so writers add up (two did 0.9 GB/s on 2 cores), up to a point (on an
H100 host, 8 did no better than 4: ~1.2 GB/s of shards). The host hands the GIL over every
GIL_SWITCH_INTERVAL, not Python's 5 ms, so that a forward holding it does not starve the writers
between their calls. Per-hook statistics accumulate on the device and are read once per shard.
The host keeps glibc's freed heap memory (`keep_freed_heap_memory`): a CPU forward frees and
allocates megabytes per layer, and glibc's defaults gave them back to the kernel and faulted them
in again, which cost the tiny model's forward 30-50% of its speed.
"""
from __future__ import annotations

import sys
import threading

import numpy as np
import torch

from actserve.services.build_options import WeightProcessing
from actserve.services.model import layers_needed, load_model, resolve_hooks
from actserve.services.process_memory import keep_freed_heap_memory
from actserve.services.shard_format import DTYPES, write_shard
from actserve.services.storage import open_url


# A thread asking for the GIL waits until its holder has run this long. A GPU forward holds the GIL
# between kernel launches almost without a pause, and a writer takes it back after every call that
# releases it (a dozen or more a shard): at Python's default of 5 ms, a shard write beside a thread
# running Python stored 0.40 GB/s, at 0.5 ms 0.70 GB/s, while the Python thread kept 0.97 / 0.96 of
# its speed (bench/cache_build.py prints the write beside such a thread).
GIL_SWITCH_INTERVAL = 0.0005  # seconds


class ModelHost:
    def __init__(self, model: str, processing: WeightProcessing, device: str | None = None,
                 cpu_threads: int | None = None, writers: int = 1):
        """`cpu_threads`: torch's thread count for this process when the forward runs on the CPU
        (the actor owns its process): the builder gives every core of the host's share, as torch's
        default would; the writer's work, ~5% of a shard's forward, shares those cores. None
        leaves the count as it is. `writers`: shards written at once beside the forward; the
        actor's max_concurrency must be 1 + writers."""
        keep_freed_heap_memory()  # the actor owns its process
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.model = load_model(model, device=str(self.device), processing=processing)
        self.model.eval()
        self.loaded = (model, processing)  # what a build on this host checks it is for
        self.writers = writers
        self.forward_lock = threading.Lock()

    def describe(self) -> dict:
        cfg, tok = self.model.cfg, self.model.tokenizer
        return {
            "d_model": cfg.d_model,
            "n_ctx": cfg.n_ctx,
            "d_vocab": cfg.d_vocab,
            "n_layers": cfg.n_layers,
            "bos_token_id": tok.bos_token_id,
            "tokenizer": tok.name_or_path,
            "device": str(self.device),
            "loaded": self.loaded,
            "shards_at_once": 1 + self.writers,  # what the builder keeps in flight on this host
        }

    def tokenizer(self):
        return self.model.tokenizer

    @torch.inference_mode()
    def resolve_hooks(self, spec: str) -> list[str]:
        """The hooks `spec` names, each checked to give one d_model-wide vector per token (the
        cache's layout): attention patterns, per-head and d_mlp-wide hooks are refused."""
        hooks = resolve_hooks(self.model, spec)
        probe = torch.zeros((1, 2), dtype=torch.long, device=self.device)
        _, cache = self.model.run_with_cache(probe, names_filter=hooks,
                                             stop_at_layer=layers_needed(hooks, self.model.cfg.n_layers))
        d_model = self.model.cfg.d_model
        wrong = [f"{h} {list(cache[h].shape[2:])}" for h in hooks if tuple(cache[h].shape[2:]) != (d_model,)]
        if wrong:
            raise ValueError(f"the cache holds one d_model={d_model} vector per token per hook; these hooks give "
                             f"other shapes per token: {', '.join(wrong)}")
        return hooks

    @torch.inference_mode()
    def activations(
        self, tokens: np.ndarray, hooks: list[str], dtype: str, batch_sequences: int, skip_bos: bool,
        position_major: bool,
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
        """Activations {hook: [n_seq * ctx, d_model] CPU tensor of dtype} in the shard's row order
        (position-major if asked: row p * n_seq + s is position p of sequence s), and per-hook
        float64 sums (vector sum, norm sum, squared-norm sum, count), position 0 left out when
        skip_bos.

        Each batch is cast and copied into its place in the shard's layout in one pass on the
        device (on a GPU, half the bytes then cross the bus for 16-bit dtypes, in one asynchronous
        copy per hook into pinned host memory; the one synchronisation is at the end of the
        shard), so the writer never reorders rows."""
        n_seq, ctx = tokens.shape
        d_model = self.model.cfg.d_model
        cuda = self.device.type == "cuda"
        out_dtype = DTYPES[dtype]
        layout = (ctx, n_seq, d_model) if position_major else (n_seq, ctx, d_model)
        staged = {h: torch.empty(layout, dtype=out_dtype, device=self.device) for h in hooks}
        vector_sums = torch.zeros((len(hooks), d_model), dtype=torch.float64, device=self.device)
        norm_sums = torch.zeros((len(hooks), 2), dtype=torch.float64, device=self.device)  # sum |x|, sum |x|^2
        stop = layers_needed(hooks, self.model.cfg.n_layers)
        first = 1 if skip_bos else 0
        all_tokens = torch.from_numpy(tokens)
        for start in range(0, n_seq, batch_sequences):
            batch = all_tokens[start:start + batch_sequences].to(self.device)
            end = start + len(batch)
            _, cache = self.model.run_with_cache(batch, names_filter=hooks, stop_at_layer=stop)
            for i, h in enumerate(hooks):
                acts = cache[h]  # [batch, ctx, d_model] float32, on device
                # reduce over the batch first (contiguous), then drop position 0: slicing it off
                # first gave a strided view whose reductions took 3x as long (1.4 ms against 0.45
                # for the tiny model's 4 hooks, against a ~60 ms forward of 32 sequences on 2 cores)
                norms = torch.linalg.vector_norm(acts, dim=-1)[:, first:]
                vector_sums[i] += acts.sum(0)[first:].sum(0, dtype=torch.float64)
                norm_sums[i, 0] += norms.sum(dtype=torch.float64)
                norm_sums[i, 1] += norms.square().sum(dtype=torch.float64)
                if position_major:
                    staged[h][:, start:end].copy_(acts.transpose(0, 1))
                else:
                    staged[h][start:end].copy_(acts)
        if cuda:
            out = {h: torch.empty(layout, dtype=out_dtype, pin_memory=True).copy_(staged[h], non_blocking=True)
                   for h in hooks}
        else:
            out = staged
        vector_sums, norm_sums = vector_sums.cpu().numpy(), norm_sums.cpu().numpy()  # waits for the copies too
        count = n_seq * (ctx - 1 if skip_bos else ctx)
        return ({h: out[h].view(-1, d_model) for h in hooks},
                {h: (vector_sums[i], float(norm_sums[i, 0]), float(norm_sums[i, 1]), count) for i, h in enumerate(hooks)})

    def write_shard(
        self,
        url: str,
        storage_options: dict,
        path: str,
        tokens: np.ndarray,
        first_sequence: int,
        hooks: list[str],
        dtype: str,
        batch_sequences: int,
        skip_bos: bool,
        group_rows: int,
        position_major: bool,
    ) -> dict:
        """Compute and write one shard (not yet committed: the builder lists it in the manifest).
        The forward holds the lock; the write runs outside it, beside the next call's forward."""
        with self.forward_lock:
            acts, sums = self.activations(tokens, hooks, dtype, batch_sequences, skip_bos, position_major)
        fs, root = open_url(url, storage_options)
        written = write_shard(fs, f"{root}/{path}", tokens, first_sequence, acts, hooks, dtype, group_rows, position_major)
        return {"path": path, "num_rows": tokens.size, "num_bytes": written.size, "sha256": written.sha256,
                "first_sequence": first_sequence, "num_sequences": len(tokens), "sums": sums}
