"""TrainOptions: everything one `actserve train` process takes, documented field by field. The
dataclass is the one place its defaults are written: the CLI's flags are generated from it
(`actserve.cli.add_dataclass_flags`), sweep files fill in its fields, and the trainer saves it.

Comma-listed fields (architectures, expansions, l1_coefficients, ks, lrs) form a grid: every
combination is trained on the same batches (`grid_points`, also how `actserve sweep` names and
expands its points).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field


def option(default, help: str, **metadata):
    """A dataclass field with its --help text (and, optionally, a `flag` name or `choices` for the CLI)."""
    return field(default=default, metadata={"help": help, **metadata})


def required(help: str):
    """A dataclass field without a default: a required flag."""
    return field(metadata={"help": help})


@dataclass(frozen=True)
class TrainOptions:
    hook: str = required("hook to train on, e.g. blocks.8.hook_resid_pre")
    out: str = required("output directory")
    tokens: int = required("token budget; more than the split holds means more epochs")
    architectures: tuple[str, ...] = option(("standard",), "standard, gated, topk, normalized (comma list)", flag="arch")
    expansions: tuple[int, ...] = option((32,), "d_sae / d_in (comma list)", flag="expansion")
    l1_coefficients: tuple[float, ...] = option(
        (8e-5,), "L1 coefficient; for normalized SAEs alpha, with beta = alpha * E|x|^2 (comma list)", flag="l1-coefficient")
    ks: tuple[int, ...] = option((32,), "active latents of topk SAEs (comma list)", flag="k")
    lrs: tuple[float, ...] = option((4e-4,), "Adam learning rate (comma list)", flag="lr")
    batch_size: int = option(4096, "tokens per step")
    lr_warmup_steps: int = option(1000, "steps of linear learning-rate warmup")
    lr_decay: str = option("constant", "learning-rate schedule after warmup", choices=("constant", "cosine", "linear"))
    l1_warmup_steps: int = option(0, "steps over which the L1 coefficient ramps up from 0")
    ghost_grads: bool = option(False, "ghost grads for dead features (standard SAEs)")
    dead_feature_window: int = option(1000, "steps without firing that make a feature dead")
    scale_to_sqrt_d: bool = option(
        False, "scale inputs to E|x|^2 = d_in (SAELens style), folded back into the weights at export")
    seed: int = option(0, "seeds everything random in the run: initial weights, stream order, training noise")
    checkpoint_every: int = option(1_000_000, "tokens between checkpoints")
    log_every: int = option(50, "steps between metrics.jsonl records")
    device: str = option("cpu", "cpu or cuda")
    wandb_project: str | None = option(None, "also log to this Weights & Biases project")

    def __post_init__(self):
        checks = [
            (self.tokens > 0, f"--tokens must be > 0, got {self.tokens}"),
            (self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}"),
            (self.checkpoint_every > 0, f"--checkpoint-every must be > 0, got {self.checkpoint_every}"),
            (self.log_every > 0, f"--log-every must be > 0, got {self.log_every}"),
            (all(e > 0 for e in self.expansions), f"--expansion must be > 0, got {self.expansions}"),
            (all(k > 0 for k in self.ks), f"--k must be > 0, got {self.ks}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class GridPoint:
    """One SAE of a grid: its architecture, size, learning rate and sparsity setting."""
    architecture: str
    expansion: int
    lr: float
    sparsity: str      # "k" (topk) or "l1" (every other architecture)
    value: float | int

    def name(self, hook: str) -> str:
        return f"{hook}-{self.architecture}-x{self.expansion}-{self.sparsity}{self.value:g}-lr{self.lr:g}"


def grid_points(architectures, expansions, lrs, l1_coefficients, ks) -> list[GridPoint]:
    """Every combination; the sparsity axis is k for topk and the L1 coefficient otherwise."""
    points = []
    for arch, expansion, lr in itertools.product(architectures, expansions, lrs):
        sparsity = [("k", k) for k in ks] if arch == "topk" else [("l1", l1) for l1 in l1_coefficients]
        points.extend(GridPoint(arch, expansion, lr, kind, value) for kind, value in sparsity)
    return points
