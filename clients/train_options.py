"""TrainOptions: everything one `actserve train` process takes, documented field by field. The
CLI's flags are generated from it (`actserve.cli.add_dataclass_flags`), sweep files fill in its
fields, and the trainer saves it. Optimisation defaults are the SAE library's own
(`actserve.sae.TrainConfig`, chosen for inputs normalised to E||x||^2 = d_in, which is how the
trainer feeds them), so they are written once, there.

Comma-listed fields (architectures, expansions, lrs, and one sparsity axis: target_l0s, or else
l1_coefficients / ks) form a grid: every combination is trained on the same batches
(`grid_points`, also how `actserve sweep` names and expands its points).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from actserve.sae.config import ARCHITECTURES, DEFAULT_L1_COEFFICIENTS, K_ARCHITECTURES, SAEConfig
from actserve.sae.train import TrainConfig
from actserve.services.options import option, required

RECIPES = ("default", "seed")


@dataclass(frozen=True)
class TrainOptions:
    hook: str = required("hook to train on, e.g. blocks.8.hook_resid_pre")
    out: str = required("output directory")
    tokens: int = required("token budget; more than the split holds means more epochs")
    architectures: tuple[str, ...] = option(("standard",), f"comma list of {', '.join(ARCHITECTURES)}", flag="arch")
    expansions: tuple[int, ...] = option((32,), "d_sae / d_in (comma list)", flag="expansion")
    target_l0s: tuple[float, ...] = option(
        (), "L0 to end at (comma list): topk/batchtopk use k = target; standard, gated, jumprelu and normalized "
            "steer their sparsity coefficient during training to end there. Replaces --l1-coefficient/--k",
        flag="target-l0")
    l1_coefficients: tuple[float, ...] = option(
        (), "sparsity coefficient (comma list; jumprelu: its L0 coefficient; normalized: alpha). Default: each "
            f"architecture's own for normalised inputs {DEFAULT_L1_COEFFICIENTS}, jumprelu {SAEConfig.l0_coefficient}",
        flag="l1-coefficient")
    ks: tuple[int, ...] = option((), "active latents of topk/batchtopk SAEs (comma list), unless --target-l0", flag="k")
    lrs: tuple[float, ...] = option((TrainConfig.lr,), "Adam learning rate (comma list)", flag="lr")
    batch_size: int = option(TrainConfig.batch_size, "tokens per step")
    lr_warmup_steps: int = option(TrainConfig.lr_warmup_steps, "steps of linear learning-rate warmup")
    lr_decay: str = option(TrainConfig.lr_decay, "learning-rate decay over the last part of the run",
                           choices=("constant", "cosine", "linear"))
    l1_warmup_steps: int = option(TrainConfig.l1_warmup_steps, "steps over which the sparsity coefficient ramps up from 0")
    ghost_grads: bool = option(False, "ghost grads for dead features (standard SAEs)")
    dead_feature_window: int = option(TrainConfig.dead_feature_window, "tokens without firing that make a feature dead")
    recipe: str = option("default", "seed: seed 000's standard SAE (ghost grads, unit-norm encoder init, "
                                    "geometric-median b_dec) and optimisation (lr 4e-4, 1000 warmup steps, constant "
                                    "rate), overriding --lr, --lr-warmup-steps, --lr-decay and --dead-feature-window",
                         choices=RECIPES)
    seed: int = option(0, "seeds everything random in the run: initial weights, stream order, training noise")
    checkpoint_every: int = option(1_000_000, "tokens between checkpoints")
    log_every: int = option(50, "steps between metrics.jsonl records")
    device: str = option("cpu", "cpu or cuda")
    read_from: str = option("", "the cache's URL as this machine reads it: the server plans the stream and the "
                                "batches are cut from the shards here, in the same order (skips the socket on the "
                                "server's node)")
    wandb_project: str | None = option(None, "also log to this Weights & Biases project")

    def __post_init__(self):
        unknown = sorted(set(self.architectures) - set(ARCHITECTURES))
        checks = [
            (self.tokens > 0, f"--tokens must be > 0, got {self.tokens}"),
            (self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}"),
            (self.checkpoint_every > 0, f"--checkpoint-every must be > 0, got {self.checkpoint_every}"),
            (self.log_every > 0, f"--log-every must be > 0, got {self.log_every}"),
            (not unknown, f"--arch: unknown architecture {unknown}; choose from {', '.join(ARCHITECTURES)}"),
            (all(e > 0 for e in self.expansions), f"--expansion must be > 0, got {self.expansions}"),
            (all(k > 0 for k in self.ks), f"--k must be > 0, got {self.ks}"),
            (all(t > 0 for t in self.target_l0s), f"--target-l0 must be > 0, got {self.target_l0s}"),
            (all(c >= 0 for c in self.l1_coefficients), f"--l1-coefficient must be >= 0, got {self.l1_coefficients}"),
            (not (self.target_l0s and self.ks), "give --target-l0 or --k, not both"),
            (self.target_l0s or self.ks or not set(self.architectures) & set(K_ARCHITECTURES),
             "topk and batchtopk SAEs need --target-l0 (or --k)"),
            (self.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}"),
            (self.recipe == "default" or set(self.architectures) == {"standard"}, "--recipe seed trains standard SAEs only"),
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
    sparsity: str          # "l0" (a target L0), "k", or "l1" (the sparsity coefficient)
    value: float | int

    def name(self, hook: str) -> str:
        return f"{hook}-{self.architecture}-x{self.expansion}-{self.sparsity}{self.value:g}-lr{self.lr:g}"

    def sae_settings(self) -> dict:
        """The SAEConfig fields this point sets."""
        if self.sparsity == "l0":
            return {"target_l0": self.value}
        if self.sparsity == "k":
            return {"k": self.value}
        return {"l0_coefficient" if self.architecture == "jumprelu" else "l1_coefficient": self.value}


def default_coefficient(architecture: str) -> float:
    return SAEConfig.l0_coefficient if architecture == "jumprelu" else DEFAULT_L1_COEFFICIENTS[architecture]


def grid_points(architectures, expansions, lrs, target_l0s=(), l1_coefficients=(), ks=()) -> list[GridPoint]:
    """Every combination. The sparsity axis is the target L0s when given; otherwise k for
    topk/batchtopk and the sparsity coefficient (default: the architecture's) for the others."""
    points = []
    for arch, expansion, lr in itertools.product(architectures, expansions, lrs):
        if target_l0s:
            sparsity = [("l0", t) for t in target_l0s]
        elif arch in K_ARCHITECTURES:
            sparsity = [("k", k) for k in ks]
        else:
            sparsity = [("l1", c) for c in l1_coefficients or (default_coefficient(arch),)]
        points.extend(GridPoint(arch, expansion, lr, kind, value) for kind, value in sparsity)
    return points
