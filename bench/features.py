"""Feature-browser benchmarks. Each figure prints next to its reference, measured in the same run.

  1. `actserve features` tokens/s for one SAE (the one-pass collection, and end to end with the
     files written) vs the evaluator's read of the same eval tokens encoded by the same SAE with
     nothing kept;
  2. peak memory (RSS of a fresh process) of `actserve features` over N_small and N_large tokens;
  3. the SAE's index.html: size, and its load in headless Chromium (the page's own
     render time, and the wall time of `chromium --dump-dom` vs the same for an empty page).

  python bench/features.py --cache /work/scratch-feat/cache --hook blocks.1.hook_resid_pre
  python bench/features.py --cache actserve-work/cache-1000000 --hook blocks.2.hook_resid_pre \
      --sae actserve-work/demo-1000000/saes/blocks.2.hook_resid_pre-standard   # the demo's own SAE
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from actserve.clients.evaluator import eval_batches
from actserve.clients.eval_options import FeatureOptions
from actserve.clients.features import build_feature_browser, check_inputs, collect, load_model_for
from actserve.sae import SAEConfig, build_sae, save_sae
from actserve.services.manifest import read_manifest


def make_sae(path: Path, url: str, hook: str, d_sae: int) -> Path:
    """A random standard SAE of d_sae features, each firing on ~5% of tokens (thresholds from one batch)."""
    opts = FeatureOptions(saes=("unused",), cache=url, out="unused", max_tokens=4096)
    manifest = read_manifest(url)
    torch.manual_seed(0)
    sae = build_sae(SAEConfig("standard", d_in=manifest.d_model, d_sae=d_sae, hook_name=hook,
                              context_size=manifest.config.context_size))
    _, acts = next(eval_batches(opts, manifest, [hook]))
    pre = (acts[hook].reshape(-1, manifest.d_model) - sae.b_dec) @ sae.W_enc
    with torch.no_grad():
        sae.b_enc.copy_(-pre.quantile(0.95, dim=0))
    save_sae(sae, path)
    return path


@torch.inference_mode()
def encode_only(opts: FeatureOptions, manifest, sae) -> int:
    """The reference: the evaluator's batches of the eval split, encoded, nothing kept."""
    tokens = 0
    for batch_tokens, acts in eval_batches(opts, manifest, [sae.cfg.hook_name]):
        sae.encode(acts[sae.cfg.hook_name])
        tokens += batch_tokens.numel()
    return tokens


def throughput(url: str, sae_dir: Path, tokens: int, repeats: int, work: Path) -> None:
    opts = FeatureOptions(saes=(str(sae_dir),), cache=url, out=str(work / "throughput"), max_tokens=tokens)
    manifest, (sae,) = check_inputs(opts)
    model = load_model_for(manifest, "cpu")
    times = {"reference": [], "collect": [], "end to end": []}
    for _ in range(repeats):  # interleaved, so that the machine's load hits both sides alike
        t = time.perf_counter(); n = encode_only(opts, manifest, sae); times["reference"].append(time.perf_counter() - t)
        t = time.perf_counter(); collect(opts, manifest, [sae], progress=False); times["collect"].append(time.perf_counter() - t)
        t = time.perf_counter(); build_feature_browser(opts, progress=False, model=model); times["end to end"].append(time.perf_counter() - t)
    ref = statistics.median(times["reference"])
    print(f"throughput, {n:,} tokens, d_sae {sae.cfg.d_sae}, median of {repeats}:")
    print(f"  reference (read + encode, nothing kept): {n / ref:,.0f} tok/s")
    for name in ("collect", "end to end"):
        s = statistics.median(times[name])
        print(f"  actserve features, {name}: {n / s:,.0f} tok/s, ratio {ref / s:.2f} (goal >= 0.8)")


MEMORY_CODE = """
import json, sys
from pathlib import Path
import torch
from actserve.clients.evaluator import eval_batches
from actserve.clients.eval_options import FeatureOptions
from actserve.clients.features import FeatureStats, check_inputs, load_model_for, write_outputs
url, sae_dir, out, tokens = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
opts = FeatureOptions(saes=(sae_dir,), cache=url, out=str(out))
manifest, (sae,) = check_inputs(opts)
model = load_model_for(manifest, "cpu")
hook = sae.cfg.hook_name

def status(field):  # kB, from /proc/self/status
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
    f.write("5")
state = FeatureStats(sae.cfg.d_sae, opts.top, opts.left, opts.right)
seen = 0
with torch.inference_mode():
    while seen < tokens:  # epochs over the eval split: collect()'s loop, repeated
        for batch_tokens, acts in eval_batches(opts, manifest, [hook]):
            counted = torch.ones_like(batch_tokens, dtype=torch.bool)
            counted[:, 0] = False
            state.update(sae.encode(acts[hook]), batch_tokens, counted, seen)
            seen += batch_tokens.numel()
            if seen >= tokens:
                break
out.mkdir()
write_outputs(out, opts, manifest, [sae], [state], model)
print(json.dumps({"before_kb": before, "peak_kb": status("VmHWM"), "tokens": seen}))
"""


def memory(url: str, sae_dir: Path, sizes: list[int], work: Path) -> None:
    print("peak RSS (VmHWM, reset after imports and the model's load) of a fresh process: FeatureStats over N tokens "
          "(epochs over the eval split) + its files written:")
    for tokens in sizes:
        out = subprocess.run([sys.executable, "-c", MEMORY_CODE, url, str(sae_dir), str(work / f"mem-{tokens}"), str(tokens)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"  {r['tokens']:>9,} tokens: peak {r['peak_kb'] / 1024:,.0f} MiB, {(r['peak_kb'] - r['before_kb']) / 1024:,.0f} MiB "
              f"above the RSS before the pass ({r['before_kb'] / 1024:,.0f} MiB)")


def chromium_dom(url: str, profile: Path) -> tuple[float, str]:
    exe = shutil.which("chromium") or shutil.which("google-chrome")
    t = time.perf_counter()
    dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                          f"--user-data-dir={profile}", "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    return time.perf_counter() - t, dom


def page_load(url: str, sae_dir: Path, work: Path, repeats: int) -> None:
    out = work / "html"
    index = build_feature_browser(FeatureOptions(saes=(str(sae_dir),), cache=url, out=str(out), max_tokens=50_000), progress=False)
    page = index.parent / sae_dir.name / "index.html"
    data = page.parent / "index-data.js"
    d_sae = json.loads((page.parent / "summary.json").read_text())["d_sae"]
    print(f"{d_sae}-feature index: index.html {page.stat().st_size / 1024:.1f} KiB + index-data.js {data.stat().st_size / 1024:.1f} KiB")
    if not (shutil.which("chromium") or shutil.which("google-chrome")):
        print("  chromium not installed: no load time")
        return
    empty = work / "empty.html"
    empty.write_text("<!doctype html><html><body>empty</body></html>")
    walls, renders, empties = [], [], []
    for _ in range(repeats):
        wall, dom = chromium_dom(page.as_uri(), work / "profile")
        walls.append(wall)
        renders.append(float(re.search(r'data-render-ms="([0-9.]+)"', dom)[1]))
        empties.append(chromium_dom(empty.as_uri(), work / "profile")[0])
    print(f"  in-page: index rendered {statistics.median(renders):.0f} ms after navigation start (goal < 1000 ms), median of {repeats}")
    print(f"  chromium --dump-dom wall time: {statistics.median(walls):.2f} s, same for an empty page: "
          f"{statistics.median(empties):.2f} s (browser start-up), difference {statistics.median(walls) - statistics.median(empties):.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="cache with an eval split of at least --large tokens")
    p.add_argument("--hook", default="blocks.1.hook_resid_pre")
    p.add_argument("--d-sae", type=int, default=1024, help="features of the random SAE made for the run")
    p.add_argument("--sae", type=Path, help="a trained SAE directory of --hook instead of the random one "
                                            "(e.g. the demo's, actserve-work/demo-1000000/saes/...)")
    p.add_argument("--tokens", type=int, default=200_000, help="tokens of the throughput figure")
    p.add_argument("--small", type=int, default=100_000)
    p.add_argument("--large", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.sae and not (args.sae / "cfg.json").is_file():
        p.error(f"--sae {args.sae}: not an SAE directory (no cfg.json)")
    with tempfile.TemporaryDirectory(prefix="actserve-bench-features-") as tmp:
        work = Path(tmp)
        sae = args.sae or make_sae(work / "sae", args.cache, args.hook, args.d_sae)
        throughput(args.cache, sae, args.tokens, args.repeats, work)
        memory(args.cache, sae, [args.small, args.large], work)
        page_load(args.cache, sae, work, args.repeats)


if __name__ == "__main__":
    main()
