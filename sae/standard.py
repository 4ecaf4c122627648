"""Standard ReLU SAE with an L1 penalty, in two forms (`SAEConfig.unit_norm_decoder`).

    f     = ReLU((x - b_dec) @ W_enc + b_enc)
    x_hat = f @ W_dec + b_dec

April 2024 form (unit_norm_decoder=False, the default; Anthropic's circuits update, SAELens 6):
    loss  = ||x - x_hat||^2 + lambda * sum_i f_i ||d_i||      d_i = W_dec[i], a free parameter
Weighting each activation by its decoder row's norm makes the penalty invariant to moving scale
between f_i and d_i (f_i -> f_i / c, d_i -> c d_i leaves x_hat and the penalty unchanged), so no
norm constraint is needed, and the optimiser can use the row norm as one more degree of freedom.
Rows start at norm `encoder_init_norm` (0.1) with W_enc = W_dec^T exactly.

Seed form (unit_norm_decoder=True, `SAEConfig.seed_recipe`, 000/001):
    loss  = ||x - x_hat||^2 + lambda * ||f||_1  (+ ghost-grad loss for dead features)
with decoder rows renormalised to unit norm after every step (the trainer, which also removes the
gradient's component parallel to each row), so the L1 penalty cannot be dodged by shrinking f and
growing W_dec; with unit rows the two penalties are equal.

Inference is the same maths in both forms (SAELens's StandardSAE with
rescale_acts_by_decoder_norm=false), so either saves and loads in SAELens unchanged.
"""
import torch
from torch import Tensor, nn

from .base import SAE, ForwardOutput, squared_error
from .config import SAEConfig


class StandardSAE(SAE):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.unit_norm_decoder = bool(cfg.unit_norm_decoder)
        if not self.unit_norm_decoder:
            # SAELens's decoder_init_norm: rows at norm encoder_init_norm, W_enc their exact transpose.
            with torch.no_grad():
                self.W_dec.mul_(cfg.encoder_init_norm)
                self.W_enc.copy_(self.W_dec.T)

    def pre_activation(self, x: Tensor) -> Tensor:
        return self.centered_input(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_activation(x))

    def forward(self, x, *, dead_mask=None, l1_scale=1.0, generator=None) -> ForwardOutput:
        hidden_pre = self.pre_activation(x)
        feature_acts = torch.relu(hidden_pre)
        x_hat = self.decode(feature_acts)
        per_token_mse = squared_error(x, x_hat)
        if self.unit_norm_decoder:
            l1 = feature_acts.sum(dim=-1)
        else:
            l1 = feature_acts @ self.W_dec.norm(dim=1)
        losses = {
            "mse": per_token_mse.mean(),
            "l1": self.cfg.l1_coefficient * l1_scale * l1.mean(),
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
