"""`actserve eval`: score SAEs on the cache's held-out eval split.

For every SAE and every eval batch of whole sequences, three runs of the model from the SAE's hook:
clean (the cached activations), spliced (the SAE's reconstruction in their place) and zero-ablated.
For a residual-stream hook at layer L only layers >= L run (`start_at_layer`), from the cached
activations; any other hook falls back to a full forward with a replacement hook.

    CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)         1 = perfect, 0 = no better than zeros
    KL score     = (KL_zero - KL_sae) / KL_zero,  KL_x = KL(clean || x), per predicted position

With exclude_bos (default) the BOS position (position 0) keeps its clean activation in every run and
counts in no metric: GPT-2's BOS residual is an outlier many times the others' norm that trainers never see,
and scoring it flatters or ruins the numbers depending on the SAE (seed 000's comments).
Sequences are packed, so there is no padding; a tokenizer's pad token, if distinct, never counts.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from google.protobuf import json_format
from tqdm import tqdm

from actserve.clients.eval_options import EvalOptions
from actserve.clients.frontier import plot_frontier
from actserve.clients.stream import ActivationStream
from actserve.clients.tables import markdown_table
from actserve.sae import SAE, load_sae
from actserve.sae.metrics import StreamingMetrics, plot_log10_feature_density
from actserve.services.build_options import WeightProcessing
from actserve.services.manifest import read_manifest
from actserve.services.model import load_model
from actserve.services.process_memory import keep_freed_heap_memory
from actserve.services.shard_format import decode_activations, in_sequence_order, read_shard
from actserve.services.storage import CacheError, open_url


def splice_layer(hook: str) -> int | None:
    """The block to start from when `hook` is a residual-stream hook, else None."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook)
    return None if m is None else int(m[1]) + (m[2] == "post")


def logits_from(model, tokens: torch.Tensor, acts: torch.Tensor, hook: str) -> torch.Tensor:
    """The model's logits when `hook` carries `acts` [batch, ctx, d_model]."""
    layer = splice_layer(hook)
    if layer is not None:
        return model(acts, start_at_layer=layer, tokens=tokens, return_type="logits")
    return model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook, lambda _act, hook: acts)])


def eval_batches(opts: EvalOptions, manifest, hooks: list[str]):
    """(tokens [n, ctx], {hook: activations [n, ctx, d_model] float32}) over the eval split, whole
    sequences in order: from the server (whole-sequence mode) when one is given, else read from
    the cache directly."""
    ctx, d_model = manifest.config.context_size, manifest.d_model
    budget = opts.max_tokens or manifest.eval.num_tokens
    for tokens, acts in (served_sequences if opts.server else cached_sequences)(opts, manifest, hooks):
        for start in range(0, len(tokens), opts.batch_sequences):
            if budget <= 0:
                return
            sl = slice(start, start + min(opts.batch_sequences, math.ceil(budget / ctx)))
            yield tokens[sl], {h: a[sl].view(-1, ctx, d_model).float() for h, a in acts.items()}
            budget -= tokens[sl].numel()


def cached_sequences(opts: EvalOptions, manifest, hooks: list[str]):
    fs, root = open_url(opts.cache, opts.storage_options)
    ctx, d_model, dtype = manifest.config.context_size, manifest.d_model, manifest.config.dtype
    for shard in manifest.eval.shards:
        table = in_sequence_order(read_shard(fs, root, shard, columns=["token", *hooks]), ctx,
                                  manifest.config.position_major)
        tokens = torch.from_numpy(table.column("token").to_numpy().reshape(-1, ctx).astype(np.int64))
        yield tokens, {h: decode_activations(table.column(h), dtype, d_model).view(-1, ctx, d_model) for h in hooks}


def served_sequences(opts: EvalOptions, manifest, hooks: list[str]):
    ctx = manifest.config.context_size
    stream = ActivationStream(opts.server, cache=opts.cache, split="eval", mode="sequences", hooks=hooks,
                              batch_size=opts.batch_sequences * ctx, drop_bos=False, include_meta=True, dtype=None)
    for batch in stream:
        yield batch["token"].long().view(-1, ctx), {h: batch[h].view(-1, ctx, manifest.d_model) for h in hooks}


class SAEScore:
    """Running sums for one SAE: CE and KL of the three runs, plus reconstruction metrics."""

    def __init__(self, path: str, sae: SAE):
        self.path, self.sae = path, sae
        self.metrics = StreamingMetrics(sae.cfg.d_sae)
        self.sums = dict(ce_clean=0.0, ce_sae=0.0, ce_zero=0.0, kl_sae=0.0, kl_zero=0.0)
        self.positions = 0

    def result(self) -> dict:
        s, n = self.sums, max(self.positions, 1)
        ce = {k: v / n for k, v in s.items()}
        m = self.metrics.compute()
        cfg = self.sae.cfg
        return {
            "sae": self.path, "hook": cfg.hook_name, "layer": splice_layer(cfg.hook_name),
            "architecture": cfg.architecture, "d_sae": cfg.d_sae, "positions": self.positions,
            **ce,
            "ce_recovered": (ce["ce_zero"] - ce["ce_sae"]) / (ce["ce_zero"] - ce["ce_clean"]),
            "kl_score": (ce["kl_zero"] - ce["kl_sae"]) / ce["kl_zero"] if ce["kl_zero"] > 0 else float("nan"),
            **m,
            "alive_fraction": 1 - m["dead_features"] / cfg.d_sae,
        }


def load_saes(paths: tuple[str, ...], manifest, device: str) -> list[SAEScore]:
    scores = []
    for path in paths:
        if not (Path(path) / "cfg.json").exists():
            raise ValueError(f"--sae {path}: not an SAE directory (no cfg.json)")
        sae = load_sae(path, device)
        hook = sae.cfg.hook_name
        if hook not in manifest.config.hooks:
            raise ValueError(f"--sae {path} reads {hook}, which the cache lacks; cached hooks: {', '.join(manifest.config.hooks)}")
        if sae.cfg.d_in != manifest.d_model:
            raise ValueError(f"--sae {path} has d_in {sae.cfg.d_in}, but {hook} has d_model {manifest.d_model}")
        scores.append(SAEScore(path, sae))
    return scores


@torch.inference_mode()
def evaluate(opts: EvalOptions, progress: bool = True, model=None) -> list[dict]:
    manifest = read_manifest(opts.cache, opts.storage_options)
    if manifest is None:
        raise CacheError(f"no cache at {opts.cache}")
    if not manifest.eval.shards:
        raise CacheError(f"{opts.cache} has no eval split: build it with --eval-tokens")
    keep_freed_heap_memory()  # the forwards free and allocate megabytes: 3.6M pages faulted in again a demo eval
    scores = load_saes(opts.saes, manifest, opts.device)
    if model is None:
        processing = json_format.MessageToDict(manifest.config.processing, preserving_proto_field_name=True)
        model = load_model(manifest.config.model, device=opts.device,
                           processing=WeightProcessing(**{k: bool(processing.get(k, False)) for k in WeightProcessing.__dataclass_fields__}))
    pad = model.tokenizer.pad_token_id
    hooks = sorted({s.sae.cfg.hook_name for s in scores})
    total = min(opts.max_tokens or manifest.eval.num_tokens, manifest.eval.num_tokens)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="eval", disable=not progress)
    for tokens, acts in eval_batches(opts, manifest, hooks):
        tokens = tokens.to(opts.device)
        splice = torch.ones_like(tokens, dtype=torch.bool)
        if opts.exclude_bos and manifest.config.prepend_bos:
            splice[:, 0] = False
        # position t predicts token t+1; it counts when t is spliced and the target is not padding
        counted = splice[:, :-1] & ((tokens[:, 1:] != pad) if pad is not None and pad != manifest.bos_token_id else True)
        for hook in hooks:
            x = acts[hook].to(opts.device)
            clean = F.log_softmax(logits_from(model, tokens, x, hook)[:, :-1].float(), -1)
            zero = F.log_softmax(logits_from(model, tokens, torch.where(splice[..., None], 0.0, x), hook)[:, :-1].float(), -1)
            for score in (s for s in scores if s.sae.cfg.hook_name == hook):
                f = score.sae.encode(x)
                x_hat = score.sae.decode(f)
                spliced = F.log_softmax(logits_from(model, tokens, torch.where(splice[..., None], x_hat, x), hook)[:, :-1].float(), -1)
                add_scores(score, tokens, counted, clean, spliced, zero)
                score.metrics.update(x[splice], x_hat[splice], f[splice])
        bar.update(tokens.numel())
    bar.close()
    return write_report(opts, scores)


def add_scores(score: SAEScore, tokens, counted, clean, spliced, zero) -> None:
    target = tokens[:, 1:, None]
    nll = {name: -lp.gather(-1, target)[..., 0][counted].sum().item()
           for name, lp in (("ce_clean", clean), ("ce_sae", spliced), ("ce_zero", zero))}
    p_clean = clean.exp()
    for name, lp in (("kl_sae", spliced), ("kl_zero", zero)):
        score.sums[name] += (p_clean * (clean - lp)).sum(-1)[counted].sum().item()
    for name, v in nll.items():
        score.sums[name] += v
    score.positions += int(counted.sum())


TABLE_COLUMNS = [  # (header, result key, format): the seed's table, plus CE recovered and KL
    ("SAE", "name", "{}"), ("layer", "layer", "{}"), ("variance explained", "explained_variance", "{:.2%}"),
    ("L1", "l1", "{:.2f}"), ("L0", "l0", "{:.2f}"), ("% alive", "alive_fraction", "{:.1%}"),
    ("dead", "dead_features", "{:.0f}"), ("dense (>1%)", "dense_features", "{:.0f}"),
    ("median log10 density", "median_log10_density", "{:.2f}"),
    ("CE with reconstruction", "ce_sae", "{:.3f}"), ("clean CE", "ce_clean", "{:.3f}"),
    ("zero-ablation CE", "ce_zero", "{:.3f}"), ("CE recovered", "ce_recovered", "{:.3f}"),
    ("KL", "kl_sae", "{:.4f}"), ("KL score", "kl_score", "{:.3f}"),
]


def eval_table(results: list[dict]) -> str:
    return markdown_table(results, TABLE_COLUMNS)


def write_report(opts: EvalOptions, scores: list[SAEScore]) -> list[dict]:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for score in scores:
        r = score.result()
        r["name"] = Path(score.path).name
        png = out / f"density-{r['name']}.png"
        plot_log10_feature_density(score.metrics.log10_feature_density(), png, title=f"{r['name']} ({r['hook']})")
        r["density_png"] = str(png)
        results.append(r)
    (out / "eval.json").write_text(json.dumps({"cache": opts.cache, "exclude_bos": opts.exclude_bos, "results": results}, indent=1))
    (out / "eval.md").write_text(eval_table(results))
    plot_frontier(results, out / "frontier.png")  # with two or more SAEs
    return results
