"""Loading the model as a TransformerLens `HookedTransformer`, and naming its hooks.

`--model` is either a TransformerLens model name (`gpt2`: weights from the Hugging Face hub) or a
local Hugging Face GPT-2 directory such as the one `offline/tiny_model.py` makes. Both go through
TransformerLens's own conversion and weight processing, so both end in the same kind of model.
"""

import difflib
import fnmatch
import re
from dataclasses import asdict
from pathlib import Path

import torch
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from actserve.services.build_options import WeightProcessing

# Shown when a model name is unknown; TransformerLens knows hundreds, these are the GPT-2 family.
EXAMPLE_MODEL_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")

BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.")


def load_model(
    name_or_path: str,
    *,
    device: str = "cpu",
    processing: WeightProcessing = WeightProcessing(),
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """A HookedTransformer from a TransformerLens model name or a local Hugging Face GPT-2 directory."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _load_local(path, device, processing, dtype)
    if name_or_path.lower() in tl_loading.make_model_alias_map():
        return HookedTransformer.from_pretrained(name_or_path, device=device, dtype=dtype, **asdict(processing))
    raise ValueError(
        f"model {name_or_path!r} is neither a local model directory nor a TransformerLens model name "
        f"(such as {', '.join(_similar_model_names(name_or_path))})"
    )


def _load_local(path: Path, device: str, processing: WeightProcessing, dtype: torch.dtype) -> HookedTransformer:
    """HookedTransformer.from_pretrained's steps, minus its official-name lookup, which rejects paths."""
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory (a directory with a config.json)")
    model_dir = str(path.resolve())
    model_type = AutoConfig.from_pretrained(model_dir).model_type
    if model_type != "gpt2":
        # from_pretrained adjusts the weight processing for some other architectures (post-norm,
        # logit softcap); without those adjustments only GPT-2 is known to load correctly.
        raise ValueError(f"{path} holds a {model_type!r} model; local directories must hold a GPT-2 model")
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    cfg = tl_loading.get_pretrained_model_config(
        model_dir, hf_cfg=hf_model.config.to_dict(), fold_ln=processing.fold_ln, device=device, dtype=dtype
    )
    state_dict = tl_loading.get_pretrained_state_dict(model_dir, cfg, hf_model, dtype=dtype)
    model = HookedTransformer(cfg, AutoTokenizer.from_pretrained(model_dir), move_to_device=False)
    model.load_and_process_state_dict(state_dict, **asdict(processing))
    model.move_model_modules_to_device()
    return model


def _similar_model_names(name: str) -> list[str]:
    close = difflib.get_close_matches(name.lower(), tl_loading.make_model_alias_map(), n=3)
    return list(dict.fromkeys([*close, *EXAMPLE_MODEL_NAMES]))[:5]


def hook_names(model: HookedTransformer) -> list[str]:
    """The model's hook points that record activations, in model order (embedding, blocks 0, 1, ...).

    Some hook points exist but never fire under the model's config (attn.hook_result without
    use_attn_result, hook_q_input without use_split_qkv_input...); a one-token forward pass tells
    which ones do, so that every listed hook can really be cached.
    """
    probe = torch.zeros((1, 1), dtype=torch.long, device=model.cfg.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(probe, return_type=None)
    return [name for name in model.hook_dict if name in cache]


def resolve_hooks(model: HookedTransformer, spec: str) -> list[str]:
    """Hook names from a comma list of names and fnmatch patterns (`blocks.*.hook_resid_pre`).

    The result is in model order, so blocks.10 comes after blocks.9, and has no repeats.
    """
    names = hook_names(model)
    patterns = [pattern.strip() for pattern in spec.split(",") if pattern.strip()]
    if not patterns:
        raise ValueError("no hooks given")
    selected = set()
    for pattern in patterns:
        matches = fnmatch.filter(names, pattern)
        if not matches:
            raise ValueError(f"unknown hook {pattern!r}; valid hooks are {_compact_hook_list(names)}")
        selected.update(matches)
    return [name for name in names if name in selected]


def _compact_hook_list(names: list[str]) -> str:
    """The hook names with block numbers folded into `blocks.*.`, for error messages."""
    blocks = sorted({int(match.group(1)) for match in map(BLOCK_HOOK.match, names) if match})
    folded = dict.fromkeys(BLOCK_HOOK.sub("blocks.*.", name, count=1) for name in names)
    block_range = f" (blocks 0-{blocks[-1]})" if blocks else ""
    return ", ".join(folded) + block_range


def layers_needed(hooks: list[str], n_layers: int) -> int | None:
    """The `stop_at_layer` that computes every hook in one forward pass, running no more than needed.

    A hook in blocks.L needs blocks 0..L, so L + 1 blocks; the embedding's hooks (hook_embed,
    hook_pos_embed) need none: 0 runs only the embedding. ln_final and unembed run only in a full
    forward pass, so their hooks give None: no stop.
    """
    needed = 0
    for hook in hooks:
        match = BLOCK_HOOK.match(hook)
        if match:
            layer = int(match.group(1))
            if layer >= n_layers:
                raise ValueError(f"hook {hook!r} is in block {layer}, but the model has {n_layers} blocks")
            needed = max(needed, layer + 1)
        elif not hook.startswith("hook_"):  # ln_final.*, unembed.*
            return None
    return needed
