"""Normalized SAE (Fengyuan Hu, "Normalizing Sparse Autoencoders", 2024; seed 002).

    c     = tanh(ReLU((x - b_dec) @ W_enc + b_enc + eps)),  eps ~ N(0, sigma^2), training only
    x_hat = c @ W_dec + b_dec
    loss  = ||x - x_hat||^2 + beta * ||c||_1,  beta = alpha * (mean input L2 norm)^2

c lies in [0, 1), so its L1 norm tracks its L0 norm and no longer depends on the input's scale
(no feature suppression); the decoder rows are NOT constrained to unit norm and carry the
magnitudes. The noise makes small activations unreliable, pushing c towards 0 or ~1. beta scales
the L1 term like the squared-error term, so one alpha behaves the same on every layer; the mean
norm comes from the cache's per-hook statistics (`SAEConfig.input_mean_norm`).

The post writes x_hat = W_d c without biases; like the implementation it builds on
(ai-safety-foundation/sparse_autoencoder) this keeps the tied bias b_dec, which residual streams,
with their large mean, need. Saved files use the SAELens layout (W_enc, W_dec, b_enc, b_dec)
with the architecture name "normalized", which SAELens does not know.
"""
import torch
from torch import Tensor, nn

from .base import SAE, ForwardOutput, squared_error
from .config import SAEConfig


class NormalizedSAE(SAE):
    unit_norm_decoder = False

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        # Scale from the input norm M: encoder columns direction / M, so that pre-activations of
        # typical inputs are O(1), tanh's sensitive range and the scale sigma is measured against;
        # decoder rows M / sqrt(d_sae), so that the ~d_sae/2 features the noise switches on at
        # first add up to about an input's norm, not sqrt(d_sae) times it (with rows of norm M
        # the initial loss is huge and training pushes every b_enc down: all features die).
        # This replaces the base class's encoder_init_norm: the scale here is set by M.
        with torch.no_grad():
            self.W_enc.copy_(self.W_dec.T / cfg.input_mean_norm)
            self.W_dec *= cfg.input_mean_norm / cfg.d_sae**0.5

    @property
    def l1_beta(self) -> float:
        return self.cfg.l1_coefficient * self.cfg.input_mean_norm**2

    def pre_activation(self, x: Tensor) -> Tensor:
        return self.centered_input(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        return torch.tanh(torch.relu(self.pre_activation(x)))

    def forward(self, x, *, dead_mask=None, l1_scale=1.0, generator=None) -> ForwardOutput:
        hidden_pre = self.pre_activation(x)
        if self.training and self.cfg.noise_std > 0:
            noise = torch.randn(
                hidden_pre.shape, generator=generator, device=hidden_pre.device, dtype=hidden_pre.dtype
            )
            hidden_pre = hidden_pre + self.cfg.noise_std * noise
        feature_acts = torch.tanh(torch.relu(hidden_pre))
        x_hat = self.decode(feature_acts)
        losses = {
            "mse": squared_error(x, x_hat).mean(),
            "l1": self.l1_beta * l1_scale * feature_acts.sum(dim=-1).mean(),
        }
        return ForwardOutput(x_hat, feature_acts, losses, sum(losses.values()))
