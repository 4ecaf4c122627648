"""`actserve train`: one lightweight process trains one SAE (or several configs on the same batches,
as dictionary_learning does) on one hook's activations streamed from the server.

Checkpoints hold every SAE's trainer state (weights, Adam, schedules, dead-feature counters, RNG),
the running metrics and the stream cursor, written atomically every `checkpoint_every` tokens; a
restarted run resumes from the last one and ends with the same weights as an uninterrupted run, bit
for bit when both run with the same torch thread count (the order of a CPU step's float sums
depends on it; a different count changes the last bits).
"""
from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from actserve.clients.out_lock import hold_out_lock
from actserve.clients.stream import ActivationStream
from actserve.clients.train_options import TrainOptions, grid_points
from actserve.sae import SAEConfig, StreamingMetrics, TrainConfig, Trainer, build_sae, sae_files
from actserve.services.process_memory import keep_freed_heap_memory
from actserve.services.storage import write_local_file

CHECKPOINT = "checkpoint.pt"
METRICS_LOG = "metrics.jsonl"


@dataclass
class Run:
    """One SAE being trained: its name, trainer, metrics window and last step's numbers."""
    name: str
    trainer: Trainer
    metrics: StreamingMetrics = field(repr=False)
    last: dict = field(default_factory=dict)


def run_grid(opts: TrainOptions, d_in: int, stats, model_name: str, context_size: int) -> list[tuple[str, SAEConfig, TrainConfig]]:
    """(name, SAEConfig, TrainConfig) for every point of the options' grid."""
    total_steps = math.ceil(opts.tokens / opts.batch_size)
    scale = input_scale(stats, d_in)
    grid = []
    for point in grid_points(opts.architectures, opts.expansions, opts.lrs, opts.target_l0s, opts.l1_coefficients, opts.ks):
        arch = point.architecture
        settings = dict(
            d_in=d_in, d_sae=d_in * point.expansion, hook_name=opts.hook, model_name=model_name,
            context_size=context_size, **point.sae_settings(),
            input_mean_norm=stats.mean_norm * scale if arch == "normalized" else None,
        )
        schedule = dict(total_steps=total_steps, seed=opts.seed, batch_size=opts.batch_size,
                        l1_warmup_steps=opts.l1_warmup_steps)
        if opts.recipe == "seed":
            sae_cfg = SAEConfig.seed_recipe(**settings)
            train_cfg = TrainConfig.seed_recipe(**schedule)
        else:
            sae_cfg = SAEConfig(arch, use_ghost_grads=opts.ghost_grads and arch == "standard", **settings)
            train_cfg = TrainConfig(lr=point.lr, lr_warmup_steps=min(opts.lr_warmup_steps, max(total_steps - 1, 0)),
                                    lr_decay=opts.lr_decay, dead_feature_window=opts.dead_feature_window, **schedule)
        grid.append((point.name(opts.hook), sae_cfg, train_cfg))
    return grid


def input_scale(stats, d_in: int) -> float:
    """The factor inputs are multiplied by so that E||x||^2 = d_in: every default of the SAE library
    is chosen on that scale, which makes training the same on any model and hook. It is folded
    back into the weights at export, so saved SAEs act on raw activations."""
    return math.sqrt(d_in / stats.mean_sq_norm)


def atomic_torch_save(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_local_file(path, buffer.getvalue())


def train(opts: TrainOptions, source, d_in: int, stats, model_name: str = "", context_size: int = 128,
          progress: bool = True) -> list[Path]:
    """Train every grid point on the same batches from `source`: an iterable of {hook: tensor}
    with state_dict() / load_state_dict() (an ActivationStream, or actserve.testing.TensorBatches)."""
    keep_freed_heap_memory()  # a CPU step frees and allocates tens of MB: ~100,000 pages faulted in again at the defaults
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    out_lock = hold_out_lock(out)  # noqa: F841 - one trainer per --out, held until train() returns
    torch.manual_seed(opts.seed)
    grid = run_grid(opts, d_in, stats, model_name, context_size)
    runs = [Run(name, Trainer(build_sae(sae_cfg, seed=opts.seed).to(opts.device), train_cfg),
                StreamingMetrics(sae_cfg.d_sae, opts.device))
            for name, sae_cfg, train_cfg in grid]
    scale = input_scale(stats, d_in)
    checkpoint = load_checkpoint(out, runs)
    tokens = 0
    if checkpoint:
        tokens = checkpoint["tokens"]
        source.load_state_dict(checkpoint["stream"])
    wandb_run = start_wandb(opts, grid) if opts.wandb_project else None
    log = (out / METRICS_LOG).open("a")
    bar = tqdm(total=opts.tokens, initial=tokens, unit="tok", unit_scale=True, desc=f"train {opts.hook}", disable=not progress)
    wait = busy = 0.0
    start_tokens, start_time = tokens, time.perf_counter()
    next_checkpoint = (tokens // opts.checkpoint_every + 1) * opts.checkpoint_every
    batches = iter(source)
    # Window metrics (explained variance, firing frequencies) re-encode a sampled batch: every step
    # would cost a third of the step, ten samples per log window about 3%.
    sample_every = max(1, opts.log_every // 10)
    while tokens < opts.tokens:
        t0 = time.perf_counter()
        try:
            x = next(batches)[opts.hook]
        except StopIteration:
            raise RuntimeError(f"the stream ended after {tokens:,} of {opts.tokens:,} tokens") from None
        x = x[: opts.tokens - tokens].to(opts.device, torch.float32) * scale
        t1 = time.perf_counter()
        sample = runs[0].trainer.n_steps % sample_every == 0 or tokens + len(x) >= opts.tokens
        for run in runs:
            if run.trainer.n_steps == 0:  # b_dec starts as the config says (geometric median by default)
                run.trainer.sae.initialize_b_dec(x)
            run.last = run.trainer.step(x)
            if sample:
                sample_metrics(run, x)
        tokens += len(x)
        t2 = time.perf_counter()
        wait, busy = wait + (t1 - t0), busy + (t2 - t1)
        bar.update(len(x))
        step = runs[0].trainer.n_steps
        if step % opts.log_every == 0 or tokens >= opts.tokens:
            for run in runs:
                # the last step's numbers (dead_features: the trainer's window), then the metrics
                # of the sampled batches since the last record, under window_*
                window = {f"window_{key}": value for key, value in run.metrics.compute().items()}
                record = {"run": run.name, "tokens": tokens, **run.last, **window,
                          "tokens_per_s": (tokens - start_tokens) / (time.perf_counter() - start_time),
                          "data_wait_fraction": wait / max(wait + busy, 1e-9)}
                log.write(json.dumps(record) + "\n")
                if wandb_run is not None:
                    wandb_run.log({f"{run.name}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
                if tokens < opts.tokens:  # a fresh window; the last one becomes the sparsity file
                    run.metrics = StreamingMetrics(run.trainer.sae.cfg.d_sae, opts.device)
            log.flush()
            bar.set_postfix(loss=f"{runs[0].last['loss']:.3g}", l0=f"{runs[0].last['l0']:.1f}",
                            wait=f"{wait / max(wait + busy, 1e-9):.0%}")
        if next_checkpoint <= tokens < opts.tokens:
            save_checkpoint(out, runs, tokens, source.state_dict())
            next_checkpoint += opts.checkpoint_every
    bar.close()
    log.close()
    if wandb_run is not None:
        wandb_run.finish()
    return export(opts, runs, scale)


@torch.no_grad()
def sample_metrics(run: Run, x: torch.Tensor) -> None:
    sae = run.trainer.sae
    sae.eval()
    f = sae.encode(x)
    run.metrics.update(x, sae.decode(f), f)


def save_checkpoint(out: Path, runs: list[Run], tokens: int, stream_state) -> None:
    atomic_torch_save({"tokens": tokens, "stream": stream_state,
                       "runs": {r.name: {"trainer": r.trainer.state_dict(), "metrics": r.metrics, "last": r.last}
                                for r in runs}}, out / CHECKPOINT)


def load_checkpoint(out: Path, runs: list[Run]) -> dict | None:
    path = out / CHECKPOINT
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    if set(state["runs"]) != {r.name for r in runs}:
        raise ValueError(f"{path} belongs to a different set of runs ({sorted(state['runs'])}); use another --out")
    for run in runs:
        saved = state["runs"][run.name]
        run.trainer.load_state_dict(saved["trainer"])
        run.metrics, run.last = saved["metrics"], saved["last"]
    return state


def export(opts: TrainOptions, runs: list[Run], scale: float) -> list[Path]:
    """Each SAE in SAELens's layout, with the input scale folded into its weights."""
    paths = []
    for run in runs:
        sae = run.trainer.sae
        sae.fold_input_scale(scale)
        path = Path(opts.out) if len(runs) == 1 else Path(opts.out) / run.name
        export_sae(sae, path, run.metrics.log10_feature_density())
        paths.append(path)
    (Path(opts.out) / CHECKPOINT).unlink(missing_ok=True)
    return paths


def export_sae(sae, path: Path, log10_feature_density) -> None:
    """The SAE's files in SAELens's layout, each written atomically."""
    path.mkdir(parents=True, exist_ok=True)
    for name, data in sae_files(sae, log10_feature_density).items():
        write_local_file(path / name, data)


def start_wandb(opts: TrainOptions, grid):
    import wandb

    return wandb.init(project=opts.wandb_project, config={"options": asdict(opts), "runs": [n for n, _, _ in grid]})


def train_from_server(opts: TrainOptions, server: str | list[str], cache: str, token: str | None = None,
                      progress: bool = True, reconnect_timeout: float = 60.0) -> list[Path]:
    """Train on `cache`'s train split streamed from `server`: endless epochs, each in a new order,
    BOS rows dropped, until the token budget is spent."""
    stream = ActivationStream(server, cache=cache, hooks=[opts.hook], batch_size=opts.batch_size, seed=opts.seed,
                              epochs=None, device=opts.device, drop_bos=True, token=token,
                              reconnect_timeout=reconnect_timeout, read_from=opts.read_from)
    manifest = stream.manifest
    if opts.hook not in manifest.config.hooks:
        raise ValueError(f"--hook {opts.hook}: the cache has no such hook; cached hooks: {', '.join(manifest.config.hooks)}")
    try:
        return train(opts, stream, manifest.d_model, manifest.stats[opts.hook], manifest.config.model,
                     manifest.config.context_size, progress)
    finally:
        stream.close()
