"""JumpReLU SAE (Rajamanoharan et al., DeepMind 2024), as SAELens defines it: a learned threshold
per feature and a direct L0 penalty, trained through straight-through estimators.

    z     = (x - b_dec) @ W_enc + b_enc
    f     = z * H(z - theta)                      theta = `threshold` [d_sae], kept >= 0
    x_hat = f @ W_dec + b_dec
    loss  = ||x - x_hat||^2 + lambda * sum_i H(z_i - theta_i)

H has no useful derivative, so the backward pass replaces the Dirac delta of dH/dtheta by a
rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth eps:
    d f_i / d theta_i           = -(theta_i / eps) K((z_i - theta_i) / eps)
    d H(z_i - theta_i) / d theta_i = -(1 / eps) K((z_i - theta_i) / eps)
and d f / d z = H(z - theta) (no gradient to z through the L0 term: DeepMind's estimator, SAELens's
jumprelu_ste_to_input=false). Only features whose pre-activation lands within eps/2 of their
threshold move the threshold, so eps is measured on the normalised input scale.
"""
import torch
from torch import Tensor, nn

from .base import SAE, ForwardOutput, squared_error
from .config import SAEConfig


def rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """f = z * H(z - theta), with the straight-through gradient for theta."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = (z > threshold).to(z.dtype) * grad_output
        grad_threshold = -(threshold / eps) * rectangle((z - threshold) / eps) * grad_output
        return grad_z, grad_threshold.reshape(-1, z.shape[-1]).sum(dim=0), None


class StepFunction(torch.autograd.Function):
    """H(z - theta), with the straight-through gradient for theta only."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * rectangle((z - threshold) / eps) * grad_output
        return None, grad_threshold.reshape(-1, z.shape[-1]).sum(dim=0), None


class JumpReLUSAE(SAE):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold))

    def learned_threshold(self) -> nn.Parameter:
        return self.threshold

    def pre_activation(self, x: Tensor) -> Tensor:
        return self.centered_input(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        z = self.pre_activation(x)
        return z * (z > self.threshold).to(z.dtype)

    def forward(self, x, *, dead_mask=None, l1_scale=1.0, generator=None) -> ForwardOutput:
        z = self.pre_activation(x)
        bandwidth = self.cfg.jumprelu_bandwidth
        feature_acts = JumpReLUFunction.apply(z, self.threshold, bandwidth)
        x_hat = self.decode(feature_acts)
        l0 = StepFunction.apply(z, self.threshold, bandwidth).sum(dim=-1)
        losses = {
            "mse": squared_error(x, x_hat).mean(),
            "l0_penalty": self.cfg.l0_coefficient * l1_scale * l0.mean(),
        }
        return ForwardOutput(x_hat, feature_acts, losses, sum(losses.values()))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=0.0)  # a negative threshold would let negative z through
