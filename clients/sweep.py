"""`actserve sweep sweep.yaml` (the file format: `sweep_spec.py`): the grid's trainers as Ray tasks
against one server, then the evaluator over every SAE, and results.{csv,md,json}."""
from __future__ import annotations

import csv
import json
import os
import traceback
from pathlib import Path

import ray
from tqdm import tqdm

from actserve.clients.eval_options import EvalOptions
from actserve.clients.evaluator import evaluate
from actserve.clients.frontier import plot_frontier
from actserve.clients.sweep_spec import SweepSpec, sweep_points
from actserve.clients.tables import markdown_table
from actserve.clients.trainer import train_from_server
from actserve.services.ray_runtime import ensure_ray
from actserve.services.run_server import start_actors
from actserve.services.serve_options import ServeOptions


def train_point(opts, server: str, cache: str, token: str | None) -> dict:
    """A Ray task: train one point; failures are returned, not raised, so the sweep goes on."""
    try:
        (path,) = train_from_server(opts, server, cache, token=token, progress=False)
        return {"point": Path(opts.out).name, "status": "ok", "sae": str(path)}
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {"point": Path(opts.out).name, "status": "failed", "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()}


def run_sweep(spec: SweepSpec, progress: bool = True, points: list | None = None) -> list[dict]:
    """Train `points` (default: the spec's grid) concurrently, evaluate, and write the table."""
    points = sweep_points(spec) if points is None else points
    ensure_ray()
    server, server_actor = spec.server, None
    if server is None:
        (server_actor,) = start_actors(ServeOptions(caches=(spec.cache,), storage_options=spec.storage_options), None)
        server = ray.get(server_actor.location.remote())
    task = ray.remote(num_cpus=spec.cpus_per_trainer, num_gpus=spec.gpus_per_trainer)(train_point)
    token = spec.token or os.environ.get("ACTSERVE_TOKEN")
    refs = [task.remote(p, server, spec.cache, token) for p in points]
    results = []
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
    opts = EvalOptions(saes=tuple(r["sae"] for r in ok), cache=spec.cache, out=str(Path(spec.out) / "eval"),
                       storage_options=spec.storage_options, **(spec.eval or {}))
    return {r["sae"]: r for r in evaluate(opts, progress=progress)}


RESULT_COLUMNS = ["point", "status", "hook", "architecture", "d_sae", "explained_variance", "l0", "l1",
                  "alive_fraction", "dense_features", "median_log10_density", "ce_clean", "ce_sae", "ce_zero", "ce_recovered",
                  "kl_sae", "kl_score", "norm_ratio", "error"]


def write_table(spec: SweepSpec, results: list[dict]) -> None:
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    (out / "results.md").write_text(markdown_table(results, [(c, c, None) for c in RESULT_COLUMNS[:-1]]))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot_frontier([r for r in results if r["status"] == "ok"], out / "frontier.png")  # with two or more scored points

