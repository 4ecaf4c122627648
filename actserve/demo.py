"""`actserve demo`: the whole pipeline, offline, on this machine.

  1. the tiny model and its corpus (made once under --workdir, reused afterwards);
  2. a cache of every layer's residual stream, train and eval splits, on local disk (Ray actors):
     --tokens train tokens, or all the corpus has (about 0.5M) when that is fewer;
  3. a server actor streaming it over Arrow Flight;
  4. one standard-SAE trainer per layer plus a JumpReLU and a TopK SAE on the middle layer, all
     ending at the same L0, concurrently, as Ray tasks, each on --tokens tokens streamed from the server;
  5. the evaluator: the seed-style table, density-histogram PNGs, the L0 / fidelity frontier and a
     JSON report;
  6. the feature browser of the middle layer's standard SAE (`actserve features`).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from actserve.clients.eval_options import FeatureOptions
from actserve.clients.features import build_feature_browser
from actserve.clients.sweep import run_sweep
from actserve.clients.sweep_spec import SweepSpec
from actserve.clients.train_options import TrainOptions
from actserve.offline.corpus import write_stdlib_corpus
from actserve.offline.tiny_model import make_tiny_model
from actserve.services.build import build_cache
from actserve.services.build_options import BuildOptions
from actserve.services.manifest import summary
from actserve.services.ray_runtime import ensure_ray

# d_sae = 16 * d_model = 2048 (the tiny model's residual stream is 128 wide) at L0 16: a mean
# firing density of 16 / 2048 = 0.8%, so most features fire on well under 1% of tokens; at 8x
# and L0 20 (2%) 400-800 of 1024 features were dense.
DEMO_EXPANSION = 16
DEMO_TARGET_L0 = 16     # every SAE ends at this L0 (the trainer's target_l0), so they compare at equal sparsity
# 1M tokens at 1024 per step is ~1000 steps, enough for the L0 controller (it acts from 25% of the
# steps); the library's 4096 would leave 244.
DEMO_BATCH_SIZE = 1024
# The middle layer also gets these, side by side with its standard SAE at the same L0.
DEMO_COMPARED_ARCHITECTURES = ("jumprelu", "topk")
# A record every 50 steps (20 per run). The window metrics re-encode one batch in ten of a record's
# steps; at a record every 20 steps that sampling cost 19% of a trainer's time (13.2k vs 16.2k
# tokens/s, d_sae 2048, one thread).
DEMO_LOG_EVERY = 50
# The tiny model trains while nothing else runs: two threads, 1.9x one on an idle 2-core machine.
DEMO_MODEL_THREADS = min(os.cpu_count() or 1, 2)


@dataclass(frozen=True)
class DemoOptions:
    workdir: Path
    tokens: int = 1_000_000
    eval_tokens: int = 100_000
    context_size: int = 128

    def __post_init__(self):
        if self.tokens <= 0:
            raise ValueError(f"--tokens must be > 0, got {self.tokens}")
        if self.eval_tokens <= 0:
            raise ValueError(f"--eval-tokens must be > 0, got {self.eval_tokens}")


def prepare_model(workdir: Path) -> tuple[Path, Path]:
    """The corpus and tiny model under workdir, made on first use."""
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "corpus.jsonl"
    if not corpus.exists():
        write_stdlib_corpus(corpus)  # written whole or not at all
    model = workdir / "tiny-model"
    make_tiny_model(model, corpus_path=corpus, threads=DEMO_MODEL_THREADS)
    return corpus, model


def demo_points(manifest, out: Path, tokens: int) -> list[TrainOptions]:
    """A standard SAE per cached layer, and the compared architectures on the middle layer, all at
    DEMO_TARGET_L0 with the trainer's defaults otherwise."""
    hooks = list(manifest.config.hooks)
    middle = hooks[len(hooks) // 2]
    runs = [(h, "standard") for h in hooks] + [(middle, arch) for arch in DEMO_COMPARED_ARCHITECTURES]
    return [TrainOptions(hook=hook, out=str(out / "saes" / f"{hook}-{arch}"), tokens=tokens, architectures=(arch,),
                         expansions=(DEMO_EXPANSION,), target_l0s=(DEMO_TARGET_L0,), batch_size=DEMO_BATCH_SIZE,
                         checkpoint_every=max(tokens // 4, DEMO_BATCH_SIZE), log_every=DEMO_LOG_EVERY)
            for hook, arch in runs]


def run_demo(opts: DemoOptions) -> int:
    timings = {}
    t0 = time.perf_counter()
    corpus, model = prepare_model(opts.workdir)
    timings["model_s"] = time.perf_counter() - t0

    ensure_ray()
    cache_url = str(opts.workdir / f"cache-{opts.tokens}")
    t0 = time.perf_counter()
    manifest = build_cache(BuildOptions(
        model=str(model), dataset=str(corpus), hooks="blocks.*.hook_resid_pre", out=cache_url,
        tokens=opts.tokens, eval_tokens=opts.eval_tokens, context_size=opts.context_size,
    ))
    timings["cache_s"] = time.perf_counter() - t0
    print(summary(manifest, cache_url))

    out = opts.workdir / f"demo-{opts.tokens}"
    # The local corpus holds ~0.5M train tokens: when the cache has fewer than --tokens, every
    # trainer still trains on --tokens, in several epochs, each in a new order.
    train_tokens = opts.tokens
    spec = SweepSpec(cache=cache_url, out=str(out), tokens=train_tokens, grid={"hook": list(manifest.config.hooks)})
    points = demo_points(manifest, out, train_tokens)
    t0 = time.perf_counter()
    results = run_sweep(spec, points=points)
    timings["train_and_eval_s"] = time.perf_counter() - t0

    failed = [r for r in results if r["status"] != "ok"]
    browser = None
    middle_standard = out / "saes" / f"{points[len(manifest.config.hooks) // 2].hook}-standard"
    if (middle_standard / "cfg.json").exists():
        t0 = time.perf_counter()
        browser = build_feature_browser(FeatureOptions(saes=(str(middle_standard),), cache=cache_url,
                                                       out=str(out / "features")))
        timings["features_s"] = time.perf_counter() - t0
    report = {"options": {k: str(v) for k, v in opts.__dict__.items()}, "timings": timings,
              "cached_tokens": manifest.train.num_tokens + manifest.eval.num_tokens,
              "trained_tokens": train_tokens * (len(results) - len(failed)), "results": results}
    (out / "demo.json").write_text(json.dumps(report, indent=1, default=str))
    print()
    print((out / "eval" / "eval.md").read_text() if (out / "eval" / "eval.md").exists() else "no SAE finished")
    print(f"cache {timings['cache_s']:.0f} s, training + eval {timings['train_and_eval_s']:.0f} s; "
          f"report {out / 'demo.json'}, table {out / 'eval' / 'eval.md'}, density plots in {out / 'eval'}")
    if (out / "frontier.png").exists():
        print(f"frontier (L0 vs CE recovered and explained variance): {out / 'frontier.png'}")
    if browser is not None:
        print(f"feature browser of {middle_standard.name}: {browser}")
    for r in failed:
        print(f"FAILED {r['point']}: {r['error']}")
    return 1 if failed else 0
