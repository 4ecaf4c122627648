"""The CE-recovered evaluator on a real cache of the tiny model."""
from __future__ import annotations

import json

import pytest
import torch

from actserve.clients.evaluator import EvalOptions, evaluate, logits_from
from actserve.sae import SAEConfig, build_sae, save_sae
from actserve.cli import main as cli_main

HOOK = "blocks.1.hook_resid_pre"


def save_linear_sae(path, manifest, identity: bool):
    """A standard SAE that reconstructs x exactly (relu(x) - relu(-x)) or outputs zeros."""
    d = manifest.d_model
    sae = build_sae(SAEConfig("standard", d_in=d, d_sae=2 * d, hook_name=HOOK, context_size=manifest.config.context_size))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0) if identity else torch.zeros(2 * d, d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    save_sae(sae, path)
    return path


@pytest.fixture(scope="module")
def identity_and_zero(tiny_cache, tmp_path_factory):
    url, manifest = tiny_cache
    root = tmp_path_factory.mktemp("saes")
    opts = EvalOptions(saes=(str(save_linear_sae(root / "identity", manifest, True)),
                             str(save_linear_sae(root / "zero", manifest, False))),
                       cache=url, out=str(root / "report"), max_tokens=4096)
    return {r["name"]: r for r in evaluate(opts, progress=False)}, root / "report"


def test_identity_sae_recovers_everything(identity_and_zero):
    results, _ = identity_and_zero
    r = results["identity"]
    assert r["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert r["kl_sae"] == pytest.approx(0.0, abs=1e-5)
    assert r["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert r["ce_zero"] > r["ce_clean"] + 0.5  # zero ablation must hurt, or the score means nothing


def test_zero_sae_recovers_nothing(identity_and_zero):
    results, _ = identity_and_zero
    r = results["zero"]
    assert r["ce_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert r["kl_sae"] == pytest.approx(r["kl_zero"], rel=1e-4)


def test_served_eval_split_scores_the_same(identity_and_zero, tiny_cache, tiny_server, tmp_path):
    results, report = identity_and_zero
    url, _ = tiny_cache
    opts = EvalOptions(saes=(results["zero"]["sae"],), cache=url, server=tiny_server, out=str(tmp_path), max_tokens=4096)
    (served,) = evaluate(opts, progress=False)
    for key in ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "explained_variance", "positions"):
        assert served[key] == pytest.approx(results["zero"][key], rel=1e-6), key


def test_report_files(identity_and_zero):
    results, report = identity_and_zero
    data = json.loads((report / "eval.json").read_text())
    assert {r["name"] for r in data["results"]} == {"identity", "zero"}
    table = (report / "eval.md").read_text()
    assert "CE recovered" in table and "variance explained" in table and len(table.splitlines()) == 4
    for name in ("identity", "zero"):
        assert (report / f"density-{name}.png").stat().st_size > 1000


@torch.no_grad()
def test_start_at_layer_equals_full_forward(tiny_cache):
    from actserve.services.model import load_model

    url, manifest = tiny_cache
    model = load_model(manifest.config.model)
    tokens = torch.randint(0, manifest.d_vocab, (3, manifest.config.context_size))
    tokens[:, 0] = manifest.bos_token_id
    for hook in manifest.config.hooks:
        acts = torch.randn(3, manifest.config.context_size, manifest.d_model) * 3
        spliced = logits_from(model, tokens, acts, hook)
        full = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook, lambda _a, hook: acts)])
        torch.testing.assert_close(spliced, full, atol=1e-4, rtol=1e-4)


def test_bad_sae_input(tiny_cache, tmp_path, capsys):
    url, manifest = tiny_cache
    wrong_width = build_sae(SAEConfig("standard", d_in=manifest.d_model + 1, d_sae=8, hook_name=HOOK))
    save_sae(wrong_width, tmp_path / "wide")
    wrong_hook = build_sae(SAEConfig("standard", d_in=manifest.d_model, d_sae=8, hook_name="blocks.0.hook_mlp_out"))
    save_sae(wrong_hook, tmp_path / "mlp")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "cfg.json").write_text(json.dumps({"model_type": "crosscoder"}))
    (tmp_path / "empty").mkdir()
    for sae, message in [("wide", "d_in"), ("mlp", "which the cache lacks"), ("foreign", "cfg.json"),
                         ("empty", "not an SAE directory")]:
        code = cli_main(["eval", "--sae", str(tmp_path / sae), "--cache", url, "--out", str(tmp_path / "r"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
