"""Training-step throughput of the standard SAE (sae.Trainer) against a bare torch loop.

The bare loop is the ceiling: the same matmuls, ReLU, MSE + L1 loss, backward and Adam, with none
of the library around it (input checks, decoder-gradient projection and renormalisation, dead-
feature tracking, the per-step stats). Both run in the same process, alternating, and the ratio
is the figure to read: these machines swing 2x between runs.

    python bench/sae_step.py                      # CPU: d_in 768, d_sae 24576, batch 4096
    python bench/sae_step.py --device cuda        # fp32, bf16 autocast, compile, compile + bf16
"""
import argparse
import statistics
import time

import torch

from actserve.sae import SAEConfig, Trainer, TrainConfig, build_sae

L1_COEFFICIENT = 8e-5  # the seed's GPT-2 setting; irrelevant to speed
LR = 4e-4


class BareLoop:
    """The standard SAE's training step, written out with plain tensors."""

    def __init__(self, d_in: int, d_sae: int, device: str, autocast_dtype: torch.dtype | None, compile: bool):
        generator = torch.Generator().manual_seed(0)
        W_dec = torch.randn(d_sae, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.params = [
            t.to(device).requires_grad_()
            for t in (W_dec.T.contiguous(), torch.zeros(d_sae), W_dec, torch.zeros(d_in))
        ]
        self.optimizer = torch.optim.Adam(self.params, lr=LR)
        self.autocast_dtype = autocast_dtype
        self.loss = torch.compile(self.loss_eager) if compile else self.loss_eager

    def loss_eager(self, x: torch.Tensor) -> torch.Tensor:
        W_enc, b_enc, W_dec, b_dec = self.params
        feature_acts = torch.relu((x - b_dec) @ W_enc + b_enc)
        x_hat = feature_acts @ W_dec + b_dec
        return (x_hat - x).pow(2).sum(-1).mean() + L1_COEFFICIENT * feature_acts.sum(-1).mean()

    def step(self, x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.loss(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def seconds_per_step(step, batches: list[torch.Tensor], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for x in batches:
        step(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(batches)


def run_variant(args, autocast: str | None, compile: bool) -> None:
    cfg = SAEConfig("standard", d_in=args.d_in, d_sae=args.d_sae, hook_name="bench", l1_coefficient=L1_COEFFICIENT)
    trainer = Trainer(
        build_sae(cfg, device=args.device), TrainConfig(lr=LR, autocast_dtype=autocast, compile=compile)
    )
    bare = BareLoop(args.d_in, args.d_sae, args.device, torch.bfloat16 if autocast else None, compile)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch, args.d_in, generator=generator).to(args.device) for _ in range(args.steps)]

    # Warm-up (allocator, and compilation when asked) outside the timed rounds.
    for step in (trainer.step, bare.step):
        for x in batches[: args.warmup_steps]:
            step(x)
    ours, ceiling = [], []
    for _ in range(args.rounds):
        ours.append(seconds_per_step(trainer.step, batches, args.device))
        ceiling.append(seconds_per_step(bare.step, batches, args.device))
    ours_tps, bare_tps = args.batch / statistics.median(ours), args.batch / statistics.median(ceiling)
    name = "+".join(filter(None, ["fp32" if autocast is None else autocast, "compile" if compile else ""]))
    print(f"{name:<18} {ours_tps:>12,.0f} {bare_tps:>12,.0f} {ours_tps / bare_tps:>6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=24576)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per round and implementation (default: 2 on CPU, 50 on CUDA)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the median is reported")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=None, help="comma list of fp32,bfloat16,compile,bfloat16+compile "
                        "(default: fp32 on CPU, all four on CUDA)")
    args = parser.parse_args()
    on_cuda = args.device.startswith("cuda")
    args.steps = args.steps or (50 if on_cuda else 2)
    variants = (args.variants or ("fp32,bfloat16,compile,bfloat16+compile" if on_cuda else "fp32")).split(",")
    device_name = torch.cuda.get_device_name() if on_cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"# SAE training step, standard SAE, d_in={args.d_in} d_sae={args.d_sae} batch={args.batch}, "
          f"{device_name}, torch {torch.__version__}")
    print(f"{'variant':<18} {'sae tok/s':>12} {'bare tok/s':>12} {'ratio':>6}")
    for variant in variants:
        parts = variant.split("+")
        run_variant(args, autocast="bfloat16" if "bfloat16" in parts else None, compile="compile" in parts)


if __name__ == "__main__":
    main()
