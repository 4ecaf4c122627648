"""The offline model pieces: stdlib corpus, tiny GPT-2 and tokenizer, TransformerLens loading, hooks.

Uses conftest's session fixtures `corpus` (the stdlib docstrings) and `tiny_model` (a 2-layer
model trained briefly on it); everything runs locally with the hub switched off.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from actserve.offline.corpus import write_stdlib_corpus
from actserve.services.build_options import WeightProcessing
from actserve.services.model import hook_names, layers_needed, load_model, resolve_hooks
from actserve.offline.tiny_model import METADATA_FILE, SPECIAL_TOKEN, make_tiny_model

UNPROCESSED = WeightProcessing(
    fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
)
SAMPLE_TEXT = "Return a new list containing all items from the iterable in ascending order.\n"


@pytest.fixture(scope="module")
def small_corpus(corpus, tmp_path_factory):
    """The first few hundred stdlib documents: enough to train on for a handful of steps."""
    path = tmp_path_factory.mktemp("small-corpus") / "small.jsonl"
    with open(corpus, encoding="utf-8") as full:
        path.write_text("".join(line for _, line in zip(range(400), full)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hf_tiny(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.eval()
    return model


def tokens_of(model_dir, text: str) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return torch.tensor([[tokenizer.bos_token_id, *tokenizer(text)["input_ids"]]])


# --- corpus ------------------------------------------------------------------------------------


def test_stdlib_corpus_is_deterministic_deduplicated_prose(corpus, tmp_path):
    again = tmp_path / "again.jsonl"
    count = write_stdlib_corpus(again)
    assert again.read_bytes() == corpus.read_bytes()
    texts = [json.loads(line)["text"] for line in again.read_text(encoding="utf-8").splitlines()]
    assert count == len(texts) == len(set(texts))
    assert sum(map(len, texts)) > 1_000_000
    assert any("Return" in text and "." in text for text in texts[:50])


# --- tiny model --------------------------------------------------------------------------------


def test_tiny_model_learned_well_below_uniform(tiny_model):
    metadata = json.loads((tiny_model / METADATA_FILE).read_text())
    assert metadata["steps"] == metadata["settings"]["max_steps"]
    assert metadata["heldout_loss"] < 0.8 * math.log(metadata["settings"]["vocab_size"])


def test_tokenizer_round_trips(tiny_model):
    saved = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    loaded = AutoTokenizer.from_pretrained(tiny_model)
    text = "Décodé: naïve café ✓ — def f(x):\n\treturn x ** 2  # 🙂"
    ids = loaded(text)["input_ids"]
    assert ids == saved.encode(text).ids
    assert loaded.decode(ids) == text
    special = saved.token_to_id(SPECIAL_TOKEN)
    assert loaded.bos_token_id == loaded.eos_token_id == special
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == special
    assert config["vocab_size"] == len(loaded)


def test_same_seed_same_weights_and_reuse(small_corpus, tmp_path):
    settings = dict(n_layers=1, d_model=32, n_heads=2, n_ctx=32, vocab_size=300, max_steps=4, batch_size=4,
                    corpus_path=small_corpus, progress=False)
    first = make_tiny_model(tmp_path / "a", seed=3, **settings)
    second = make_tiny_model(tmp_path / "b", seed=3, **settings)
    other_seed = make_tiny_model(tmp_path / "c", seed=4, **settings)
    weights = [load_file(tmp_path / name / "model.safetensors") for name in "abc"]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert not torch.equal(weights[0]["transformer.wte.weight"], weights[2]["transformer.wte.weight"])
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert first["train_loss"] == second["train_loss"] != other_seed["train_loss"]

    reused = make_tiny_model(tmp_path / "a", seed=3, **settings)
    assert reused["reused"] and reused["heldout_loss"] == first["heldout_loss"]


def test_time_budget_instead_of_steps(small_corpus, tmp_path):
    result = make_tiny_model(tmp_path / "timed", n_layers=1, d_model=32, n_heads=2, n_ctx=32, vocab_size=300,
                             train_seconds=0.5, batch_size=4, corpus_path=small_corpus, progress=False)
    assert result["settings"]["max_steps"] is None and result["steps"] > 0
    assert 0.5 <= result["seconds"] < 5


# --- load_model --------------------------------------------------------------------------------


def test_local_directory_loads_as_hooked_transformer_matching_hf(tiny_model, hf_tiny):
    model = load_model(str(tiny_model))
    assert isinstance(model, HookedTransformer)
    assert model.cfg.normalization_type == "LNPre"  # fold_ln applied, as from_pretrained does
    tokens = tokens_of(tiny_model, SAMPLE_TEXT)
    with torch.no_grad():
        expected = hf_tiny(tokens).logits.log_softmax(-1)
        # center_unembed shifts every logit of a position by one constant: compare log-probabilities.
        got = model(tokens).log_softmax(-1)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        loss = model(tokens, return_type="loss").item()
    assert loss == pytest.approx(hf_tiny(tokens, labels=tokens).loss.item(), abs=1e-4)
    assert loss < 0.8 * math.log(model.cfg.d_vocab)


def test_unprocessed_weights_give_the_hf_logits_exactly(tiny_model, hf_tiny):
    model = load_model(str(tiny_model), processing=UNPROCESSED)
    assert model.cfg.normalization_type == "LN"
    tokens = tokens_of(tiny_model, SAMPLE_TEXT)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_tiny(tokens).logits, atol=1e-4, rtol=1e-4)


def test_model_tokenizer_is_the_saved_one(tiny_model):
    model = load_model(str(tiny_model))
    assert model.to_tokens(SAMPLE_TEXT).tolist() == tokens_of(tiny_model, SAMPLE_TEXT).tolist()
    assert model.tokenizer.bos_token == SPECIAL_TOKEN


@pytest.mark.parametrize(
    "name, message",
    [
        ("gtp2", "gpt2"),  # a misspelt hub name lists real ones
        ("no/such/model-dir", "neither a local model directory nor a TransformerLens model name"),
    ],
)
def test_unknown_model_is_one_clear_line(name, message):
    with pytest.raises(ValueError, match=message) as error:
        load_model(name)
    assert "\n" not in str(error.value) and len(str(error.value)) < 300


def test_path_that_is_not_a_model_directory(tiny_model, tmp_path):
    for not_a_model in (tmp_path, tiny_model / "config.json"):
        with pytest.raises(ValueError, match="not a Hugging Face model directory"):
            load_model(str(not_a_model))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="must hold a GPT-2 model"):
        load_model(str(tmp_path))


# --- hooks -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twelve_layers():
    """Random weights are enough for hook names; 12 layers put blocks.10 after blocks.9."""
    cfg = HookedTransformerConfig(n_layers=12, d_model=8, n_ctx=4, d_head=4, n_heads=2, d_vocab=10, act_fn="gelu")
    return HookedTransformer(cfg)


def test_patterns_resolve_in_layer_order(twelve_layers):
    resid = resolve_hooks(twelve_layers, "blocks.*.hook_resid_pre")
    assert resid == [f"blocks.{layer}.hook_resid_pre" for layer in range(12)]
    mixed = resolve_hooks(twelve_layers, " blocks.10.hook_mlp_out, hook_embed,blocks.2.hook_resid_post,hook_embed ")
    assert mixed == ["hook_embed", "blocks.2.hook_resid_post", "blocks.10.hook_mlp_out"]
    assert resolve_hooks(twelve_layers, "blocks.1?.hook_resid_pre") == ["blocks.10.hook_resid_pre", "blocks.11.hook_resid_pre"]


def test_unknown_hook_names_it_and_lists_valid_ones_compactly(twelve_layers):
    with pytest.raises(ValueError) as error:
        resolve_hooks(twelve_layers, "blocks.*.hook_resid_pre,blocks.12.hook_resid_pre")
    message = str(error.value)
    assert "'blocks.12.hook_resid_pre'" in message and "blocks.*.hook_resid_pre" in message
    assert "blocks.3." not in message and "(blocks 0-11)" in message
    with pytest.raises(ValueError, match="no hooks"):
        resolve_hooks(twelve_layers, " , ")


def test_only_hooks_that_fire_are_listed(twelve_layers):
    names = hook_names(twelve_layers)
    assert "blocks.0.hook_resid_pre" in names and "ln_final.hook_normalized" in names
    # present in hook_dict, but computed only with cfg.use_attn_result
    assert "blocks.0.attn.hook_result" in twelve_layers.hook_dict and "blocks.0.attn.hook_result" not in names
    with pytest.raises(ValueError, match="hook_result"):
        resolve_hooks(twelve_layers, "blocks.0.attn.hook_result")


def test_layers_needed_is_the_stop_at_layer_that_computes_every_hook(twelve_layers):
    assert layers_needed(["hook_embed", "hook_pos_embed"], 12) == 0
    assert layers_needed(["hook_embed", "blocks.9.hook_resid_pre", "blocks.10.hook_resid_pre"], 12) == 11
    assert layers_needed(["blocks.0.hook_resid_pre", "ln_final.hook_normalized"], 12) is None
    with pytest.raises(ValueError, match="12 blocks"):
        layers_needed(["blocks.12.hook_resid_pre"], 12)

    hooks = resolve_hooks(twelve_layers, "hook_embed,blocks.4.hook_resid_post,blocks.7.attn.hook_z")
    tokens = torch.tensor([[1, 2, 3]])
    _, full = twelve_layers.run_with_cache(tokens, names_filter=hooks)
    _, stopped = twelve_layers.run_with_cache(tokens, names_filter=hooks, stop_at_layer=layers_needed(hooks, 12))
    assert set(stopped.keys()) == set(hooks)
    for hook in hooks:
        torch.testing.assert_close(stopped[hook], full[hook])
