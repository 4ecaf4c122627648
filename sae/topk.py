"""TopK SAE (Gao et al., OpenAI 2024): keep the k largest pre-activations, no L1 penalty.

    z     = ReLU(TopK_k((x - b_dec) @ W_enc + b_enc))
    x_hat = z @ W_dec + b_dec
    loss  = ||x - x_hat||^2 + alpha * AuxK

AuxK revives dead latents: the k_aux largest pre-activations among latents dead over the
trainer's window reconstruct the residual e = x - x_hat (detached) through W_dec without bias,
    AuxK = ||e - ReLU(TopK_k_aux(dead pre-activations)) @ W_dec||^2,
scaled down by min(n_dead / k_aux, 1) when few latents are dead (as EleutherAI's sparsify and
SAELens do), so that a handful of dead latents do not carry the full weight.
"""
import torch
from torch import Tensor, nn

from .base import SAE, ForwardOutput, squared_error
from .config import SAEConfig


def keep_top_k(pre_acts: Tensor, k: int) -> Tensor:
    """ReLU of the k largest entries along the last dimension, zeros elsewhere."""
    top = pre_acts.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_acts).scatter_(-1, top.indices, torch.relu(top.values))


class TopKSAE(SAE):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))

    def pre_activation(self, x: Tensor) -> Tensor:
        return self.centered_input(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        return keep_top_k(self.pre_activation(x), self.cfg.k)

    def forward(self, x, *, dead_mask=None, l1_scale=1.0, generator=None) -> ForwardOutput:
        hidden_pre = self.pre_activation(x)
        feature_acts = keep_top_k(hidden_pre, self.cfg.k)
        x_hat = self.decode(feature_acts)
        losses = {"mse": squared_error(x, x_hat).mean()}
        if dead_mask is not None and self.cfg.auxk_coefficient > 0:
            losses["auxk"] = self.cfg.auxk_coefficient * self.auxk_loss(x, x_hat, hidden_pre, dead_mask)
        return ForwardOutput(x_hat, feature_acts, losses, sum(losses.values()))

    def auxk_loss(self, x: Tensor, x_hat: Tensor, hidden_pre: Tensor, dead_mask: Tensor) -> Tensor:
        return auxk_loss(self, x, x_hat, hidden_pre, dead_mask)


def auxk_loss(sae: SAE, x: Tensor, x_hat: Tensor, hidden_pre: Tensor, dead_mask: Tensor) -> Tensor:
    """The AuxK loss above (unweighted), shared with the BatchTopK SAE."""
    k_aux = sae.cfg.auxk_latents
    residual = (x - x_hat).detach()
    # Live latents sit at -inf, so when fewer than k_aux are dead the extra picks are -inf,
    # which ReLU turns into exact zeros (no value, no gradient).
    dead_pre = hidden_pre.masked_fill(~dead_mask, float("-inf"))
    residual_hat = keep_top_k(dead_pre, k_aux) @ sae.W_dec
    scale = (dead_mask.sum() / k_aux).clamp(max=1.0)
    return scale * squared_error(residual, residual_hat).mean()
