"""What `actserve cache build` takes: BuildOptions, validated here and trusted below, and the
TransformerLens weight processing a cache's model is loaded with. Light to import (no torch, Ray
or TransformerLens), so that the CLI's flags come from it at once."""
from __future__ import annotations

from dataclasses import dataclass

from actserve.services.options import option, required

SHARD_DTYPES = ("float16", "bfloat16", "float32")  # what shards store activations as


@dataclass(frozen=True)
class WeightProcessing:
    """TransformerLens's weight processing; the defaults are `HookedTransformer.from_pretrained`'s.

    Folding and centring change the values in the residual stream (not the model's outputs), so
    activations are only comparable between models processed the same way.
    """

    fold_ln: bool = option(True, "keep LayerNorm weights unfolded (TransformerLens folds them by default)",
                           flag="no-fold-ln")
    center_writing_weights: bool = option(True, "do not remove the mean from weights writing to the residual stream",
                                          flag="no-center-writing-weights")
    center_unembed: bool = option(True, "do not center the unembedding (subtract its mean over the vocabulary)",
                                  flag="no-center-unembed")
    fold_value_biases: bool = option(True, "do not fold the value biases into the attention output bias",
                                     flag="no-fold-value-biases")
    refactor_factored_attn_matrices: bool = False  # not a flag: TransformerLens's default, kept


@dataclass(frozen=True)
class BuildOptions:
    """Everything `cache build` takes, one flag per field; validated here, trusted below."""
    model: str = required("TransformerLens model name (gpt2) or local Hugging Face GPT-2 directory")
    dataset: str = required("Hugging Face hub dataset name, or a local .txt/.jsonl/.parquet file or directory")
    hooks: str = required("comma list of hook names and/or patterns, e.g. 'blocks.*.hook_resid_pre'")
    out: str = required("cache URL: a directory, file://..., or s3://bucket/prefix")
    tokens: int = required("train-split tokens (rounded up to whole sequences)")
    eval_tokens: int = option(0, "held-out eval-split tokens (whole sequences, never in train)")
    context_size: int = option(128, "tokens per sequence, BOS included")
    dtype: str = option("float16", "activation dtype in the shards", choices=SHARD_DTYPES)
    dataset_split: str = option("train", "dataset split to read", flag="split")
    text_column: str = option("text", "dataset column holding the text")
    token_column: str = option("", "read pre-tokenized ids from this column instead of text")
    storage_options: dict = option({}, "JSON of fsspec options, e.g. "
                                       "'{\"client_kwargs\": {\"endpoint_url\": \"http://...\"}}'")
    actors: int = option(1, "model-host actors running in parallel (one GPU each when CUDA is present)")
    writers: int = option(0, "shards each model host writes at once beside its forward (one writer stores "
                             "~0.5 GB/s); 0: one on a CPU host, whose forward takes the cores, services/build.py's "
                             "GPU_WRITERS on a GPU, whose forward outruns one")
    batch_sequences: int = option(32, "sequences per forward pass")
    shard_mb: float = option(128.0, "target shard size in MiB")
    device: str | None = option(None, "cpu or cuda (default: cuda when present)")
    # not flags: the command sets processing from its --no-fold-ln... switches; every sequence
    # starts with BOS (SAELens's convention)
    processing: WeightProcessing = WeightProcessing()
    prepend_bos: bool = True

    def __post_init__(self):
        checks = [
            (self.tokens > 0, f"--tokens must be > 0, got {self.tokens}"),
            (self.eval_tokens >= 0, f"--eval-tokens must be >= 0, got {self.eval_tokens}"),
            (self.context_size >= 2, f"--context-size must be >= 2, got {self.context_size}"),
            (self.dtype in SHARD_DTYPES, f"--dtype must be one of {', '.join(SHARD_DTYPES)}, got {self.dtype!r}"),
            (self.actors >= 1, f"--actors must be >= 1, got {self.actors}"),
            (self.writers >= 0, f"--writers must be >= 0, got {self.writers}"),
            (self.batch_sequences >= 1, f"--batch-sequences must be >= 1, got {self.batch_sequences}"),
            (self.shard_mb > 0, f"--shard-mb must be > 0, got {self.shard_mb}"),
            (bool(self.hooks.strip()), "--hooks is empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
