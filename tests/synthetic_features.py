"""Synthetic activations with known ground truth, for the SAE tests: sparse features in superposition.

Each token is offset + sum_i a_i * d_i over a few active features i, with n_features random unit
directions d_i in d_in < n_features dimensions. An SAE that works recovers the d_i as decoder rows.
"""
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SparseSuperposition:
    d_in: int = 32
    n_features: int = 64
    fire_probability: float = 0.05  # per feature and token, independently
    magnitude_range: tuple[float, float] = (0.5, 1.5)  # uniform activation size of an active feature
    offset_norm: float = 2.0  # a shared mean offset, as residual streams have
    seed: int = 0
    directions: Tensor = field(init=False)  # [n_features, d_in], unit rows
    offset: Tensor = field(init=False)  # [d_in]

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        directions = torch.randn(self.n_features, self.d_in, generator=generator)
        self.directions = directions / directions.norm(dim=1, keepdim=True)
        offset = torch.randn(self.d_in, generator=generator)
        self.offset = offset * self.offset_norm / offset.norm()

    def sample_features(self, n_tokens: int, generator: torch.Generator) -> Tensor:
        """Ground-truth feature activations [n_tokens, n_features]."""
        active = torch.rand(n_tokens, self.n_features, generator=generator) < self.fire_probability
        low, high = self.magnitude_range
        magnitudes = low + (high - low) * torch.rand(n_tokens, self.n_features, generator=generator)
        return active * magnitudes

    def sample(self, n_tokens: int, generator: torch.Generator) -> Tensor:
        """Activations [n_tokens, d_in]."""
        return self.sample_features(n_tokens, generator) @ self.directions + self.offset


def max_cosine_to_ground_truth(W_dec: Tensor, directions: Tensor) -> Tensor:
    """[n_features]: for each ground-truth direction, the best cosine similarity with a decoder row."""
    rows = W_dec / W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return (directions @ rows.T).amax(dim=1)
