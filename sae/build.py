"""build_sae: the SAE a config describes."""
import torch

from .base import SAE
from .config import SAEConfig
from .gated import GatedSAE
from .normalized import NormalizedSAE
from .standard import StandardSAE
from .topk import TopKSAE

SAE_CLASSES: dict[str, type[SAE]] = {
    "standard": StandardSAE,
    "gated": GatedSAE,
    "topk": TopKSAE,
    "normalized": NormalizedSAE,
}


def build_sae(cfg: SAEConfig, *, seed: int = 0, device: str | torch.device = "cpu") -> SAE:
    """A freshly initialised SAE (float32). Initialised on the CPU from `seed`, then moved, so the
    same seed gives the same weights on every device."""
    generator = torch.Generator().manual_seed(seed)
    return SAE_CLASSES[cfg.architecture](cfg, generator).to(device)
