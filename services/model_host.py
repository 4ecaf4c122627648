"""ModelHost: a Ray actor that holds one HookedTransformer and turns token sequences into shards.

Every requested hook comes from ONE forward pass (`run_with_cache` with a names filter, stopped
after the last block any hook needs), activations are cast to the cache dtype on the device, and
the actor writes the finished shard straight to storage: only the shard's metadata and statistics
travel back to the builder.
"""
from __future__ import annotations

import numpy as np
import torch

from actserve.services.shard_format import DTYPES, write_shard
from actserve.services.storage import open_url
from actserve.services.model import WeightProcessing, layers_needed, load_model, resolve_hooks


class ModelHost:
    def __init__(self, model: str, processing: WeightProcessing, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model, device=self.device, processing=processing)
        self.model.eval()

    def describe(self) -> dict:
        cfg, tok = self.model.cfg, self.model.tokenizer
        return {
            "d_model": cfg.d_model,
            "n_ctx": cfg.n_ctx,
            "d_vocab": cfg.d_vocab,
            "n_layers": cfg.n_layers,
            "bos_token_id": tok.bos_token_id,
            "tokenizer": tok.name_or_path,
            "device": self.device,
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
        self, tokens: np.ndarray, hooks: list[str], dtype: str, batch_sequences: int, skip_bos: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
        """Activations {hook: [n_seq * ctx, d_model] CPU tensor of dtype} and per-hook float64
        sums (vector sum, norm sum, squared-norm sum, count), position 0 left out when skip_bos."""
        n_seq, ctx = tokens.shape
        d_model = self.model.cfg.d_model
        out = {h: torch.empty((n_seq * ctx, d_model), dtype=DTYPES[dtype]) for h in hooks}
        sums = {h: [torch.zeros(d_model, dtype=torch.float64, device=self.device), 0.0, 0.0, 0] for h in hooks}
        stop = layers_needed(hooks, self.model.cfg.n_layers)
        all_tokens = torch.from_numpy(tokens)
        for start in range(0, n_seq, batch_sequences):
            batch = all_tokens[start:start + batch_sequences].to(self.device)
            _, cache = self.model.run_with_cache(batch, names_filter=hooks, stop_at_layer=stop)
            rows = slice(start * ctx, start * ctx + batch.numel())
            for h in hooks:
                acts = cache[h]  # [batch, ctx, d_model] float32, on device
                body = (acts[:, 1:] if skip_bos else acts).reshape(-1, d_model)
                norms = body.norm(dim=-1).double()
                s = sums[h]
                s[0] += body.sum(0, dtype=torch.float64)
                s[1] += norms.sum().item()
                s[2] += norms.square().sum().item()
                s[3] += body.shape[0]
                out[h][rows].copy_(acts.reshape(-1, d_model).to(DTYPES[dtype]))  # cast on device
        return out, {h: (s[0].cpu().numpy(), s[1], s[2], s[3]) for h, s in sums.items()}

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
    ) -> dict:
        """Compute and write one shard (not yet committed: the builder lists it in the manifest)."""
        acts, sums = self.activations(tokens, hooks, dtype, batch_sequences, skip_bos)
        fs, root = open_url(url, storage_options)
        written = write_shard(fs, f"{root}/{path}", tokens, first_sequence, acts, hooks, dtype)
        return {"path": path, "num_rows": tokens.size, "num_bytes": written.size, "sha256": written.sha256,
                "first_sequence": first_sequence, "num_sequences": len(tokens), "sums": sums}
