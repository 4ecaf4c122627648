"""BatchTopK SAE (Bussmann et al. 2024): TopK over the whole batch instead of per token.

Training, on a batch of B tokens:
    z     = ReLU((x - b_dec) @ W_enc + b_enc)                       [B, d_sae]
    f     = z where z is among the k * B largest entries of the batch, else 0
    x_hat = f @ W_dec + b_dec
    loss  = ||x - x_hat||^2 + alpha * AuxK                             (AuxK as in the TopK SAE)
so L0 is k on average over the batch, but varies per token. The selection depends on the batch,
so inference uses a fixed threshold instead: theta is an exponential moving average (rate
`topk_threshold_lr`) of the smallest activation kept in each training batch, and
    f = z * H(z - theta)
which is a JumpReLU with the same threshold for every feature. That is how SAELens saves it
(architecture "jumprelu" with a `threshold` tensor), and how `save_sae` writes it. The threshold
is stored as a [d_sae] buffer (every entry equal) in float32, so that the state dict is already the
JumpReLU layout.
"""
import torch
from torch import Tensor, nn

from .base import SAE, ForwardOutput, squared_error
from .config import SAEConfig
from .topk import auxk_loss


def keep_batch_top_k(acts: Tensor, k: float) -> Tensor:
    """The int(k * n_tokens) largest entries of the non-negative acts [..., d_sae], zeros elsewhere."""
    flat = acts.flatten()
    n_keep = min(int(k * acts[..., 0].numel()), flat.numel())
    top = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter_(0, top.indices, top.values).reshape(acts.shape)


class BatchTopKSAE(SAE):
    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__(cfg, generator)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))

    def pre_activation(self, x: Tensor) -> Tensor:
        return self.centered_input(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        z = self.pre_activation(x)
        return z * (z > self.threshold).to(z.dtype)

    def forward(self, x, *, dead_mask=None, l1_scale=1.0, generator=None) -> ForwardOutput:
        hidden_pre = self.pre_activation(x)
        feature_acts = keep_batch_top_k(torch.relu(hidden_pre), self.cfg.k)
        if self.training:
            self.update_threshold(feature_acts.detach())
        x_hat = self.decode(feature_acts)
        losses = {"mse": squared_error(x, x_hat).mean()}
        if dead_mask is not None and self.cfg.auxk_coefficient > 0:
            losses["auxk"] = self.cfg.auxk_coefficient * auxk_loss(self, x, x_hat, hidden_pre, dead_mask)
        return ForwardOutput(x_hat, feature_acts, losses, sum(losses.values()))

    @torch.no_grad()
    def update_threshold(self, kept: Tensor) -> None:
        positive = kept[kept > 0]
        if positive.numel():
            rate = self.cfg.topk_threshold_lr
            self.threshold.mul_(1 - rate).add_(rate * positive.min())
