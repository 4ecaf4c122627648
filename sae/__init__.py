"""Sparse autoencoders in pure torch: standard (L1; the seed recipe with ghost grads as
`SAEConfig.seed_recipe`), gated, TopK, BatchTopK, JumpReLU and normalized SAEs behind one
interface, a trainer with a target-L0 controller, streaming metrics and SAELens-compatible files.
Defaults assume inputs scaled to E||x||^2 = d_in; `SAE.fold_input_scale` makes the result act on
raw activations.

    from actserve.sae import SAEConfig, TrainConfig, Trainer, build_sae, save_sae
    cfg = SAEConfig("jumprelu", d_in=768, d_sae=24576, hook_name="blocks.8.hook_resid_pre", target_l0=40)
    sae = build_sae(cfg, seed=0)
"""
from .base import SAE, ForwardOutput, geometric_median
from .batchtopk import BatchTopKSAE
from .build import SAE_CLASSES, build_sae
from .config import ARCHITECTURES, SAEConfig
from .gated import GatedSAE
from .io import load_log10_feature_density, load_sae, sae_files, save_sae
from .jumprelu import JumpReLUSAE
from .metrics import (
    StreamingMetrics,
    decoder_max_cosine_similarity,
    histogram,
    plot_log10_feature_density,
)
from .normalized import NormalizedSAE
from .standard import StandardSAE
from .topk import TopKSAE
from .train import L0Controller, TrainConfig, Trainer

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "BatchTopKSAE",
    "SAE_CLASSES",
    "ForwardOutput",
    "GatedSAE",
    "JumpReLUSAE",
    "L0Controller",
    "NormalizedSAE",
    "SAEConfig",
    "StandardSAE",
    "StreamingMetrics",
    "TopKSAE",
    "TrainConfig",
    "Trainer",
    "build_sae",
    "decoder_max_cosine_similarity",
    "geometric_median",
    "histogram",
    "load_log10_feature_density",
    "load_sae",
    "plot_log10_feature_density",
    "sae_files",
    "save_sae",
]
