"""The CE-recovered evaluator on a real cache of the tiny model."""
from __future__ import annotations

import json

import pytest
import torch

from actserve.clients.eval_options import EvalOptions
from actserve.clients.evaluator import evaluate, logits_from
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
    code = cli_main(["eval", "--sae", str(tmp_path / "wide"), "--cache", url, "--out", "", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "actserve: error: --out is empty", err


@torch.no_grad()
def test_ce_recovered_equals_saelens_run_evals(tiny_cache, tmp_path):
    """Our CE clean / with SAE / zero-ablated and CE recovered equal SAELens's `run_evals` on the same SAE
    and the same eval-split sequences, to 5 decimals, when both splice every position: ours with
    exclude_bos=False, SAELens with exclude_special_tokens=False (its default masks every special token
    in the SAE run but still zero-ablates it, which moves its number by ~0.001)."""
    from datasets import Dataset
    from google.protobuf import json_format
    from sae_lens import SAE as LensSAE, ActivationsStore
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    from actserve.services.build_options import WeightProcessing
    from actserve.services.model import load_model
    from actserve.services.shard_format import in_sequence_order, read_shard
    from actserve.services.storage import open_url

    url, manifest = tiny_cache
    n, ctx, d = 4, manifest.config.context_size, manifest.d_model
    # A partly faithful SAE: the exact +/- identity code with a noisy decoder, so 0 < CE recovered < 1.
    sae = build_sae(SAEConfig("standard", d_in=d, d_sae=2 * d, hook_name=HOOK, context_size=ctx))
    gen = torch.Generator().manual_seed(0)
    eye = torch.eye(d)
    sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
    sae.W_dec.copy_(torch.cat([eye, -eye], dim=0) + torch.randn(2 * d, d, generator=gen) / d ** 0.5)
    sae.b_enc.copy_(0.05 * torch.randn(2 * d, generator=gen))
    sae.b_dec.zero_()
    save_sae(sae, tmp_path / "noisy")

    # One model for both, processed as the cache's was.
    processing = json_format.MessageToDict(manifest.config.processing, preserving_proto_field_name=True)
    model = load_model(manifest.config.model, processing=WeightProcessing(
        **{k: bool(processing.get(k, False)) for k in WeightProcessing.__dataclass_fields__}))

    (ours,) = evaluate(EvalOptions(saes=(str(tmp_path / "noisy"),), cache=url, out=str(tmp_path / "report"),
                                   max_tokens=n * ctx, batch_sequences=n, exclude_bos=False),
                       progress=False, model=model)
    assert ours["positions"] == n * (ctx - 1)

    # The same n sequences, first in the eval split, fed to SAELens as a pretokenized dataset.
    fs, root = open_url(url)
    table = read_shard(fs, root, manifest.eval.shards[0], columns=["token"])
    tokens = in_sequence_order(table, ctx, manifest.config.position_major).column("token").to_numpy()
    tokens = tokens.reshape(-1, ctx)[:n].astype("int64")
    assert (tokens[:, 0] == manifest.bos_token_id).all()
    lens_sae = LensSAE.load_from_disk(str(tmp_path / "noisy"))
    store = ActivationsStore.from_sae(model, lens_sae, dataset=Dataset.from_dict({"input_ids": tokens.tolist()}),
                                      context_size=ctx, streaming=False, store_batch_size_prompts=n)
    metrics, _ = run_evals(lens_sae, store, model, ActivationScaler(),
                           EvalConfig(batch_size_prompts=n, n_eval_reconstruction_batches=1, compute_ce_loss=True),
                           exclude_special_tokens=False)
    theirs = metrics["model_performance_preservation"]
    print(f"CE recovered: actserve {ours['ce_recovered']:.6f}, SAELens run_evals {theirs['ce_loss_score']:.6f}")

    assert 0.05 < ours["ce_recovered"] < 0.99, ours["ce_recovered"]
    for key, lens_key in [("ce_clean", "ce_loss_without_sae"), ("ce_sae", "ce_loss_with_sae"),
                          ("ce_zero", "ce_loss_with_ablation"), ("ce_recovered", "ce_loss_score")]:
        assert ours[key] == pytest.approx(theirs[lens_key], abs=1e-5), (key, ours[key], theirs[lens_key])
