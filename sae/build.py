"""build_sae: the SAE a config describes."""
import torch

from .base import SAE
from .batchtopk import BatchTopKSAE
from .config import SAEConfig
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .normalized import NormalizedSAE
from .standard import StandardSAE
from .topk import TopKSAE

SAE_CLASSES: dict[str, type[SAE]] = {
    "standard": StandardSAE,
    "gated": GatedSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "normalized": NormalizedSAE,
}


def build_sae(cfg: SAEConfig, *, seed: int = 0, device: str | torch.device = "cpu") -> SAE:
    """A freshly initialised SAE (float32). Its initial weights are a function of `seed` alone:
    initialised on the CPU from a generator seeded with it, then moved, so the same seed gives the
    same weights on every device."""
    generator = torch.Generator().manual_seed(seed)
    return SAE_CLASSES[cfg.architecture](cfg, generator).to(device)
