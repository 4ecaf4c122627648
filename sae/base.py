"""The interface every SAE architecture implements, and the pieces they share."""
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import SAEConfig


@dataclass
class ForwardOutput:
    """What `SAE.forward` returns: reconstruction, feature activations and the loss terms."""

    x_hat: Tensor  # [..., d_in]
    feature_acts: Tensor  # [..., d_sae]
    losses: dict[str, Tensor]  # named scalar terms, already weighted; they sum to `loss`
    loss: Tensor


def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-token squared L2 error ||x - x_hat||^2 (summed over d_in, not averaged)."""
    return (x_hat - x).pow(2).sum(dim=-1)


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-7) -> Tensor:
    """Geometric median of the rows of `points` [n, d] by Weiszfeld iterations, in float64.

    The point minimising the summed Euclidean distance: unlike the mean, a few far outliers
    barely move it, which is why it initialises the decoder bias (Bricken et al., seed 000).
    """
    points = points.to(torch.float64)
    median = points.mean(dim=0)
    for _ in range(max_iter):
        # Clamp so that a data point sitting on the current estimate does not divide by zero.
        weights = 1.0 / (points - median).norm(dim=1).clamp(min=1e-12)
        new_median = (weights[:, None] * points).sum(dim=0) / weights.sum()
        shift = (new_median - median).norm()
        median = new_median
        if shift <= tol * (1.0 + median.norm()):
            break
    return median


class SAE(nn.Module):
    """Base class: parameters W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in], plus the
    architecture's own; the SAELens names and shapes, so that saved files load in SAELens.

    Subclasses implement `encode` and `forward`. Decoder rows (the feature directions) are kept at
    unit norm by the trainer (`after_optimizer_step`) when `unit_norm_decoder` is true.
    `fold_input_scale` turns an SAE trained on scaled inputs into one for raw inputs.
    """

    unit_norm_decoder: bool = True

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        # Random unit feature directions; the encoder starts as the decoder's transpose, so that
        # every feature initially reads the direction it writes (dictionary_learning, OpenAI),
        # scaled to cfg.encoder_init_norm: small initial codes keep the first reconstructions
        # near b_dec instead of far beyond the data (SAELens, Anthropic April 2024).
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone().contiguous() * cfg.encoder_init_norm)
        # Tied decoder bias: subtracted before encoding, added after decoding.
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations [..., d_sae] of inputs [..., d_in] (inference: no training noise)."""
        raise NotImplementedError

    def learned_threshold(self) -> nn.Parameter | None:
        """The per-feature threshold trained by gradient (JumpReLU), which the trainer steps at its
        own rate (TrainConfig.threshold_lr_scale); None for architectures without one."""
        return None

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Reconstruction [..., d_in] of feature activations [..., d_sae]."""
        return feature_acts @ self.W_dec + self.b_dec

    def forward(
        self,
        x: Tensor,
        *,
        dead_mask: Tensor | None = None,
        l1_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> ForwardOutput:
        """Reconstruct x and compute the loss terms.

        dead_mask: [d_sae] bool, features that have not fired over the trainer's window (ghost
        grads, AuxK). l1_scale: the factor on the sparsity coefficient (L1 or L0 penalty): the
        warmup factor times the target_l0 controller's factor. generator: source of the
        normalized SAE's training noise, which is added only in training mode.
        """
        raise NotImplementedError

    def check_width(self, x: Tensor) -> None:
        """Raise a ValueError naming the expected width when x is not [..., d_in]."""
        if x.ndim == 0 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"expected activations of width d_in={self.cfg.d_in} (hook {self.cfg.hook_name}), "
                f"got shape {tuple(x.shape)}"
            )

    def centered_input(self, x: Tensor) -> Tensor:
        """x minus the decoder bias, as every architecture computes first."""
        self.check_width(x)
        return x.to(self.W_enc.dtype) - self.b_dec

    @torch.no_grad()
    def initialize_b_dec(self, sample: Tensor) -> None:
        """Set the decoder bias from a sample of activations [n, d_in], as cfg.b_dec_init says:
        their geometric median, their mean, or zeros."""
        self.check_width(sample)
        sample = sample.reshape(-1, self.cfg.d_in)
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(sample))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(sample.to(torch.float64).mean(dim=0))
        else:
            self.b_dec.zero_()

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on inputs scale * x act on x itself: afterwards encode(x) equals the
        old encode(scale * x) and decode(f) equals the old decode(f) / scale.

        (x - b_dec / s) @ (s W_enc) = (s x - b_dec) @ W_enc, so every pre-activation, and with it
        every bias, threshold, gate and magnitude (gated's r_mag scales W_enc's columns; b_gate,
        b_mag, b_enc, JumpReLU's threshold and BatchTopK's threshold compare with pre-activations
        or feature activations, which do not change), stays as it was; the decoder and its bias
        undo the scale. Decoder rows then have norm 1/s times their trained norm (1/s with a unit-norm
        decoder): fold only for export, not to continue training.
        """
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Re-establish the parameter constraints after an optimiser step: unit decoder rows (when
        `unit_norm_decoder`), plus whatever the architecture adds."""
        if self.unit_norm_decoder:
            self.normalize_decoder()

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the part of each decoder row's gradient parallel to the row: with unit rows that
        part can only change the norm, which renormalisation would undo anyway."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
