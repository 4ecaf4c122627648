"""The sweep file of `actserve sweep sweep.yaml`: one trainer client per grid point, as Ray tasks, all
reading the same cache through one server; then the evaluator over every SAE, and a results table.

    cache: actserve-work/cache            # URL, as the server serves it
    server: grpc://127.0.0.1:8815         # optional: without it the sweep starts a server actor
    out: sweeps/first
    tokens: 2000000                       # per trainer
    gpus_per_trainer: 0.25                # fractional GPUs on a GPU cluster; 0 on CPU
    cpus_per_trainer: 1
    grid:                                 # the product of every list is the set of points
      hook: [blocks.0.hook_resid_pre, blocks.1.hook_resid_pre]
      architecture: [standard, jumprelu, topk, batchtopk]
      target_l0: [10, 20, 40]             # every architecture at the same L0s (or, instead:
                                          # l1_coefficient for the penalised ones, k for topk/batchtopk)
      expansion: [32]
      lr: [5e-3]                          # a left-out axis takes `actserve train`'s default
    train: {batch_size: 4096}             # any other `actserve train` option
    eval: {max_tokens: 100000}            # evaluator options, or `eval: false`

A failing point is reported in the table and does not stop the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from actserve.clients.train_options import TrainOptions, grid_points

GRID_KEYS = {"hook": "hook", "architecture": "architectures", "target_l0": "target_l0s", "l1_coefficient": "l1_coefficients",
             "k": "ks", "lr": "lrs", "expansion": "expansions"}
TOP_KEYS = {"cache", "server", "out", "tokens", "grid", "train", "eval", "storage_options",
            "gpus_per_trainer", "cpus_per_trainer", "token"}
EVAL_KEYS = {"max_tokens", "batch_sequences", "exclude_bos", "device"}


class SweepError(ValueError):
    """A sweep file that cannot run: the message names the key and what is allowed."""


@dataclass(frozen=True)
class SweepSpec:
    cache: str
    out: str
    tokens: int
    grid: dict
    server: str | None = None
    train: dict = field(default_factory=dict)
    eval: dict | bool = field(default_factory=dict)
    storage_options: dict = field(default_factory=dict)
    gpus_per_trainer: float = 0.0
    cpus_per_trainer: float = 1.0
    token: str | None = None  # bearer token of a server bound off loopback (default: $ACTSERVE_TOKEN)


def load_sweep(path: str) -> SweepSpec:
    """Parse and validate a sweep YAML: unknown keys and empty grids are errors."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"{path}: cannot read the sweep file: {e}") from e
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with keys {sorted(TOP_KEYS)}")
    check_keys(path, "", raw, TOP_KEYS)
    for key in ("cache", "out", "tokens", "grid"):
        if key not in raw:
            raise SweepError(f"{path}: missing key {key!r}")
    grid = raw["grid"]
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: grid must be a mapping of lists")
    check_keys(path, "grid.", grid, set(GRID_KEYS))
    if "hook" not in grid:
        raise SweepError(f"{path}: grid.hook must list at least one hook")
    for key, values in grid.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SweepError(f"{path}: grid.{key} is empty; give at least one value")
        grid[key] = [grid_value(path, key, v) for v in values]
    check_keys(path, "train.", raw.get("train") or {}, train_keys())
    if isinstance(raw.get("eval"), dict):
        check_keys(path, "eval.", raw["eval"], EVAL_KEYS)
    return SweepSpec(**{**raw, "grid": grid, "train": raw.get("train") or {}})


GRID_TYPES = {"target_l0": float, "l1_coefficient": float, "lr": float, "k": int, "expansion": int}


def grid_value(path: str, key: str, value):
    """YAML reads 8e-5 as a string (it wants 8.0e-5): accept both, reject what is not a number."""
    kind = GRID_TYPES.get(key)
    if kind is None:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SweepError(f"{path}: grid.{key} takes numbers, got {value!r}") from None
    if kind is int and not number.is_integer():
        raise SweepError(f"{path}: grid.{key} takes whole numbers, got {value!r}")
    return kind(number)


def train_keys() -> set[str]:
    """`train:` may set any TrainOptions field the grid and the top level do not."""
    return {f.name for f in fields(TrainOptions)} - {"hook", "out", "tokens", *GRID_KEYS.values()}


def check_keys(path: str, prefix: str, mapping: dict, allowed: set[str]) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise SweepError(f"{path}: unknown key {prefix}{unknown[0]}; allowed: {', '.join(sorted(allowed))}")


def sweep_points(spec: SweepSpec) -> list[TrainOptions]:
    """One TrainOptions per grid point (architecture-specific axes apply only where they mean
    something); an axis the grid leaves out takes TrainOptions's default."""
    grid, default = spec.grid, TrainOptions.__dataclass_fields__
    axes = {option: tuple(grid[key]) if key in grid else default[option].default
            for key, option in GRID_KEYS.items() if key != "hook"}
    points = []
    for hook in grid["hook"]:
        for point in grid_points(**axes):
            sparsity = {{"l0": "target_l0s", "k": "ks", "l1": "l1_coefficients"}[point.sparsity]: (point.value,)}
            points.append(TrainOptions(
                hook=hook, out=str(Path(spec.out) / "saes" / point.name(hook)), tokens=spec.tokens,
                architectures=(point.architecture,), expansions=(point.expansion,), lrs=(point.lr,),
                **sparsity, **spec.train,
            ))
    return points
