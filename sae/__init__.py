"""Sparse autoencoders in pure torch: standard (seed recipe, ghost grads), gated, TopK and
normalized SAEs behind one interface, a trainer, streaming metrics and SAELens-compatible files.

    from sae import SAEConfig, TrainConfig, Trainer, build_sae
    sae = build_sae(SAEConfig("standard", d_in=768, d_sae=24576, hook_name="blocks.8.hook_resid_pre"))
"""
from .base import SAE, ForwardOutput, geometric_median
from .build import SAE_CLASSES, build_sae
from .config import ARCHITECTURES, SAEConfig
from .gated import GatedSAE
from .io import load_log10_feature_density, load_sae, sae_files, save_sae
from .metrics import (
    StreamingMetrics,
    decoder_max_cosine_similarity,
    histogram,
    plot_log10_feature_density,
)
from .normalized import NormalizedSAE
from .standard import StandardSAE
from .synthetic import SparseSuperposition, max_cosine_to_ground_truth
from .topk import TopKSAE
from .train import TrainConfig, Trainer

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "SAE_CLASSES",
    "ForwardOutput",
    "GatedSAE",
    "NormalizedSAE",
    "SAEConfig",
    "SparseSuperposition",
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
    "max_cosine_to_ground_truth",
    "plot_log10_feature_density",
    "sae_files",
    "save_sae",
]
