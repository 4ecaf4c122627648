"""The feature browser (`actserve features`) and the frontier plot, on the tiny model's real cache."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from actserve.cli import main as cli_main
from actserve.clients.eval_options import EvalOptions, FeatureOptions
from actserve.clients.evaluator import cached_sequences, evaluate
from actserve.clients.features import FeatureStats, build_feature_browser, check_inputs, collect
from actserve.sae import SAEConfig, build_sae, save_sae
from actserve.testing import read_split

HOOK = "blocks.1.hook_resid_pre"
MAX_TOKENS = 2048
D_SAE = 96
DEAD, DENSE = 0, 1  # features made never / always to fire


def save_random_sae(path: Path, url: str, manifest, hook: str = HOOK, arch: str = "standard", seed: int = 0, **cfg) -> Path:
    """A random SAE whose features fire on a few percent of tokens, plus one dead and one dense feature."""
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(arch, d_in=manifest.d_model, d_sae=D_SAE, hook_name=hook,
                              context_size=manifest.config.context_size, **cfg))
    if arch == "standard":
        x = next(cached_sequences(FeatureOptions(saes=("x",), cache=url, out="x"), manifest, [hook]))[1][hook]
        pre = (x.reshape(-1, manifest.d_model).float() - sae.b_dec) @ sae.W_enc
        with torch.no_grad():
            sae.b_enc.copy_(-pre.quantile(0.995, dim=0))  # each feature fires on ~0.5% of tokens
            sae.b_enc[DEAD] = -1e6
            sae.b_enc[DENSE] = 1e3
    save_sae(sae, path)
    return path


@pytest.fixture(scope="module")
def saes(tiny_cache, tmp_path_factory):
    url, manifest = tiny_cache
    root = tmp_path_factory.mktemp("feature-saes")
    return (save_random_sae(root / "resid1", url, manifest),
            save_random_sae(root / "resid0", url, manifest, hook="blocks.0.hook_resid_pre", arch="topk", seed=1, k=4))


@pytest.fixture(scope="module")
def browser(tiny_cache, saes, tmp_path_factory):
    url, _ = tiny_cache
    out = tmp_path_factory.mktemp("features") / "browser"
    code = cli_main(["features", "--sae", str(saes[0]), "--sae", str(saes[1]), "--cache", url, "--out", str(out),
                     "--max-tokens", str(MAX_TOKENS), "--top", "5", "--quiet"])
    assert code == 0
    return out


def brute_force(url, manifest, sae_dir: Path):
    """Every counted (non-BOS) activation of the first MAX_TOKENS eval tokens: f [tokens, d_sae], and
    the tokens [sequences, ctx]."""
    from actserve.sae import load_sae

    sae = load_sae(str(sae_dir))
    ctx = manifest.config.context_size
    opts = FeatureOptions(saes=(str(sae_dir),), cache=url, out="x", max_tokens=MAX_TOKENS)
    tokens, acts = next(cached_sequences(opts, manifest, [sae.cfg.hook_name]))
    n_seq = MAX_TOKENS // ctx
    with torch.no_grad():
        f = sae.encode(acts[sae.cfg.hook_name][:n_seq].float())
    f[:, 0] = 0  # BOS
    return f.reshape(-1, sae.cfg.d_sae), tokens[:n_seq]


def test_top_activations_match_brute_force(browser, tiny_cache, saes):
    url, manifest = tiny_cache
    ctx = manifest.config.context_size
    f, tokens = brute_force(url, manifest, saes[0])
    split = read_split(url, manifest, "eval")
    table = pq.read_table(browser / "resid1" / "top_activations.parquet").to_pylist()
    assert {r["sae"] for r in table} == {"resid1"}
    by_feature = {}
    for r in table:
        by_feature.setdefault(r["feature"], []).append(r)
    assert DEAD not in by_feature
    for j in range(D_SAE):
        want = f[:, j].topk(5).values
        want = want[want > 0]
        rows = sorted(by_feature.get(j, []), key=lambda r: r["rank"])
        assert [r["rank"] for r in rows] == list(range(len(want)))
        np.testing.assert_allclose([r["activation"] for r in rows], want.numpy(), rtol=1e-5)
        for r in rows:
            # the example is where it says it is: the cache's own row, the activation there, its context
            row = r["sequence"] * ctx + r["position"]  # eval sequence ids start at 0
            assert split["sequence"][row] == r["sequence"] and split["token"][row] == r["token"]
            assert f[row, j] == pytest.approx(r["activation"], rel=1e-5)
            start, n = r["context_start"], len(r["context_tokens"])
            assert start == max(0, r["position"] - 8) and start + n == min(ctx, r["position"] + 5)
            assert r["context_tokens"] == tokens[r["sequence"], start:start + n].tolist()
            np.testing.assert_allclose(r["context_activations"], f[r["sequence"] * ctx + start:][:n, j].numpy(), rtol=1e-5, atol=1e-6)
            assert r["context_text"] == "".join(r["context_token_texts"]) and r["token_text"] == r["context_token_texts"][r["position"] - start]


def test_feature_summary(browser, tiny_cache, saes):
    url, manifest = tiny_cache
    f, _ = brute_force(url, manifest, saes[0])
    counted = MAX_TOKENS - MAX_TOKENS // manifest.config.context_size
    summary = pq.read_table(browser / "resid1" / "features.parquet").to_pylist()
    assert [s["feature"] for s in summary] == list(range(D_SAE))
    np.testing.assert_array_equal([s["fire_count"] for s in summary], (f > 0).sum(0).numpy())
    np.testing.assert_allclose([s["density"] for s in summary], (f > 0).sum(0).numpy() / counted)
    np.testing.assert_allclose([s["max_activation"] for s in summary], f.amax(0).numpy(), rtol=1e-5)
    assert summary[DEAD]["dead"] and not summary[DEAD]["dense"] and summary[DENSE]["dense"]
    assert all(len(s["promoted_tokens"]) == 10 and len(s["suppressed_tokens"]) == 10 for s in summary)
    meta = json.loads((browser / "resid1" / "summary.json").read_text())
    assert meta["tokens"] == counted and meta["dead"] >= 1 and meta["dense"] >= 1
    assert "W_U" in meta["logit_lens"]
    # histogram: every firing token in exactly one bin, the bin [low, high) its activation falls in
    data = chunk(browser / "resid1", 2)
    assert sum(c for _, _, c in data["hist"]) == summary[2]["fire_count"]
    fired = f[:, 2][f[:, 2] > 0].numpy()
    assert [c for _, _, c in data["hist"]] == [int(((fired >= lo) & (fired < hi)).sum()) for lo, hi, _ in data["hist"]]


def test_logit_lens_is_decoder_times_unembedding(browser, tiny_cache, saes):
    from actserve.clients.features import load_model_for, logit_lens
    from actserve.sae import load_sae

    _, manifest = tiny_cache
    model, sae = load_model_for(manifest, "cpu"), load_sae(str(saes[0]))
    promoted, _, suppressed, _ = logit_lens(sae, model, 3)
    d = sae.W_dec.detach()[5]
    logits = (d - d.mean()) @ model.W_U.detach()  # fold_ln: the final LayerNorm's weight is in W_U
    assert promoted[5].tolist() == logits.topk(3).indices.tolist()
    assert suppressed[5].tolist() == (-logits).topk(3).indices.tolist()


def test_served_eval_split_gives_the_same_examples(browser, tiny_cache, tiny_server, saes, tmp_path):
    url, _ = tiny_cache
    out = build_feature_browser(FeatureOptions(saes=(str(saes[0]),), cache=url, server=tiny_server,
                                               out=str(tmp_path / "served"), max_tokens=MAX_TOKENS, top=5), progress=False)
    assert out == tmp_path / "served" / "index.html"
    columns = ["feature", "rank", "activation", "sequence", "position", "token", "context_tokens"]
    served = pq.read_table(tmp_path / "served" / "resid1" / "top_activations.parquet", columns=columns)
    cached = pq.read_table(browser / "resid1" / "top_activations.parquet", columns=columns)
    assert served.equals(cached)


def test_state_does_not_grow_with_tokens(tiny_cache, saes):
    url, _ = tiny_cache

    def state_bytes(tokens):
        opts = FeatureOptions(saes=(str(saes[0]),), cache=url, out="unused", max_tokens=tokens, top=5)
        manifest, loaded = check_inputs(opts)
        (state,) = collect(opts, manifest, loaded, progress=False)
        return state.tokens, sum(t.numel() * t.element_size() for t in vars(state).values() if isinstance(t, torch.Tensor))

    (few, small), (many, large) = state_bytes(256), state_bytes(MAX_TOKENS * 2)
    assert many > 4 * few and small == large


def test_stats_over_many_batches_equal_one_pass_over_all_of_them():
    """FeatureStats fed 40 small batches holds what the whole matrix gives at once: the K largest
    activations of each feature (values rounded so that ties occur), each at its own token and with
    its window; empty slots for features that fired fewer than K times; counts, sums, maxima."""
    torch.manual_seed(0)
    n_batches, n_seq, ctx, d_sae, top, left, right = 40, 3, 16, 24, 6, 3, 2
    f = (torch.randn(n_batches * n_seq, ctx, d_sae) * 4).round().clamp(min=0)  # ~45% non-zero, many ties
    f[..., 5] = 0                                      # never fires
    f[..., 6] = 0
    f[7, 3, 6], f[30, 9, 6] = 2.0, 5.0                 # fires twice: K - 2 empty slots
    tokens = torch.randint(0, 1000, (n_batches * n_seq, ctx))
    counted = torch.ones(n_seq, ctx, dtype=torch.bool)
    counted[:, 0] = False
    state = FeatureStats(d_sae, top, left, right)
    for b in range(n_batches):
        part = slice(b * n_seq, (b + 1) * n_seq)
        state.update(f[part].clone(), tokens[part], counted, b * n_seq * ctx)
    f[:, 0] = 0
    flat = f.reshape(-1, d_sae)
    assert state.tokens == n_batches * n_seq * (ctx - 1)
    assert torch.equal(state.fire_count, (flat != 0).sum(0)) and torch.equal(state.act_max, flat.amax(0))
    torch.testing.assert_close(state.act_sum, flat.double().sum(0))
    assert torch.equal(state.hist.view(d_sae, -1).sum(1), state.fire_count)
    order = state.top_act.argsort(dim=1, descending=True)
    assert torch.equal(state.top_act.gather(1, order), flat.topk(top, dim=0).values.T)  # the K largest, ties included
    for j in range(d_sae):
        slots = [s for s in range(top) if state.top_act[j, s] > 0]
        indices = state.top_index[j, slots]
        assert len(set(indices.tolist())) == len(slots)  # K different tokens
        assert torch.equal(flat[indices, j], state.top_act[j, slots])
        for s, index in zip(slots, indices.tolist()):
            seq, pos = divmod(index, ctx)
            for w in range(left + 1 + right):
                p = pos - left + w
                inside = 0 <= p < ctx
                assert state.top_context[j, s, w] == (tokens[seq, p] if inside else -1)
                assert state.top_context_act[j, s, w] == (f[seq, p, j] if inside else 0)
        empty = [s for s in range(top) if state.top_act[j, s] == 0]
        assert (state.top_index[j, empty] == -1).all() and (state.top_context[j, empty] == -1).all()
    assert sorted(state.top_index[6][state.top_act[6] > 0].tolist()) == [7 * ctx + 3, 30 * ctx + 9]


def chunk(directory: Path, feature: int) -> dict:
    text = (directory / "data" / f"chunk-{feature // 128:04d}.js").read_text()
    return json.loads(text[len("window.featureChunk("):-len(");\n")])[str(feature)]


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.refs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_pages_are_self_contained(browser):
    for page in ["index.html", "resid1/index.html", "resid1/feature.html", "resid0/feature.html"]:
        text = (browser / page).read_text()
        parser = Collect()
        parser.feed(text)
        assert not re.search(r"https?://", text.replace("http://www.w3.org/2000/svg", "")), page  # no network
        for ref in parser.refs:  # every link and script is a file beside the page
            target = ref.split("#")[0]
            assert target and (browser / page).parent.joinpath(target).is_file(), (page, ref)
    assert (browser / "resid1" / "index.html").stat().st_size < 20_000  # the data lives in index-data.js
    data = chunk(browser / "resid1", 3)
    assert data["examples"] and all(len(x["t"]) == len(x["v"]) for x in data["examples"])
    assert chunk(browser / "resid0", 3)["promoted"] is not None
    assert not list(browser.parent.glob(".browser.*")), "temporary directories left beside --out"


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("chromium is not installed (./dev test installs the Debian package where apt-get exists); "
                    "the pages are still checked by test_pages_are_self_contained")
    profile = tmp_path / "chromium-profile"
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=5000", *args],
                          capture_output=True, text=True, timeout=120)


def rendered(url: str, tmp_path: Path) -> str:
    result = chromium(["--dump-dom", url], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    console_errors = [line for line in result.stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    assert not console_errors, console_errors
    dom = result.stdout
    assert 'data-ok="1"' in dom and "data-error" not in dom, dom[:2000]
    return dom


def test_browser_renders_in_headless_chromium(browser, tmp_path):
    index = rendered((browser / "resid1" / "index.html").as_uri(), tmp_path)
    assert len(re.findall(r'<a href="feature.html#\d+">', index)) == D_SAE  # one row per feature
    assert '<span class="tag dead">dead</span>' in index and '<span class="tag dense">dense</span>' in index

    feature = 3
    data = chunk(browser / "resid1", feature)
    page = (browser / "resid1" / "feature.html").as_uri() + f"#{feature}"
    dom = rendered(page, tmp_path)
    assert f"resid1 feature {feature}" in dom
    assert dom.count('class="ctx"') == len(data["examples"])
    assert "background-color: rgba(230, 126, 34," in dom  # shading
    example = data["examples"][0]
    assert f'title="{json.dumps(example["t"][example["c"]])} ' in dom.replace("&quot;", '"')  # value on hover
    for text in example["t"]:
        assert text.replace("\n", "\u21b5").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in dom
    assert '<svg width="600"' in dom and dom.count("<rect") == len(data["hist"])
    assert 'id="promoted"' in dom and 'id="suppressed"' in dom

    screenshot = tmp_path / "feature.png"
    result = chromium([f"--screenshot={screenshot}", "--window-size=1200,900", page], tmp_path)
    assert result.returncode == 0 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", result.stderr[-2000:]
    print(f"feature page screenshot: {screenshot}")


def test_bad_input_one_line_and_nothing_written(tiny_cache, saes, tmp_path, capsys):
    from actserve.testing import SyntheticSpec, write_synthetic_cache

    url, manifest = tiny_cache
    save_sae(build_sae(SAEConfig("standard", d_in=manifest.d_model + 1, d_sae=8, hook_name=HOOK)), tmp_path / "wide")
    save_sae(build_sae(SAEConfig("standard", d_in=manifest.d_model, d_sae=8, hook_name="blocks.0.hook_mlp_out")), tmp_path / "mlp")
    no_eval = str(tmp_path / "no-eval")
    write_synthetic_cache(no_eval, SyntheticSpec(eval_shards=0, train_shards=1, d_model=manifest.d_model,
                                                 hooks=(HOOK,)))
    out = tmp_path / "out"
    cases = [
        (["--sae", str(tmp_path / "mlp"), "--cache", url], "which the cache lacks"),
        (["--sae", str(tmp_path / "wide"), "--cache", url], "d_in"),
        (["--sae", str(saes[0]), "--cache", no_eval], "no eval split"),
        (["--sae", str(saes[0]), "--cache", url, "--top", "0"], "--top must be > 0"),
        (["--sae", str(saes[0]), "--cache", url, "--top", "-3"], "--top must be > 0"),
        (["--sae", str(saes[0]), "--cache", url, "--logit-tokens", "-1"], "--logit-tokens must be >= 0"),
        (["--sae", str(saes[0]), "--cache", url, "--storage-options", "[1]"], "--storage-options must be a JSON object"),
    ]
    for args, message in cases:
        code = cli_main(["features", *args, "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1 and err.startswith("actserve: error: "), err
        assert not out.exists() and not list(tmp_path.glob(".out*")), args


def test_rerun_replaces_out_as_a_whole(tiny_cache, saes, tmp_path):
    url, _ = tiny_cache
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    build_feature_browser(FeatureOptions(saes=(str(saes[1]),), cache=url, out=str(out), max_tokens=256, top=2), progress=False)
    assert not (out / "stale.txt").exists() and (out / "resid0" / "index.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_of_several_saes_writes_the_frontier(tiny_cache, saes, tmp_path):
    url, _ = tiny_cache
    results = evaluate(EvalOptions(saes=tuple(map(str, saes)), cache=url, out=str(tmp_path / "two"), max_tokens=512), progress=False)
    assert all(r["l0"] > 0 for r in results)
    assert is_png(tmp_path / "two" / "frontier.png")
    evaluate(EvalOptions(saes=(str(saes[0]),), cache=url, out=str(tmp_path / "one"), max_tokens=256), progress=False)
    assert not (tmp_path / "one" / "frontier.png").exists()  # one point is no frontier


def test_sweep_table_writes_the_frontier(tmp_path):
    from types import SimpleNamespace

    from actserve.clients.sweep import write_table

    rows = [{"point": f"p{i}", "status": "ok", "architecture": arch, "l0": l0, "ce_recovered": ce, "explained_variance": ev}
            for i, (arch, l0, ce, ev) in enumerate([("standard", 5.0, 0.7, 0.6), ("standard", 40.0, 0.9, 0.8),
                                                    ("topk", 8.0, 0.8, 0.7), ("topk", 32.0, 0.95, 0.85)])]
    rows.append({"point": "p9", "status": "failed", "error": "boom"})
    write_table(SimpleNamespace(out=str(tmp_path)), rows)  # the table writer reads only the spec's out
    assert is_png(tmp_path / "frontier.png") and (tmp_path / "results.csv").is_file()
