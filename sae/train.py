"""Trainer: one Adam step per batch, with the schedules, dead-feature tracking and checks around it.

    trainer = Trainer(sae, TrainConfig(lr=4e-4, lr_warmup_steps=1000))
    sae.initialize_b_dec(sample)        # geometric median of a sample of activations
    for x in batches:                   # x: [batch, d_in]
        stats = trainer.step(x)         # {"loss": ..., "mse": ..., "l0": ..., "lr": ...}

`trainer.state_dict()` / `load_state_dict()` hold everything a resumed run needs to continue
bit-identically on CPU (see `state_dict`).
"""
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .base import SAE

LR_DECAYS = ("constant", "cosine", "linear")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    """Optimisation settings; validated on construction."""

    lr: float = 4e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_steps: int = 0  # linear warmup from lr / lr_warmup_steps to lr
    lr_decay: str = "constant"  # after warmup: constant, or cosine / linear decay until total_steps
    total_steps: int | None = None  # needed by the decaying schedules
    final_lr_fraction: float = 0.0  # the decays end at lr * final_lr_fraction
    l1_warmup_steps: int = 0  # the L1 coefficient ramps linearly from 0 over these steps
    dead_feature_window: int = 1000  # steps without firing after which a feature counts as dead
    autocast_dtype: str | None = None  # "bfloat16" or "float16": autocast (master weights stay float32)
    compile: bool = False  # torch.compile the SAE's forward
    seed: int = 0  # seeds the normalized SAE's training noise

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not all(0 <= beta < 1 for beta in self.adam_betas) or len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        for name in ("lr_warmup_steps", "l1_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dead_feature_window < 1:
            raise ValueError(f"dead_feature_window must be >= 1, got {self.dead_feature_window}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if self.lr_decay != "constant" and (self.total_steps is None or self.total_steps <= self.lr_warmup_steps):
            raise ValueError(
                f"lr_decay={self.lr_decay!r} needs total_steps > lr_warmup_steps={self.lr_warmup_steps}, "
                f"got {self.total_steps}"
            )
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        if self.autocast_dtype is not None and self.autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(
                f"autocast_dtype must be None or one of {tuple(AUTOCAST_DTYPES)}, got {self.autocast_dtype!r}"
            )

    def learning_rate(self, step: int) -> float:
        """Learning rate at `step` (0-based)."""
        if step < self.lr_warmup_steps:
            return self.lr * (step + 1) / self.lr_warmup_steps
        if self.lr_decay == "constant":
            return self.lr
        progress = min(1.0, (step - self.lr_warmup_steps) / (self.total_steps - self.lr_warmup_steps))
        final_lr = self.lr * self.final_lr_fraction
        if self.lr_decay == "cosine":
            return final_lr + (self.lr - final_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr + (final_lr - self.lr) * progress

    def l1_scale(self, step: int) -> float:
        """Factor on the L1 coefficient at `step`."""
        if step < self.l1_warmup_steps:
            return (step + 1) / self.l1_warmup_steps
        return 1.0


class Trainer:
    """Owns the optimiser and the training-time state of one SAE; `step` trains on one batch."""

    def __init__(self, sae: SAE, cfg: TrainConfig | None = None):
        self.sae = sae
        self.cfg = cfg or TrainConfig()
        self.device = sae.W_enc.device
        if any(p.dtype != torch.float32 for p in sae.parameters()):
            raise ValueError("the trainer keeps float32 master weights; build the SAE in float32")
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=self.cfg.lr, betas=self.cfg.adam_betas)
        # fp16 gradients underflow without loss scaling; for bf16 / float32 the scaler is a no-op.
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.autocast_dtype == "float16")
        self.forward_step = torch.compile(self.eager_forward_step) if self.cfg.compile else self.eager_forward_step
        self.noise_generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        self.n_steps = 0
        self.steps_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.device)

    @property
    def dead_mask(self) -> Tensor:
        """[d_sae] bool: features that have not fired in the last `dead_feature_window` steps."""
        return self.steps_since_fired >= self.cfg.dead_feature_window

    def step(self, x: Tensor) -> dict[str, float]:
        """One optimisation step on a batch x [batch, d_in]; returns the loss terms and stats.

        Raises ValueError on a batch of the wrong shape or with NaN/inf values, and
        FloatingPointError when the loss is not finite; both name the step, and neither updates
        the weights.
        """
        step, d_in = self.n_steps, self.sae.cfg.d_in
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ValueError(f"step {step}: expected a batch of shape [batch, {d_in}], got {tuple(x.shape)}")
        x = x.to(self.device, torch.float32)
        if not torch.isfinite(x).all():
            n_bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"step {step}: the input batch has {n_bad} NaN/inf values; not training on it")

        lr, l1_scale, dead_mask = self.cfg.learning_rate(step), self.cfg.l1_scale(step), self.dead_mask
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.sae.train()
        autocast_dtype = AUTOCAST_DTYPES.get(self.cfg.autocast_dtype)
        with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, losses, fired, l0 = self.forward_step(x, dead_mask, l1_scale)
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_scaler.scale(loss).backward()

        # One device sync for all the numbers.
        values = torch.stack([loss, *losses.values(), l0, dead_mask.sum().float()]).float().tolist()
        stats = dict(zip(["loss", *losses, "l0", "dead_features"], values))
        if not math.isfinite(stats["loss"]):
            terms = ", ".join(f"{name}={value}" for name, value in stats.items())
            raise FloatingPointError(f"step {step}: the loss is not finite ({terms}); weights left as they were")

        self.grad_scaler.unscale_(self.optimizer)
        if self.sae.unit_norm_decoder:
            self.sae.remove_parallel_decoder_grad()
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        if self.sae.unit_norm_decoder:
            self.sae.normalize_decoder()
        self.steps_since_fired = torch.where(fired, 0, self.steps_since_fired + 1)
        self.n_steps += 1
        return {**stats, "lr": lr, "l1_scale": l1_scale, "step": step}

    def eager_forward_step(self, x: Tensor, dead_mask: Tensor, l1_scale: float):
        """The SAE's forward reduced to what a step needs: (loss, named loss terms, which features
        fired [d_sae] bool, mean L0). Not returning the activations themselves keeps a compiled
        graph from materialising zero gradients for them in the backward pass."""
        out = self.sae(x, dead_mask=dead_mask, l1_scale=l1_scale, generator=self.noise_generator)
        feature_acts = out.feature_acts.detach()
        # Activations are >= 0 in every architecture, so "fired" is "max over the batch > 0"; these
        # two reductions are the cheapest found on CPU (no boolean copy of [batch, d_sae]).
        fired = feature_acts.amax(dim=0) > 0
        l0 = torch.count_nonzero(feature_acts) / x.shape[0]
        return out.loss, out.losses, fired, l0

    def state_dict(self) -> dict:
        """Everything a resumed run needs: SAE weights, Adam moments, loss scaler, step counter,
        dead-feature counters and the noise RNG. Tensors are shared with the live trainer (as in
        `nn.Module.state_dict`): torch.save it, or deepcopy it to keep a snapshot in memory."""
        return {
            "sae_config": asdict(self.sae.cfg),
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict(),
            "n_steps": self.n_steps,
            "steps_since_fired": self.steps_since_fired,
            "noise_generator": self.noise_generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; the SAE config must match this trainer's SAE."""
        mine = asdict(self.sae.cfg)
        theirs = state["sae_config"]
        differing = sorted(key for key in mine.keys() | theirs.keys() if mine.get(key) != theirs.get(key))
        if differing:
            raise ValueError(f"trainer state is for a different SAE config; differing fields: {differing}")
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.n_steps = state["n_steps"]
        self.steps_since_fired.copy_(state["steps_since_fired"])
        self.noise_generator.set_state(state["noise_generator"])
