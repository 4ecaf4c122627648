"""`actserve sweep sweep.yaml`: one trainer client per grid point, as Ray tasks, all reading the same
cache through one server; then the evaluator over every SAE, and a results table.

    cache: actserve-work/cache            # URL, as the server serves it
    server: grpc://127.0.0.1:8815         # optional: without it the sweep starts a server actor
    out: sweeps/first
    tokens: 2000000                       # per trainer
    gpus_per_trainer: 0.25                # fractional GPUs on a GPU cluster; 0 on CPU
    cpus_per_trainer: 1
    grid:                                 # the product of every list is the set of points
      hook: [blocks.0.hook_resid_pre, blocks.1.hook_resid_pre]
      architecture: [standard, topk]
      l1_coefficient: [8e-5]              # standard / gated / normalized points
      k: [32]                             # topk points
      lr: [4e-4]
      expansion: [32]
    train: {batch_size: 4096, lr_warmup_steps: 1000}   # any other `actserve train` option
    eval: {max_tokens: 100000}            # evaluator options, or `eval: false`

A failing point is reported in the table and does not stop the others.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

GRID_KEYS = {"hook": "hook", "architecture": "architectures", "l1_coefficient": "l1_coefficients",
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


GRID_TYPES = {"l1_coefficient": float, "lr": float, "k": int, "expansion": int}


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
    from clients.trainer import TrainOptions

    return {f.name for f in fields(TrainOptions)} - {"hook", "out", "tokens", *GRID_KEYS.values()}


def check_keys(path: str, prefix: str, mapping: dict, allowed: set[str]) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise SweepError(f"{path}: unknown key {prefix}{unknown[0]}; allowed: {', '.join(sorted(allowed))}")


def sweep_points(spec: SweepSpec) -> list:
    """One TrainOptions per grid point (architecture-specific axes apply only where they mean something)."""
    from clients.trainer import TrainOptions

    grid = spec.grid
    points = []
    for hook, arch, lr, expansion in itertools.product(
        grid["hook"], grid.get("architecture", ["standard"]), grid.get("lr", [4e-4]), grid.get("expansion", [32])
    ):
        sparsity = grid.get("k", [32]) if arch == "topk" else grid.get("l1_coefficient", [8e-5])
        for value in sparsity:
            name = f"{hook}-{arch}-x{expansion}-{'k' if arch == 'topk' else 'l1'}{value:g}-lr{lr:g}"
            points.append(TrainOptions(
                hook=hook, out=str(Path(spec.out) / "saes" / name), tokens=spec.tokens,
                architectures=(arch,), expansions=(int(expansion),), lrs=(float(lr),),
                **({"ks": (int(value),)} if arch == "topk" else {"l1_coefficients": (float(value),)}),
                **spec.train,
            ))
    return points


def train_point(opts, server: str, cache: str, token: str | None) -> dict:
    """A Ray task: train one point; failures are returned, not raised, so the sweep goes on."""
    from clients.trainer import train_from_server

    try:
        (path,) = train_from_server(opts, server, cache, token=token, progress=False)
        return {"point": Path(opts.out).name, "status": "ok", "sae": str(path)}
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {"point": Path(opts.out).name, "status": "failed", "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()}


def run_sweep(spec: SweepSpec, progress: bool = True, points: list | None = None) -> list[dict]:
    """Train `points` (default: the spec's grid) concurrently, evaluate, and write the table."""
    import ray

    from services.build import ensure_ray

    points = sweep_points(spec) if points is None else points
    ensure_ray()
    server, server_actor = spec.server, None
    if server is None:
        from services.server import ServeOptions, start_actors

        (server_actor,) = start_actors(ServeOptions(caches=(spec.cache,), storage_options=spec.storage_options), None)
        server = ray.get(server_actor.location.remote())
    task = ray.remote(num_cpus=spec.cpus_per_trainer, num_gpus=spec.gpus_per_trainer)(train_point)
    token = spec.token or os.environ.get("ACTSERVE_TOKEN")
    refs = [task.remote(p, server, spec.cache, token) for p in points]
    results = []
    from tqdm import tqdm

    with tqdm(total=len(refs), desc="sweep", unit="trainer", disable=not progress) as bar:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            result = ray.get(done[0])
            results.append(result)
            bar.update(1)
            if result["status"] != "ok":
                tqdm.write(f"sweep point {result['point']} failed: {result['error']}")
    if server_actor is not None:
        ray.kill(server_actor)
    results.sort(key=lambda r: r["point"])
    scores = evaluate_points(spec, [r for r in results if r["status"] == "ok"], progress)
    for r in results:
        r.update(scores.get(r.get("sae"), {}))
    write_table(spec, results)
    return results


def evaluate_points(spec: SweepSpec, ok: list[dict], progress: bool) -> dict[str, dict]:
    if spec.eval is False or not ok:
        return {}
    from clients.evaluator import EvalOptions, evaluate

    opts = EvalOptions(saes=tuple(r["sae"] for r in ok), cache=spec.cache, out=str(Path(spec.out) / "eval"),
                       storage_options=spec.storage_options, **(spec.eval or {}))
    return {r["sae"]: r for r in evaluate(opts, progress=progress)}


RESULT_COLUMNS = ["point", "status", "hook", "architecture", "d_sae", "explained_variance", "l0", "l1",
                  "alive_fraction", "dense_features", "ce_clean", "ce_sae", "ce_zero", "ce_recovered",
                  "kl_sae", "kl_score", "norm_ratio", "error"]


def write_table(spec: SweepSpec, results: list[dict]) -> None:
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    lines = ["| " + " | ".join(RESULT_COLUMNS[:-1]) + " |", "|" + "---|" * (len(RESULT_COLUMNS) - 1)]
    for r in results:
        lines.append("| " + " | ".join(format_cell(r.get(c)) for c in RESULT_COLUMNS[:-1]) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
