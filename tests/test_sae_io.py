"""Files in SAELens's layout: SAELens loads ours, we load ours and SAELens's; configs are validated."""
import json

import pytest
import sae_lens
import torch
from safetensors.torch import load_file
from sae_lens.saes.sae import SAEMetadata

from actserve.sae import SAEConfig, TrainConfig, build_sae, load_log10_feature_density, load_sae, save_sae

SETTINGS = {
    "standard": dict(l1_coefficient=0.01, use_ghost_grads=True),
    "gated": dict(l1_coefficient=0.01),
    "topk": dict(k=7),
    "batchtopk": dict(k=7),
    "jumprelu": dict(l0_coefficient=0.5),
    "normalized": dict(l1_coefficient=0.001, input_mean_norm=5.0),
}


def trained_looking_sae(architecture):
    """An SAE whose every parameter is perturbed off its initial value (biases are zero at init,
    which would hide a mishandled bias), decoder rows still unit norm."""
    cfg = SAEConfig(
        architecture, d_in=24, d_sae=96, hook_name="blocks.3.hook_resid_post", context_size=64, **SETTINGS[architecture]
    )
    sae = build_sae(cfg, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter += 0.1 * torch.randn(parameter.shape, generator=generator)
        if hasattr(sae, "threshold"):  # JumpReLU's parameter, BatchTopK's buffer: positive, as trained
            sae.threshold.copy_(0.05 + 0.1 * torch.rand(sae.threshold.shape, generator=generator))
            if architecture == "batchtopk":  # one threshold shared by every feature
                sae.threshold.fill_(float(sae.threshold[0]))
        if sae.unit_norm_decoder:
            sae.normalize_decoder()
    return sae.eval()


def activations(n=200):
    return 0.5 + torch.randn(n, 24, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("architecture", ["standard", "gated", "topk", "jumprelu", "batchtopk"])
def test_saelens_loads_our_files_with_the_same_activations(tmp_path, architecture):
    ours = trained_looking_sae(architecture)
    save_sae(ours, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    # A BatchTopK SAE runs as a JumpReLU at inference, in SAELens as here.
    assert theirs.cfg.architecture() == ("jumprelu" if architecture == "batchtopk" else architecture)
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert theirs.cfg.metadata.context_size == 64
    x = activations()
    with torch.no_grad():
        our_acts, their_acts = ours.encode(x), theirs.encode(x)
        assert (our_acts > 0).float().mean() > 0.05  # features do fire: the check is not vacuous
        torch.testing.assert_close(their_acts, our_acts, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs.decode(their_acts), ours.decode(our_acts), atol=1e-5, rtol=0)
    if architecture == "topk":
        assert theirs.cfg.k == 7


@pytest.mark.parametrize("unit_norm_decoder", [False, True])
def test_standard_sae_in_either_form_loads_in_saelens_with_the_same_activations(tmp_path, unit_norm_decoder):
    cfg = SAEConfig("standard", d_in=24, d_sae=96, hook_name="h", unit_norm_decoder=unit_norm_decoder)
    ours = build_sae(cfg, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter += 0.1 * torch.randn(parameter.shape, generator=generator)
        # April 2024 form: row norms spread as after training (here 0.1 to 2); seed form: unit.
        ours.W_dec *= (0.1 + 1.9 * torch.rand(96, 1, generator=generator)) / ours.W_dec.norm(dim=1, keepdim=True)
        if unit_norm_decoder:
            ours.normalize_decoder()
    ours.eval()
    save_sae(ours, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert not theirs.cfg.to_dict().get("rescale_acts_by_decoder_norm", False)
    x = activations()
    with torch.no_grad():
        our_acts, their_acts = ours.encode(x), theirs.encode(x)
        assert (our_acts > 0).float().mean() > 0.05
        torch.testing.assert_close(their_acts, our_acts, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs.decode(their_acts), ours.decode(our_acts), atol=1e-5, rtol=0)
        # Folding the input scale keeps SAELens's and our inference equal on raw inputs too.
        s = 0.4
        ours.fold_input_scale(s)
        save_sae(ours, tmp_path / "folded")
        folded = sae_lens.SAE.load_from_disk(tmp_path / "folded")
        torch.testing.assert_close(folded.encode(x / s), their_acts, atol=1e-5, rtol=0)
        torch.testing.assert_close(folded.decode(their_acts), theirs.decode(their_acts) / s, atol=1e-5, rtol=0)
    assert load_sae(tmp_path).cfg.unit_norm_decoder is unit_norm_decoder


@pytest.mark.parametrize("architecture", list(SETTINGS))
def test_our_files_load_back_identically(tmp_path, architecture):
    ours = trained_looking_sae(architecture)
    density = torch.linspace(-10, -1, 96)
    save_sae(ours, tmp_path, log10_feature_density=density)
    loaded = load_sae(tmp_path)
    assert loaded.cfg == ours.cfg
    assert not loaded.training
    for name, tensor in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    torch.testing.assert_close(load_log10_feature_density(tmp_path), density)
    assert load_file(tmp_path / "sparsity.safetensors").keys() == {"sparsity"}


def test_normalized_files_keep_the_layout_under_our_own_architecture_name(tmp_path):
    save_sae(trained_looking_sae("normalized"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "normalized"
    assert cfg["input_mean_norm"] == 5.0 and cfg["noise_std"] == 1.0
    assert load_file(tmp_path / "sae_weights.safetensors").keys() == {"W_enc", "W_dec", "b_enc", "b_dec"}


def test_we_load_a_batchtopk_sae_saved_by_saelens_as_jumprelu(tmp_path):
    cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=24, d_sae=96, k=5, metadata=SAEMetadata(hook_name="h"))
    theirs = sae_lens.BatchTopKTrainingSAE(cfg)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter += 0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3))
        theirs.topk_threshold.fill_(0.1)
    theirs.save_inference_model(tmp_path)
    ours = load_sae(tmp_path)
    assert ours.cfg.architecture == "jumprelu"
    inference = sae_lens.SAE.load_from_disk(tmp_path)
    x = activations()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), inference.encode(x), atol=1e-5, rtol=0)


def test_we_load_a_standard_sae_saved_by_saelens(tmp_path):
    cfg = sae_lens.StandardSAEConfig(d_in=24, d_sae=96, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_pre"))
    theirs = sae_lens.StandardSAE(cfg)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter += 0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3))
    theirs.save_model(tmp_path)
    ours = load_sae(tmp_path)
    x = activations()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-5, rtol=0)


def test_cfg_json_from_another_tool_is_a_clear_error(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 768, "dict_size": 24576, "hookpoint": "layers.8"}))
    with pytest.raises(ValueError, match=r"cfg.json is missing \['architecture', 'd_sae', 'hook_name'\]"):
        load_sae(tmp_path)


def test_cfg_json_with_options_we_do_not_implement_is_a_clear_error(tmp_path):
    save_sae(trained_looking_sae("standard"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(ValueError, match="does not implement: {'normalize_activations': 'layer_norm'}"):
        load_sae(tmp_path)


def test_weights_of_another_architecture_are_a_clear_error(tmp_path):
    save_sae(trained_looking_sae("gated"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "standard"}))
    with pytest.raises(ValueError, match=r"missing \['b_enc'\], unexpected \['b_gate', 'b_mag', 'r_mag'\]"):
        load_sae(tmp_path)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(architecture="sparse"), "architecture must be one of"),
        (dict(d_sae=0), "d_sae must be a positive int"),
        (dict(hook_name=""), "hook_name must name the hook"),
        (dict(architecture="topk"), "topk needs an int k"),
        (dict(architecture="topk", k=200), "1 <= k <= d_sae=96"),
        (dict(k=4), "k and k_aux apply to the topk and batchtopk SAEs only"),
        (dict(architecture="gated", use_ghost_grads=True), "use_ghost_grads applies to the standard SAE only"),
        (dict(architecture="normalized"), "the normalized SAE needs input_mean_norm > 0"),
        (dict(l1_coefficient=-1.0), "l1_coefficient must be >= 0"),
        (dict(architecture="gated", unit_norm_decoder=True), "unit_norm_decoder applies to the standard SAE only"),
    ],
)
def test_config_validation(settings, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(**{"architecture": "standard", "d_in": 24, "d_sae": 96, "hook_name": "h", **settings})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(lr=0.0), "lr must be > 0"),
        (dict(lr_warmup_steps=10, total_steps=10), "total_steps must be > lr_warmup_steps=10"),
        (dict(lr_decay="exponential"), "lr_decay must be one of"),
        (dict(autocast_dtype="float8"), "autocast_dtype must be None or one of"),
        (dict(dead_feature_window=0), "dead_feature_window must be >= 1"),
        (dict(target_l0_proportional_gain=-1.0), "target_l0_gain and target_l0_proportional_gain must be >= 0"),
        (dict(target_l0_reference=0.0), "target_l0_reference must be None or > 0"),
    ],
)
def test_train_config_validation(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)
