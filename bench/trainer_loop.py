"""What a trainer's loop costs on top of its SAE steps, from memory (no server, no disk reads).

For each architecture, in one process and one torch thread (as a demo trainer runs): `actserve
train`'s loop (`clients.trainer.train` on `actserve.testing.TensorBatches`) at each `--log-every`,
next to the bare `Trainer.step` loop on the same batches, the reference. The loop adds the
window metrics (one batch in ten of a record's steps re-encoded), the records, the checkpoints.
Defaults are the demo's shape: d_in 128, d_sae 2048, target L0 16, batches of 1024.

    python bench/trainer_loop.py [--archs standard,topk,jumprelu] [--log-every 20,50] [--tokens 300000]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import types

import torch

from actserve.clients.train_options import TrainOptions
from actserve.clients.trainer import run_grid, train
from actserve.sae import Trainer, build_sae
from actserve.testing import TensorBatches

HOOK = "blocks.0.hook_resid_pre"


def options(arch: str, out: str, args, log_every: int) -> TrainOptions:
    return TrainOptions(hook=HOOK, out=out, tokens=args.tokens, architectures=(arch,), expansions=(args.expansion,),
                        target_l0s=(args.target_l0,), batch_size=args.batch_size,
                        checkpoint_every=args.tokens // 4, log_every=log_every)


def bare_steps(arch: str, acts: torch.Tensor, stats, args) -> float:
    """tokens/s of Trainer.step alone over the same batches as the loop."""
    ((_, sae_cfg, train_cfg),) = run_grid(options(arch, "", args, 1), args.d_in, stats, "", 128)
    trainer = Trainer(build_sae(sae_cfg, seed=0), train_cfg)
    scale = (args.d_in / stats.mean_sq_norm) ** 0.5
    batches = [acts[i:i + args.batch_size] * scale for i in range(0, args.tokens, args.batch_size)]
    trainer.sae.initialize_b_dec(batches[0])
    start = time.perf_counter()
    for x in batches:
        trainer.step(x)
    return args.tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="standard,topk,jumprelu")
    p.add_argument("--log-every", default="20,50", help="comma list of --log-every values to time")
    p.add_argument("--tokens", type=int, default=300_000)
    p.add_argument("--d-in", type=int, default=128)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--target-l0", type=float, default=16)
    p.add_argument("--batch-size", type=int, default=1024)
    args = p.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    acts = torch.randn(args.tokens, args.d_in, generator=generator) * 2.0
    stats = types.SimpleNamespace(mean_sq_norm=4.0 * args.d_in, mean_norm=2.0 * args.d_in ** 0.5)
    print(f"# trainer loop vs bare Trainer.step, d_in {args.d_in}, d_sae {args.d_in * args.expansion}, "
          f"batch {args.batch_size}, {args.tokens:,} tokens, 1 torch thread")
    print(f"{'arch':<10} {'log every':>9} {'loop tok/s':>11} {'step tok/s':>11} {'ratio':>6}")
    for arch in args.archs.split(","):
        for log_every in map(int, args.log_every.split(",")):
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                train(options(arch, out, args, log_every), TensorBatches(acts, HOOK, args.batch_size), args.d_in, stats,
                      progress=False)
                loop = args.tokens / (time.perf_counter() - start)
            bare = bare_steps(arch, acts, stats, args)
            print(f"{arch:<10} {log_every:>9} {loop:>11,.0f} {bare:>11,.0f} {loop / bare:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
