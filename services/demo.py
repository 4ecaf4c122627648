"""`actserve demo`: the whole pipeline, offline, on this machine.

Makes the tiny model once (reused afterwards), writes the local corpus, builds a cache of every
layer's residual stream with train and eval splits, and prints the cache summary.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoOptions:
    workdir: Path
    tokens: int = 2_000_000
    eval_tokens: int = 100_000
    context_size: int = 128

    def __post_init__(self):
        if self.tokens <= 0:
            raise ValueError(f"--tokens must be > 0, got {self.tokens}")
        if self.eval_tokens <= 0:
            raise ValueError(f"--eval-tokens must be > 0, got {self.eval_tokens}")


def prepare_model(workdir: Path) -> tuple[Path, Path]:
    """The corpus and tiny model under workdir, made on first use."""
    from services.corpus import write_stdlib_corpus
    from services.tiny_model import make_tiny_model

    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "corpus.jsonl"
    if not corpus.exists():
        tmp = corpus.with_suffix(".partial")
        write_stdlib_corpus(tmp)
        tmp.replace(corpus)
    model = workdir / "tiny-model"
    print(json.dumps({"tiny_model": make_tiny_model(model, corpus_path=corpus)}))
    return corpus, model


def run_demo(opts: DemoOptions) -> int:
    from services.build import BuildOptions, build_cache
    from services.cache import summary

    corpus, model = prepare_model(opts.workdir)
    cache_url = str(opts.workdir / f"cache-{opts.tokens}")
    manifest = build_cache(BuildOptions(
        model=str(model), dataset=str(corpus), hooks="blocks.*.hook_resid_pre", out=cache_url,
        tokens=opts.tokens, eval_tokens=opts.eval_tokens, context_size=opts.context_size,
    ))
    print(summary(manifest, cache_url))
    return 0
