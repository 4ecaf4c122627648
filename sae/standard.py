"""Standard ReLU SAE with an L1 penalty and optional ghost grads: the seed recipe (000/001).

    f     = ReLU((x - b_dec) @ W_enc + b_enc)
    x_hat = f @ W_dec + b_dec
    loss  = ||x - x_hat||^2 + lambda * ||f||_1  (+ ghost-grad loss for dead features)

Decoder rows stay unit norm (the trainer), so the L1 penalty cannot be dodged by shrinking f
and growing W_dec.
"""
import torch
from torch import Tensor, nn

from .base import SAE, ForwardOutput, squared_error
from .config import SAEConfig


class StandardSAE(SAE):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))

    def pre_activation(self, x: Tensor) -> Tensor:
        return self.centered_input(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_activation(x))

    def forward(self, x, *, dead_mask=None, l1_scale=1.0, generator=None) -> ForwardOutput:
        hidden_pre = self.pre_activation(x)
        feature_acts = torch.relu(hidden_pre)
        x_hat = self.decode(feature_acts)
        per_token_mse = squared_error(x, x_hat)
        losses = {
            "mse": per_token_mse.mean(),
            "l1": self.cfg.l1_coefficient * l1_scale * feature_acts.sum(dim=-1).mean(),
        }
        if self.cfg.use_ghost_grads and dead_mask is not None:
            losses["ghost_grad"] = self.ghost_grad_loss(x, x_hat, hidden_pre, per_token_mse, dead_mask)
        return ForwardOutput(x_hat, feature_acts, losses, sum(losses.values()))

    def ghost_grad_loss(
        self, x: Tensor, x_hat: Tensor, hidden_pre: Tensor, per_token_mse: Tensor, dead_mask: Tensor
    ) -> Tensor:
        """Ghost grads (Anthropic, Jan 2024; SAELens v5): let dead features fit the residual.

        exp of the dead features' PRE-activations (not exp(ReLU(.)), the seed's bug, which is 1
        for every dead feature and so carries no signal about the input) through W_dec, rescaled
        to half the residual's norm, MSE against the residual, weighted per token by
        (reconstruction MSE / ghost MSE) detached so that the term has the size of the MSE.
        """
        residual = (x - x_hat).detach()
        dead_pre = hidden_pre.masked_fill(~dead_mask, float("-inf"))
        # The output is rescaled below by a detached factor, so subtracting each token's detached
        # max changes neither the value nor the gradient; it only keeps exp() finite. Live
        # features are at -inf and contribute exactly 0.
        shift = dead_pre.detach().amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0)
        ghost_out = torch.exp(dead_pre - shift) @ self.W_dec
        scale = residual.norm(dim=-1, keepdim=True) / (2 * ghost_out.norm(dim=-1, keepdim=True) + 1e-6)
        ghost_mse = squared_error(residual, ghost_out * scale.detach())
        weight = (per_token_mse / (ghost_mse + 1e-6)).detach()
        # Zero (value and gradient) when nothing is dead, without a data-dependent branch.
        return (weight * ghost_mse).mean() * dead_mask.any()
