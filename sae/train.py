"""Trainer: one Adam step per batch, with the schedules, dead-feature tracking and checks around it.

    trainer = Trainer(sae, TrainConfig(total_steps=n_steps))   # defaults: normalised inputs
    sae.initialize_b_dec(sample)        # cfg.b_dec_init of a sample of activations
    for x in batches:                   # x: [batch, d_in], on the normalised scale
        stats = trainer.step(x)         # {"loss": ..., "mse": ..., "l0": ..., "lr": ...,
                                        #  "sparsity_coefficient": ... (penalised architectures)}

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
    """Optimisation settings; validated on construction. Defaults are for inputs on the normalised
    scale E||x||^2 = d_in (see sae.config) and were checked on the tiny model (blocks.2, d_sae 1024,
    2M tokens): defaults alone give L0 10-40 and explained variance >= 0.85 there."""

    # Own sweep on the tiny model (blocks.2, normalised inputs, batch 4096, 2M tokens, lambda 3):
    # lr 2e-3 -> L0 23.9 / EV 0.748, 5e-3 -> 19.3 / 0.757, 1e-2 -> 13.0 / 0.736; 5e-3 gives the
    # best trade-off. The seed's 4e-4 is too slow for short runs.
    lr: float = 5e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)  # seed 000 and SAELens defaults
    # The batch size the other defaults were tuned at (seed 000, SAELens: 4096 tokens). `step`
    # accepts any batch; the trainer process reads this value.
    batch_size: int = 4096
    # Linear warmup from lr / lr_warmup_steps to lr. Own sweep: with the small encoder init no
    # warmup is needed (the seed's 1000 steps were longer than short runs); SAELens's default is 0.
    lr_warmup_steps: int = 0
    # After warmup: "linear" (default) or "cosine" decay to lr * final_lr_fraction over the last
    # lr_decay_fraction of the steps, or "constant". Decays act only when total_steps is known;
    # without it the rate stays at lr. Linear decay to 0 over the last 20%: Anthropic's April 2024 update.
    lr_decay: str = "linear"
    lr_decay_fraction: float = 0.2
    total_steps: int | None = None  # the run's length in steps: needed by the decays and by target_l0
    final_lr_fraction: float = 0.0
    l1_warmup_steps: int = 0  # the sparsity coefficient ramps linearly from 0 over these steps (SAELens: 0)
    # Tokens without firing after which a feature counts as dead (ghost grads, AuxK). SAELens: 1000
    # steps x 4096 tokens = 4.1M; seed 000: 5000 steps. Those are longer than short runs, where ghost
    # grads would never act; 1M tokens (own choice) lets them act within a 2M-token budget and still
    # only flags features rarer than 1 in 10^6 tokens.
    dead_feature_window: int = 1_000_000
    # Clip the gradient's global norm to this (None: no clipping). 1.0: Anthropic's April 2024
    # update, and what SAELens 6's trainer does unconditionally. No measurable effect with the
    # unit-norm decoder (teammate's sweep), but it matters for the April 2024 standard SAE (free
    # decoder rows): tiny model, blocks.2, d_sae 1024, 1M tokens, lambda 2.24: no clip L0 30.6 /
    # EV 0.800, clip 1.0 L0 22.4 / 0.812; at target L0 20: 18.7 / 0.719 without, 18.6 / 0.812 with.
    grad_clip_norm: float | None = 1.0
    # target_l0 controller (used when the SAE config sets target_l0 on an architecture with a
    # sparsity coefficient): after target_l0_start_fraction of total_steps, every step
    #     ema_l0 <- (1 - target_l0_ema) * ema_l0 + target_l0_ema * batch L0
    #     error      = log(ema_l0 / target_l0)
    #     integral   <- integral + target_l0_gain * clip(error, +-0.3)   (from log(reference / target))
    #     log_factor = integral + target_l0_proportional_gain * clip(error, +-1)
    # and the coefficient is (config coefficient) * exp(log_factor). The proportional term drops
    # the coefficient as soon as L0 crosses the target, before the integral unwinds: JumpReLU's L0
    # lags its coefficient by hundreds of steps (tiny model, blocks.2, target 20, batch 4096, 1M
    # tokens, l0_coefficient 0.2: L0 21.6 with the integral alone, 18.8 with the proportional term;
    # targets 10 / 40 at batch 1024: 9.4 / 40.3). Own sweep on the tiny model
    # (standard, target 20, 2M tokens): starting at 5% of the steps, while L0 still falls from its
    # initial ~d_sae/2, winds the coefficient up too far (L0 ends below target, EV 0.49 at 0.5M
    # tokens); starting at 25% with gain 0.03 ends at L0 20.3 / EV 0.802 (gain 0.1: 20.7 / 0.808
    # but 89 dead features), better than a fixed lambda at the same L0 (0.757).
    # Where the controller starts: the coefficient times target_l0_reference / target_l0 (None:
    # the coefficient itself). L0 falls as 1 / coefficient: on the tiny model (blocks.2, d_sae 1024,
    # batch 1024, 1M tokens) the controller ended at coefficient x L0 = 23.9 / 23.8 / 24.0 for the
    # standard SAE at targets 10 / 20 / 40 and 3.7 / 3.1 / 3.4 for JumpReLU, so each architecture's
    # default coefficient (1.5, 0.2) gives L0 ~16 (gated: 1.5 -> ~17). Starting there instead of
    # at the default, the first target_l0_start_fraction of the run already trains near the target
    # sparsity: standard at target 39, seed 0: EV 0.9301 at L0 40.7 against 0.9266 at L0 40.6.
    target_l0_reference: float | None = 16.0
    target_l0_gain: float = 0.03
    target_l0_proportional_gain: float = 1.0
    target_l0_ema: float = 0.1
    target_l0_start_fraction: float = 0.25
    # JumpReLU's learned threshold trains at lr times this while the target_l0 controller acts
    # (from its start step; at lr before it, and without a controller). Adam moves a parameter by
    # ~lr per step at most, and the L0 penalty reaches a threshold only through the pre-activations
    # within bandwidth / 2 of it, so at lr the thresholds lag the controller's coefficient by
    # hundreds of steps and L0 undershoots the target. Own sweep (tiny model, blocks.2, batch 1024,
    # 1M tokens), EV at equal L0 against x1: x3 from the controller's start, d_sae 1024, targets
    # 10 / 12, seeds 0 / 1: +0.0008 to +0.0027, ending within 1% of the target (x1: 3-8% under);
    # d_sae 2048, target 16: +0.0000 / +0.0002, as many dead features. x3 from step 0 instead cost
    # -0.0009 / -0.0021 at d_sae 2048 with 2-3x the dead features (96-110 vs 35-59): while L0 falls
    # from ~d_sae / 2, fast thresholds pass all of a rare feature's pre-activations, and a threshold
    # there gets no gradient again.
    threshold_lr_scale: float = 3.0
    autocast_dtype: str | None = None  # "bfloat16" or "float16": autocast (master weights stay float32)
    compile: bool = False  # torch.compile the SAE's forward
    seed: int = 0  # seeds the normalized SAE's training noise

    @classmethod
    def seed_recipe(cls, **overrides) -> "TrainConfig":
        """Seed 000's optimisation: lr 4e-4, 1000 warmup steps, constant rate afterwards, dead
        window of 5000 steps at batch 4096."""
        settings = dict(lr=4e-4, lr_warmup_steps=1000, lr_decay="constant", dead_feature_window=5000 * 4096)
        return cls(**{**settings, **overrides})

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not all(0 <= beta < 1 for beta in self.adam_betas) or len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        for name in ("lr_warmup_steps", "l1_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.threshold_lr_scale > 0:
            raise ValueError(f"threshold_lr_scale must be > 0, got {self.threshold_lr_scale}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dead_feature_window < 1:
            raise ValueError(f"dead_feature_window must be >= 1 token, got {self.dead_feature_window}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if self.total_steps is not None and self.total_steps <= self.lr_warmup_steps:
            raise ValueError(
                f"total_steps must be > lr_warmup_steps={self.lr_warmup_steps}, got {self.total_steps}"
            )
        if not 0 < self.lr_decay_fraction <= 1:
            raise ValueError(f"lr_decay_fraction must be in (0, 1], got {self.lr_decay_fraction}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm must be None or > 0, got {self.grad_clip_norm}")
        if self.target_l0_reference is not None and not self.target_l0_reference > 0:
            raise ValueError(f"target_l0_reference must be None or > 0, got {self.target_l0_reference}")
        if not (self.target_l0_gain >= 0 and self.target_l0_proportional_gain >= 0 and 0 < self.target_l0_ema <= 1
                and 0 <= self.target_l0_start_fraction < 1):
            raise ValueError("target_l0_gain and target_l0_proportional_gain must be >= 0, target_l0_ema in (0, 1], "
                             "target_l0_start_fraction in [0, 1)")
        if self.autocast_dtype is not None and self.autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(
                f"autocast_dtype must be None or one of {tuple(AUTOCAST_DTYPES)}, got {self.autocast_dtype!r}"
            )

    def learning_rate(self, step: int) -> float:
        """Learning rate at `step` (0-based)."""
        if step < self.lr_warmup_steps:
            return self.lr * (step + 1) / self.lr_warmup_steps
        if self.lr_decay == "constant" or self.total_steps is None:
            return self.lr
        decay_steps = max(1.0, self.lr_decay_fraction * (self.total_steps - self.lr_warmup_steps))
        progress = min(1.0, max(0.0, (step - (self.total_steps - decay_steps)) / decay_steps))
        final_lr = self.lr * self.final_lr_fraction
        if self.lr_decay == "cosine":
            return final_lr + (self.lr - final_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr + (final_lr - self.lr) * progress

    def l1_scale(self, step: int) -> float:
        """Warmup factor on the sparsity coefficient at `step`."""
        if step < self.l1_warmup_steps:
            return (step + 1) / self.l1_warmup_steps
        return 1.0


class L0Controller:
    """Proportional-integral controller in log space that steers a sparsity coefficient to a target L0.

    Deterministic (a function of the batch L0s it is fed) and resumable (`state_dict`). The factor
    starts at `initial_factor` (the integral at its log); until `start_step` it only tracks the
    EMA; afterwards each update moves the integral by
    gain * log(ema_l0 / target), and log(factor) is that integral plus proportional_gain times the
    current log error: too many active features raise the coefficient, too few lower it,
    proportionally in log space, which suits L0's roughly power-law response to the coefficient.
    """

    def __init__(self, target: float, gain: float, ema: float, start_step: int, proportional_gain: float,
                 initial_factor: float = 1.0):
        self.target, self.gain, self.ema, self.start_step = target, gain, ema, start_step
        self.proportional_gain = proportional_gain
        self.integral = math.log(initial_factor)
        # |log(L0 / target)| is clipped to this per update: L0 far above target early in training
        # (it starts near d_sae / 2 and falls on its own) must not wind the coefficient up.
        self.max_error = 0.3
        self.log_factor = self.integral
        self.ema_l0: float | None = None

    @property
    def factor(self) -> float:
        return math.exp(self.log_factor)

    def update(self, step: int, l0: float) -> None:
        self.ema_l0 = l0 if self.ema_l0 is None else (1 - self.ema) * self.ema_l0 + self.ema * l0
        if step >= self.start_step:
            error = math.log(max(self.ema_l0, 1e-3) / self.target)
            clipped = max(min(error, self.max_error), -self.max_error)
            self.integral = min(max(self.integral + self.gain * clipped, -30.0), 30.0)
            self.log_factor = self.integral + self.proportional_gain * max(min(error, 1.0), -1.0)

    def state_dict(self) -> dict:
        return {"log_factor": self.log_factor, "integral": self.integral, "ema_l0": self.ema_l0}

    def load_state_dict(self, state: dict) -> None:
        self.log_factor, self.integral, self.ema_l0 = state["log_factor"], state["integral"], state["ema_l0"]


class Trainer:
    """Owns the optimiser and the training-time state of one SAE; `step` trains on one batch."""

    def __init__(self, sae: SAE, cfg: TrainConfig | None = None):
        self.sae = sae
        self.cfg = cfg or TrainConfig()
        self.device = sae.W_enc.device
        if any(p.dtype != torch.float32 for p in sae.parameters()):
            raise ValueError("the trainer keeps float32 master weights; build the SAE in float32")
        # A learned threshold (JumpReLU) in a group of its own, for threshold_lr_scale.
        threshold = sae.learned_threshold()
        groups = [{"params": [p for p in sae.parameters() if p is not threshold], "is_threshold": False}]
        if threshold is not None:
            groups.append({"params": [threshold], "is_threshold": True})
        self.optimizer = torch.optim.Adam(groups, lr=self.cfg.lr, betas=self.cfg.adam_betas)
        # fp16 gradients underflow without loss scaling; for bf16 / float32 the scaler is a no-op.
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.autocast_dtype == "float16")
        self.forward_step = torch.compile(self.eager_forward_step) if self.cfg.compile else self.eager_forward_step
        self.noise_generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        self.n_steps = 0
        self.tokens_seen = 0  # on the host: no feature can be dead before dead_feature_window tokens
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.device)
        self.controller = None
        if sae.cfg.target_l0 is not None and sae.cfg.sparsity_coefficient is not None:
            if self.cfg.total_steps is None:
                raise ValueError("target_l0 on a penalised architecture needs TrainConfig.total_steps")
            start = int(self.cfg.target_l0_start_fraction * self.cfg.total_steps)
            reference = self.cfg.target_l0_reference
            self.controller = L0Controller(sae.cfg.target_l0, self.cfg.target_l0_gain, self.cfg.target_l0_ema, start,
                                           self.cfg.target_l0_proportional_gain,
                                           1.0 if reference is None else reference / sae.cfg.target_l0)

    @property
    def dead_mask(self) -> Tensor | None:
        """[d_sae] bool: features that have not fired in the last `dead_feature_window` tokens;
        None while fewer tokens than that have been seen, when none can be. The forward then skips
        ghost grads and AuxK, whose terms would be exactly zero: AuxK alone cost a third of a TopK
        step (d_in 128, d_sae 2048, batch 1024, one CPU thread: 9.5k -> 13.9k tokens/s)."""
        if self.tokens_seen < self.cfg.dead_feature_window:
            return None
        return self.tokens_since_fired >= self.cfg.dead_feature_window

    @property
    def sparsity_factor(self) -> float:
        """The target_l0 controller's factor on the sparsity coefficient (1 without a controller)."""
        return self.controller.factor if self.controller is not None else 1.0

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

        lr, dead_mask = self.cfg.learning_rate(step), self.dead_mask
        l1_scale = self.cfg.l1_scale(step) * self.sparsity_factor
        steering = self.controller is not None and step >= self.controller.start_step
        threshold_lr = lr * (self.cfg.threshold_lr_scale if steering else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = threshold_lr if group["is_threshold"] else lr
        self.sae.train()
        autocast_dtype = AUTOCAST_DTYPES.get(self.cfg.autocast_dtype)
        with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, losses, fired, l0 = self.forward_step(x, dead_mask, l1_scale)
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_scaler.scale(loss).backward()

        # One device sync for all the numbers.
        n_dead = torch.zeros((), device=self.device) if dead_mask is None else dead_mask.sum().float()
        values = torch.stack([loss, *losses.values(), l0, n_dead]).float().tolist()
        stats = dict(zip(["loss", *losses, "l0", "dead_features"], values))
        if not math.isfinite(stats["loss"]):
            terms = ", ".join(f"{name}={value}" for name, value in stats.items())
            raise FloatingPointError(f"step {step}: the loss is not finite ({terms}); weights left as they were")

        self.grad_scaler.unscale_(self.optimizer)
        if self.sae.unit_norm_decoder:
            self.sae.remove_parallel_decoder_grad()
        if self.cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.grad_clip_norm)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.sae.after_optimizer_step()
        self.tokens_since_fired = torch.where(fired, 0, self.tokens_since_fired + x.shape[0])
        self.tokens_seen += x.shape[0]
        self.n_steps += 1
        coefficient = self.sae.cfg.sparsity_coefficient
        extra = {} if coefficient is None else {"sparsity_coefficient": coefficient * self.sparsity_factor}
        if self.controller is not None:
            self.controller.update(step, stats["l0"])
        return {**stats, "lr": lr, "l1_scale": l1_scale, **extra, "step": step}

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
        """Everything a resumed run needs: SAE weights and buffers, Adam moments, loss scaler, step
        counter, dead-feature counters, the noise RNG and the target_l0 controller. Tensors are shared with the live trainer (as in
        `nn.Module.state_dict`): torch.save it, or deepcopy it to keep a snapshot in memory."""
        return {
            "sae_config": asdict(self.sae.cfg),
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict(),
            "n_steps": self.n_steps,
            "tokens_seen": self.tokens_seen,
            "tokens_since_fired": self.tokens_since_fired,
            "noise_generator": self.noise_generator.get_state(),
            "controller": self.controller.state_dict() if self.controller is not None else None,
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
        self.tokens_seen = state["tokens_seen"]
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.noise_generator.set_state(state["noise_generator"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
