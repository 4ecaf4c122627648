"""What `actserve eval` and `actserve features` take, the two jobs that read SAEs over a cache's
eval split: EvalOptions, and FeatureOptions, which extends it. Validated here, trusted below; light
to import, so that the CLI's flags come from them at once."""
from __future__ import annotations

from dataclasses import dataclass

from actserve.services.options import option, required


@dataclass(frozen=True)
class EvalOptions:
    """Everything `actserve eval` takes, one flag per field (and the fields `actserve features`
    shares: FeatureOptions extends it)."""
    saes: tuple[str, ...] = required("SAE directory (SAELens layout; repeatable)", flag="sae", repeat=True, metavar="DIR")
    cache: str = required("cache URL (the manifest is read from it)")
    out: str = required("report directory")
    storage_options: dict = option({}, "JSON of fsspec options")
    server: str | None = option(None, "grpc:// location of a server of the cache: stream the eval split from it "
                                      "instead of reading shards")
    max_tokens: int | None = option(None, "eval tokens to use (default: the whole eval split)")
    batch_sequences: int = option(8, "sequences per batch")
    exclude_bos: bool = option(True, "include the BOS position too (eval splices and scores it, features counts it)",
                                flag="include-bos")
    device: str = option("cpu", "cpu or cuda")

    def __post_init__(self):
        checks = [
            (bool(self.saes), "give at least one --sae directory"),
            (self.max_tokens is None or self.max_tokens > 0, f"--max-tokens must be > 0, got {self.max_tokens}"),
            (self.batch_sequences > 0, f"--batch-sequences must be > 0, got {self.batch_sequences}"),
            (bool(self.out), "--out is empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class FeatureOptions(EvalOptions):
    """Everything `actserve features` takes: `actserve eval`'s options and these, one flag per field."""
    out: str = required("output directory (replaced as a whole when the run ends)")
    top: int = option(20, "top activating examples kept per feature")
    left: int = option(8, "context tokens shown before each example")
    right: int = option(4, "context tokens shown after each example")
    logit_tokens: int = option(10, "tokens listed per feature that its decoder direction promotes and suppresses")

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.top > 0, f"--top must be > 0, got {self.top}"),
            (self.left >= 0 and self.right >= 0, f"context widths must be >= 0, got {self.left} left, {self.right} right"),
            (self.logit_tokens >= 0, f"--logit-tokens must be >= 0, got {self.logit_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
