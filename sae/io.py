"""Save and load SAEs in SAELens's directory layout, which `sae_lens.SAE.load_from_disk` reads:

    cfg.json                 architecture, d_in, d_sae, dtype, ..., metadata {hook_name, model_name,
                             context_size, prepend_bos, sae_lens_version}, plus our SAEConfig fields
    sae_weights.safetensors  W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in], and
                             standard/topk/normalized: b_enc; gated: b_gate, r_mag, b_mag;
                             jumprelu/batchtopk: b_enc, threshold [d_sae]
    sparsity.safetensors     {"sparsity": log10 feature density [d_sae]}, when given

Notes on SAELens 6.x, read from its source:
- Every architecture here subtracts b_dec before encoding, so cfg.json says
  apply_b_dec_to_input=true (SAELens skips the subtraction when it is false), with no input
  normalization and no hook_z reshaping.
- topk: SAELens reads `k` from cfg.json; rescale_acts_by_decoder_norm=false, because our decoder
  rows are already unit norm and the TopK selection must see the same numbers as ours.
- SAELens reads a cfg.json whose metadata lacks sae_lens_version >= 6.0 through its pre-6.0
  converter, which ignores the nested metadata; we therefore write the layout version "6.0.0".
- batchtopk: at inference a BatchTopK SAE is a JumpReLU with one threshold for every feature;
  SAELens saves its own as architecture "jumprelu" with a `threshold` tensor, and so do we, with
  "trained_architecture": "batchtopk" in cfg.json so that `load_sae` gives back a BatchTopKSAE.
- Loading in SAELens is strict: exactly these tensors, no more, no fewer.
- "normalized" is our own architecture name; SAELens has no such class and will not load it.
Unknown keys are ignored by SAELens, which is where our loss settings (l1_coefficient, ...) go.
"""
import json
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from .base import SAE
from .build import build_sae
from .config import SAEConfig

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
SAELENS_LAYOUT_VERSION = "6.0.0"
METADATA_KEYS = ("hook_name", "model_name", "context_size", "prepend_bos")
REQUIRED_KEYS = ("architecture", "d_in", "d_sae", "hook_name")
# SAELens options with another meaning than our maths, and the only value we can load.
SUPPORTED_OPTIONS = {
    "apply_b_dec_to_input": True,
    "normalize_activations": "none",
    "reshape_activations": "none",
    "rescale_acts_by_decoder_norm": False,
}


INFERENCE_ARCHITECTURE = {"batchtopk": "jumprelu"}  # ours -> the SAELens class that runs it


def sae_lens_config(cfg: SAEConfig) -> dict:
    """The cfg.json dictionary for an SAE with this config."""
    settings = {key: value for key, value in asdict(cfg).items() if value is not None}
    metadata = {key: settings.pop(key) for key in METADATA_KEYS}
    if cfg.architecture in INFERENCE_ARCHITECTURE:
        settings["trained_architecture"] = cfg.architecture
        settings["architecture"] = INFERENCE_ARCHITECTURE[cfg.architecture]
    return {
        **settings,
        "dtype": "float32",
        "device": "cpu",
        **SUPPORTED_OPTIONS,
        "metadata": {**metadata, "sae_lens_version": SAELENS_LAYOUT_VERSION},
    }


def config_from_sae_lens(raw: dict, source: str = CFG_FILENAME) -> SAEConfig:
    """Our SAEConfig from a cfg.json dictionary; ValueError naming `source` when it cannot be."""
    known = {field.name for field in fields(SAEConfig)}
    metadata = raw.get("metadata") or {}
    # SAELens leaves unknown metadata as null; let our defaults stand in for it.
    settings = {key: value for key, value in {**raw, **metadata}.items() if key in known and value is not None}
    if raw.get("trained_architecture") in INFERENCE_ARCHITECTURE:
        settings["architecture"] = raw["trained_architecture"]
    missing = [key for key in REQUIRED_KEYS if key not in settings]
    if missing:
        raise ValueError(
            f"{source} is missing {missing}: expected an SAE config in SAELens 6 layout "
            "(architecture, d_in, d_sae at the top level, hook_name under metadata)"
        )
    unsupported = {key: raw[key] for key, value in SUPPORTED_OPTIONS.items() if key in raw and raw[key] != value}
    if unsupported:
        raise ValueError(f"{source} uses SAELens options this library does not implement: {unsupported}")
    try:
        return SAEConfig(**settings)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error


def sae_files(sae: SAE, log10_feature_density: Tensor | None = None) -> dict[str, bytes]:
    """The contents of `sae`'s directory in SAELens's layout: {file name: bytes}."""
    weights = {name: tensor.detach().float().cpu().contiguous() for name, tensor in sae.state_dict().items()}
    files = {
        CFG_FILENAME: json.dumps(sae_lens_config(sae.cfg), indent=2).encode(),
        WEIGHTS_FILENAME: save(weights),
    }
    if log10_feature_density is not None:
        if log10_feature_density.shape != (sae.cfg.d_sae,):
            raise ValueError(
                f"log10_feature_density must have shape [{sae.cfg.d_sae}], got {tuple(log10_feature_density.shape)}"
            )
        files[SPARSITY_FILENAME] = save({"sparsity": log10_feature_density.detach().float().cpu().contiguous()})
    return files


def save_sae(sae: SAE, path: str | Path, log10_feature_density: Tensor | None = None) -> None:
    """Write `sae` to the directory `path` (created if needed) in SAELens's layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in sae_files(sae, log10_feature_density).items():
        (path / name).write_bytes(data)


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE from a directory in SAELens's layout (ours, or SAELens's own standard, gated,
    topk and jumprelu files; its BatchTopK files are jumprelu), as float32, in eval mode."""
    path = Path(path)
    cfg = config_from_sae_lens(json.loads((path / CFG_FILENAME).read_text()), str(path / CFG_FILENAME))
    sae = build_sae(cfg)
    weights = load_file(path / WEIGHTS_FILENAME)
    expected = sae.state_dict().keys()
    if weights.keys() != expected:
        raise ValueError(
            f"{path / WEIGHTS_FILENAME} does not hold the tensors of a {cfg.architecture} SAE: "
            f"missing {sorted(expected - weights.keys())}, unexpected {sorted(weights.keys() - expected)}"
        )
    sae.load_state_dict({name: tensor.float() for name, tensor in weights.items()})
    return sae.to(device).eval()


def load_log10_feature_density(path: str | Path) -> Tensor | None:
    """The log10 feature density saved with an SAE, or None when the directory has none."""
    sparsity_path = Path(path) / SPARSITY_FILENAME
    return load_file(sparsity_path)["sparsity"] if sparsity_path.exists() else None
