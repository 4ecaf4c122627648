"""Gated SAE (Rajamanoharan et al., DeepMind 2024): decide WHICH features fire apart from HOW MUCH.

    x_c   = x - b_dec
    gate  = x_c @ W_enc + b_gate                              (W_gate = W_enc)
    mag   = x_c @ (W_enc * exp(r_mag)) + b_mag                 (W_mag shares W_enc's directions)
    f     = 1[gate > 0] * ReLU(mag)
    x_hat = f @ W_dec + b_dec
    loss  = ||x - x_hat||^2 + lambda * ||ReLU(gate)||_1 + ||x - x_hat_aux||^2,
            x_hat_aux = ReLU(gate) @ sg(W_dec) + sg(b_dec)     (sg: stop-gradient, frozen decoder)

The L1 penalty acts on the gate path only, so it no longer shrinks the magnitudes (feature
suppression); the auxiliary loss makes the gate path reconstruct on its own, which gives the gate
weights a gradient the Heaviside step would not. There is no b_enc (SAELens layout).
"""
import torch
from torch import Tensor, nn

from .base import SAE, ForwardOutput, squared_error
from .config import SAEConfig


class GatedSAE(SAE):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def gate_and_magnitude(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_centered = self.centered_input(x)
        gate_pre = x_centered @ self.W_enc + self.b_gate
        magnitude = torch.relu(x_centered @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
        return gate_pre, magnitude

    def encode(self, x: Tensor) -> Tensor:
        gate_pre, magnitude = self.gate_and_magnitude(x)
        return (gate_pre > 0).to(magnitude.dtype) * magnitude

    def forward(self, x, *, dead_mask=None, l1_scale=1.0, generator=None) -> ForwardOutput:
        gate_pre, magnitude = self.gate_and_magnitude(x)
        feature_acts = (gate_pre > 0).to(magnitude.dtype) * magnitude
        x_hat = self.decode(feature_acts)
        gate_acts = torch.relu(gate_pre)
        x_hat_via_gate = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        losses = {
            "mse": squared_error(x, x_hat).mean(),
            "l1": self.cfg.l1_coefficient * l1_scale * gate_acts.sum(dim=-1).mean(),
            "aux_reconstruction": squared_error(x, x_hat_via_gate).mean(),
        }
        return ForwardOutput(x_hat, feature_acts, losses, sum(losses.values()))
