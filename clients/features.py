"""`actserve features`: what each SAE feature fires on, from the cache's eval split, in one pass.

For every SAE, the eval split's whole sequences (from the cache's shards, or from a server) are
encoded batch by batch, and a fixed-size state per feature is updated (`FeatureStats`), so memory
does not grow with the number of tokens:

* firing count, sum and maximum of its activations;
* a histogram of its non-zero activations over fixed log-spaced bins (`HIST_EDGES`);
* its top-K activations: K slots per feature, in no order until they are written out; an
  activation of a batch that beats the smallest of its feature's slots takes that slot, with the
  token window around it (LEFT tokens before, RIGHT after, within the sequence) and the feature's
  activation on every token of the window.

With exclude_bos (default) the BOS position counts nowhere, as in the evaluator: its residual is an
outlier that trainers never see. The model is not run: the activations are the cache's. It is
loaded only for its tokenizer and, for residual-stream hooks, its unembedding (the logit lens,
`logit_lens`).

The results go to `--out` (see `write_outputs`): Parquet files other tools read and a static HTML
browser (`feature_page.py`). Everything is written to a temporary directory beside `--out` and
renamed into place at the end.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from google.protobuf import json_format
from tqdm import tqdm

from actserve.clients.eval_options import FeatureOptions
from actserve.clients.evaluator import eval_batches, load_saes, splice_layer
from actserve.clients.feature_page import write_browser, write_sae_index
from actserve.sae import SAE
from actserve.sae.metrics import DENSE_THRESHOLD
from actserve.services.manifest import read_manifest
from actserve.services.build_options import WeightProcessing
from actserve.services.model import load_model
from actserve.services.storage import CacheError

# Non-zero activations are binned by log10(activation): HIST_PER_DECADE bins per decade from
# 10**HIST_LOG10_MIN to 10**HIST_LOG10_MAX, plus one bin below and one above that range.
HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_PER_DECADE = -4, 4, 8
HIST_EDGES = np.logspace(HIST_LOG10_MIN, HIST_LOG10_MAX, (HIST_LOG10_MAX - HIST_LOG10_MIN) * HIST_PER_DECADE + 1)
HIST_BINS = len(HIST_EDGES) + 1  # underflow, the len(HIST_EDGES) - 1 bins between edges, overflow


class FeatureStats:
    """The one-pass state of one SAE's features; every tensor has a fixed shape [d_sae, ...].

    Examples are identified by their token's index in the stream (sequence ordinal * context_size
    + position); an empty top-k slot has activation 0 and index -1.
    """

    def __init__(self, d_sae: int, top: int, left: int, right: int, device: str = "cpu"):
        self.top, self.left, self.right, self.window = top, left, right, left + 1 + right
        zeros = dict(device=device)
        self.tokens = 0
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64, **zeros)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, **zeros)
        self.act_max = torch.zeros(d_sae, **zeros)
        self.hist = torch.zeros(d_sae * HIST_BINS, dtype=torch.int64, **zeros)
        self.top_act = torch.zeros(d_sae, top, **zeros)
        self.top_index = torch.full((d_sae, top), -1, dtype=torch.int64, **zeros)
        self.top_context = torch.full((d_sae, top, self.window), -1, dtype=torch.int64, **zeros)
        self.top_context_act = torch.zeros(d_sae, top, self.window, **zeros)

    @torch.no_grad()
    def update(self, f: torch.Tensor, tokens: torch.Tensor, counted: torch.Tensor, first_index: int) -> None:
        """Add a batch: feature activations f [n_seq, ctx, d_sae] (zeroed in place where not
        counted), tokens [n_seq, ctx], counted [n_seq, ctx] (the positions that count),
        first_index (stream index of tokens[0, 0]).

        The full [tokens, d_sae] matrix is read once, to find its non-zeros; the rest is
        O(non-zeros).
        """
        n_seq, ctx, d_sae = f.shape
        matrix = f.float().view(-1, d_sae)
        flat = matrix.view(-1)
        skipped = (~counted).view(-1).nonzero().squeeze(1)
        matrix.index_fill_(0, skipped, 0.0)
        self.tokens += n_seq * ctx - len(skipped)
        # "fires": a non-zero activation, as in eval's L0; the flat index is found in half the time
        # of nonzero's (row, feature) pairs
        index = flat.nonzero().squeeze(1)
        if not len(index):
            return
        features, values = index % d_sae, flat[index]
        self.fire_count += torch.bincount(features, minlength=d_sae)
        self.act_sum.index_add_(0, features, values.double())
        # act_max starts at 0, as the batch's own zeros would make it
        self.act_max.scatter_reduce_(0, features, values, "amax")
        # the bin of log10(value) by arithmetic (10x a binary search over the edges): bin b >= 1
        # holds [HIST_EDGES[b - 1], HIST_EDGES[b]); clamped to the underflow and overflow bins, and
        # log10 of a negative activation (nan) is clamped away first
        log10 = values.clamp(min=1e-30).log10()
        bins = ((log10 - HIST_LOG10_MIN) * HIST_PER_DECADE).floor_().add_(1).clamp_(0, HIST_BINS - 1).long()
        self.hist.index_add_(0, features * HIST_BINS + bins, torch.ones_like(bins))
        # only an activation above the smallest of its feature's K examples can enter them
        better = (values > self.top_act.amin(1)[features]).nonzero().squeeze(1)
        if len(better):
            self.merge_top(matrix, ctx, tokens, index[better] // d_sae, features[better], values[better], first_index)

    def merge_top(self, flat: torch.Tensor, ctx: int, tokens: torch.Tensor, rows: torch.Tensor,
                  features: torch.Tensor, values: torch.Tensor, first_index: int) -> None:
        """Put positive activations (values at flat[rows, features]) into their features' slots,
        each in place of one of the smallest; only the slots that change are written."""
        device = flat.device
        # grouped by feature, largest first, by one sort of an int64 key: a positive float32's bits
        # order as the float does, and this sort took 1/6 of the time of sorting the floats
        key = (features << 31) | (0x7FFFFFFF - values.view(torch.int32).long())
        order = key.argsort()
        rows, features, values = rows[order], features[order], values[order]
        counts = torch.bincount(features, minlength=flat.shape[1])
        rank = torch.arange(len(features), device=device) - (counts.cumsum(0) - counts)[features]
        take = rank < self.top
        rows, features, values, rank = rows[take], features[take], values[take], rank[take]
        # per candidate feature: its K slots and its (up to K) best activations of this batch, the
        # missing ones -inf; the K largest of the 2K stay
        candidates = counts.nonzero().squeeze(1)
        candidate = torch.zeros_like(counts)
        candidate[candidates] = torch.arange(len(candidates), device=device)
        batch_act = torch.full((len(candidates), self.top), -math.inf, device=device)
        batch_row = torch.zeros((len(candidates), self.top), dtype=torch.int64, device=device)
        batch_act[candidate[features], rank] = values
        batch_row[candidate[features], rank] = rows
        _, kept = torch.cat([self.top_act[candidates], batch_act], 1).topk(self.top, dim=1)  # [c, K]
        entering = torch.zeros(len(candidates), 2 * self.top, dtype=torch.bool, device=device)
        entering.scatter_(1, kept, True)
        # as many new activations enter a feature's slots as old ones leave them: the i-th entering
        # (row-major) takes the i-th slot left
        new = entering[:, self.top:].nonzero()
        slot = (~entering[:, :self.top]).nonzero()[:, 1]
        feature, row = candidates[new[:, 0]], batch_row[new[:, 0], new[:, 1]]
        pos = row % ctx
        window = pos[:, None] + torch.arange(-self.left, self.right + 1, device=device)  # [n, window]
        inside = (window >= 0) & (window < ctx)
        window_row = (row - pos)[:, None] + window.clamp(0, ctx - 1)
        self.top_act[feature, slot] = batch_act[new[:, 0], new[:, 1]]
        self.top_index[feature, slot] = row + first_index
        self.top_context[feature, slot] = torch.where(inside, tokens.reshape(-1).to(device)[window_row], -1)
        self.top_context_act[feature, slot] = torch.where(inside, flat[window_row, feature[:, None]], 0.0)


def logit_lens(sae: SAE, model, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(promoted ids, their logits, suppressed ids, their logits), each [d_sae, n]: the direct
    effect of each decoder direction on the logits, (W_dec[f] - mean(W_dec[f])) * gamma @ W_U.

    The final LayerNorm subtracts the mean and scales by gamma (ln_final.w) before W_U; with
    TransformerLens's fold_ln gamma is already folded into W_U (gamma = 1 here). Its division by
    the residual's norm scales all logits of a direction alike, so it changes no ranking.
    """
    W_U = model.W_U.detach().float().cpu()
    gamma = getattr(model.ln_final, "w", None)
    n = min(n, W_U.shape[1])
    parts = [], [], [], []
    W_dec = sae.W_dec.detach().float().cpu()
    for start in range(0, W_dec.shape[0], 1024):  # chunks: d_sae x d_vocab at once may not fit
        d = W_dec[start:start + 1024]
        d = d - d.mean(-1, keepdim=True)
        if gamma is not None:
            d = d * gamma.detach().float().cpu()
        logits = d @ W_U
        for i, (values, ids) in enumerate((logits.topk(n, dim=1), (-logits).topk(n, dim=1))):
            parts[2 * i].append(ids)
            parts[2 * i + 1].append(values if i == 0 else -values)
    return tuple(torch.cat(p) for p in parts)


LOGIT_LENS_TEXT = ("decoder direction W_dec[f], centred (its mean over d_model removed, as the final LayerNorm "
                   "does) and scaled by the final LayerNorm's weight (already folded into W_U when the cache's "
                   "model was processed with fold_ln), times the unembedding W_U: the direct effect of the "
                   "feature on the logits, ignoring the LayerNorm's division by the residual norm")


def load_model_for(manifest, device: str):
    processing = json_format.MessageToDict(manifest.config.processing, preserving_proto_field_name=True)
    return load_model(manifest.config.model, device=device,
                      processing=WeightProcessing(**{k: bool(processing.get(k, False)) for k in WeightProcessing.__dataclass_fields__}))


def check_inputs(opts: FeatureOptions):
    """The manifest and the SAEs, or the one-line error that says why they cannot be used."""
    manifest = read_manifest(opts.cache, opts.storage_options)
    if manifest is None:
        raise CacheError(f"no cache at {opts.cache}")
    if not manifest.eval.shards:
        raise CacheError(f"{opts.cache} has no eval split: build it with --eval-tokens")
    if Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise ValueError(f"--out {opts.out} exists and is not a directory")
    return manifest, [s.sae for s in load_saes(opts.saes, manifest, opts.device)]


def unique_names(paths: tuple[str, ...]) -> list[str]:
    names, seen = [], {}
    for path in paths:
        base = Path(path).resolve().name or "sae"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


@torch.inference_mode()
def collect(opts: FeatureOptions, manifest, saes: list[SAE], progress: bool = True) -> list[FeatureStats]:
    """One pass over the eval split, every SAE encoding every batch of its hook."""
    stats = [FeatureStats(s.cfg.d_sae, opts.top, opts.left, opts.right, opts.device) for s in saes]
    hooks = sorted({s.cfg.hook_name for s in saes})
    total = min(opts.max_tokens or manifest.eval.num_tokens, manifest.eval.num_tokens)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="features", disable=not progress)
    first_index = 0
    for tokens, acts in eval_batches(opts, manifest, hooks):
        tokens = tokens.to(opts.device)
        counted = torch.ones_like(tokens, dtype=torch.bool)
        if opts.exclude_bos and manifest.config.prepend_bos:
            counted[:, 0] = False
        for sae, state in zip(saes, stats):
            x = acts[sae.cfg.hook_name].to(opts.device)
            state.update(sae.encode(x), tokens, counted, first_index)
        first_index += tokens.numel()
        bar.update(tokens.numel())
    bar.close()
    return stats


def build_feature_browser(opts: FeatureOptions, progress: bool = True, model=None) -> Path:
    """Collect every SAE's feature statistics and write them, with the HTML browser, to opts.out.
    Returns the path of `index.html` there. Bad input raises ValueError / CacheError before
    anything is written; `model` (a HookedTransformer of the cache's model) skips loading it."""
    manifest, saes = check_inputs(opts)
    stats = collect(opts, manifest, saes, progress)
    if model is None:
        model = load_model_for(manifest, "cpu")
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        write_outputs(tmp, opts, manifest, saes, stats, model)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"


def replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` at `target`, moving an existing `target` aside first and removing it after."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class TokenText:
    """Decoded text of single token ids, decoded once each."""

    def __init__(self, tokenizer):
        self.tokenizer, self.text = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token < 0:
            return ""
        if token not in self.text:
            self.text[token] = self.tokenizer.decode([token])
        return self.text[token]


def first_sequence(manifest) -> int:
    """Sequence id of the eval split's first sequence (its shards hold consecutive ids, in order)."""
    return manifest.eval.shards[0].first_sequence


def write_outputs(root: Path, opts: FeatureOptions, manifest, saes: list[SAE], stats: list[FeatureStats], model) -> None:
    text = TokenText(model.tokenizer)
    ctx = manifest.config.context_size
    entries = []
    for name, path, sae, state in zip(unique_names(opts.saes), opts.saes, saes, stats):
        directory = root / name
        directory.mkdir()
        lens = logit_lens(sae, model, opts.logit_tokens) if splice_layer(sae.cfg.hook_name) is not None else None
        features, examples = feature_records(name, state, lens, text, ctx, first_sequence(manifest), opts)
        pq.write_table(examples_table(examples), directory / "top_activations.parquet")
        pq.write_table(summary_table(features), directory / "features.parquet")
        meta = {"sae": name, "path": str(path), "hook": sae.cfg.hook_name, "architecture": sae.cfg.architecture,
                "d_sae": sae.cfg.d_sae, "tokens": state.tokens, "cache": opts.cache, "top": opts.top,
                "left": opts.left, "right": opts.right, "dense_threshold": DENSE_THRESHOLD,
                "dead": sum(f["dead"] for f in features), "dense": sum(f["dense"] for f in features),
                "logit_lens": LOGIT_LENS_TEXT if lens is not None else None,
                "histogram_edges": HIST_EDGES.tolist()}
        (directory / "summary.json").write_text(json.dumps(meta, indent=1))
        write_browser(directory, meta, features, examples)
        entries.append(meta)
    write_sae_index(root, entries)


def feature_records(name: str, state: FeatureStats, lens, text: TokenText, ctx: int, seq0: int,
                    opts: FeatureOptions) -> tuple[list[dict], list[dict]]:
    """(one summary dict per feature, one dict per (feature, example)), plain Python values."""
    n = max(state.tokens, 1)
    count = state.fire_count.cpu().numpy()
    act_sum, act_max = state.act_sum.cpu().numpy(), state.act_max.cpu().numpy()
    hist = state.hist.view(-1, HIST_BINS).cpu().numpy()
    # each feature's slots, largest activation first
    order = state.top_act.argsort(dim=1, descending=True, stable=True)
    top_act, top_index = state.top_act.gather(1, order).cpu().numpy(), state.top_index.gather(1, order).cpu().numpy()
    window = order[..., None].expand_as(state.top_context)
    context = state.top_context.gather(1, window).cpu().numpy()
    context_act = state.top_context_act.gather(1, window).cpu().numpy()
    if lens is not None:
        lens = [t.numpy() for t in lens]
    features, examples = [], []
    for j in range(len(count)):
        density = float(count[j]) / n
        record = {"sae": name, "feature": j, "fire_count": int(count[j]), "density": density,
                  "max_activation": float(act_max[j]),
                  "mean_activation": float(act_sum[j] / count[j]) if count[j] else 0.0,
                  "dead": bool(count[j] == 0), "dense": bool(density > DENSE_THRESHOLD),
                  "histogram": hist[j].tolist(), "histogram_bins": histogram_bins(hist[j].tolist()), "promoted": None, "suppressed": None}
        if lens is not None:
            record["promoted"] = [(text(int(t)), float(v)) for t, v in zip(lens[0][j], lens[1][j])]
            record["suppressed"] = [(text(int(t)), float(v)) for t, v in zip(lens[2][j], lens[3][j])]
        features.append(record)
        for rank in range(state.top):
            if top_act[j, rank] <= 0:
                break
            index = int(top_index[j, rank])
            keep = context[j, rank] >= 0
            start = index % ctx - opts.left + int(np.argmax(keep))  # position of the first context token
            tokens = context[j, rank][keep].tolist()
            pieces = [text(t) for t in tokens]
            examples.append({
                "sae": name, "feature": j, "rank": rank, "activation": float(top_act[j, rank]),
                "sequence": seq0 + index // ctx, "position": index % ctx,
                "token": int(context[j, rank, opts.left]), "token_text": text(int(context[j, rank, opts.left])),
                "context_start": start, "context_tokens": tokens, "context_token_texts": pieces,
                "context_text": "".join(pieces), "context_activations": context_act[j, rank][keep].tolist(),
            })
    return features, examples


EXAMPLE_SCHEMA = pa.schema([
    ("sae", pa.string()), ("feature", pa.int32()), ("rank", pa.int32()), ("activation", pa.float32()),
    ("sequence", pa.int64()), ("position", pa.int32()), ("token", pa.int32()), ("token_text", pa.string()),
    ("context_start", pa.int32()), ("context_tokens", pa.list_(pa.int32())),
    ("context_token_texts", pa.list_(pa.string())), ("context_text", pa.string()),
    ("context_activations", pa.list_(pa.float32())),
])


def examples_table(examples: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(examples, schema=EXAMPLE_SCHEMA)


SUMMARY_SCHEMA = pa.schema([
    ("sae", pa.string()), ("feature", pa.int32()), ("fire_count", pa.int64()), ("density", pa.float64()),
    ("max_activation", pa.float32()), ("mean_activation", pa.float32()), ("dead", pa.bool_()), ("dense", pa.bool_()),
    ("promoted_tokens", pa.list_(pa.string())), ("promoted_logits", pa.list_(pa.float32())),
    ("suppressed_tokens", pa.list_(pa.string())), ("suppressed_logits", pa.list_(pa.float32())),
])


def summary_table(features: list[dict]) -> pa.Table:
    rows = []
    for f in features:
        row = {k: f[k] for k in ("sae", "feature", "fire_count", "density", "max_activation", "mean_activation", "dead", "dense")}
        for kind in ("promoted", "suppressed"):
            pairs = f[kind]
            row[f"{kind}_tokens"] = None if pairs is None else [t for t, _ in pairs]
            row[f"{kind}_logits"] = None if pairs is None else [v for _, v in pairs]
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def histogram_bins(counts: list[int]) -> list[tuple[float, float, int]]:
    """(low edge, high edge, count) of the bins from the first to the last non-empty one; the
    underflow bin starts at 0 and the overflow bin ends at infinity."""
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return []
    edges = [0.0, *HIST_EDGES.tolist(), math.inf]
    return [(edges[i], edges[i + 1], counts[i]) for i in range(nonzero[0], nonzero[-1] + 1)]
