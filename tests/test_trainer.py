"""Trainer clients, sweeps and the no-leak guarantee, against a real server on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from actserve.clients.stream import ActivationStream
from actserve.clients.sweep import run_sweep
from actserve.clients.sweep_spec import SweepError, load_sweep
from actserve.clients.trainer import CHECKPOINT
from actserve.cli import main as cli_main

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]


def train_args(server, out, tokens=32768, **flags):
    args = ["train", "--server", server, "--cache", "tiny", "--hook", HOOKS[1], "--tokens", str(tokens),
            "--out", str(out), "--batch-size", "512", "--expansion", "4", "--l1-coefficient", "3e-3",
            "--lr-warmup-steps", "10", "--log-every", "8", "--quiet"]
    for flag, value in flags.items():
        args += [f"--{flag.replace('_', '-')}", str(value)]
    return args


@pytest.mark.parametrize("sae", [{}, {"arch": "jumprelu", "target_l0": 8}, {"arch": "batchtopk", "target_l0": 8}],
                         ids=["standard", "jumprelu-with-l0-controller", "batchtopk"])
def test_killed_trainer_resumes_to_identical_weights(tiny_server, tmp_path, sae):
    # 128 steps, the first checkpoint after 8: the kill lands with most of the run still to go
    args = dict(tokens=65536, checkpoint_every=4096, **sae)
    # Three `actserve train` processes with one environment, as a user reruns the command. Bit for
    # bit needs one torch thread count in all three: the standard SAE's float sums depend on it
    # (1, 2 and 4 threads gave three different weight files), and a machine's default count is
    # its core count, which the test process may not share with the processes it starts.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "actserve", *train_args(tiny_server, out, **args)]

    reference = subprocess.run(command(tmp_path / "reference"), env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / CHECKPOINT).exists():  # kill -9 once a checkpoint is on disk
            assert proc.poll() is None, "the trainer finished before it could be killed"
            assert time.time() < deadline
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "sae_weights.safetensors").exists()

    resumed = subprocess.run(command(out), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "sae_weights.safetensors").read_bytes() == (tmp_path / "reference" / "sae_weights.safetensors").read_bytes()
    assert not (out / CHECKPOINT).exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "l0", "window_explained_variance", "dead_features", "lr", "tokens_per_s",
            "data_wait_fraction"} <= set(records[-1])
    # the run's own token count and the trainer's dead features, not the metrics window's
    assert records[-1]["tokens"] == args["tokens"] and records[-1]["tokens"] > records[-1]["window_tokens"]


def test_standard_sae_on_tiny_model_is_good(tiny_server, tiny_cache, tmp_path):
    """The acceptance bar: EV >= 0.9, CE recovered >= 0.9, < 10% dead, after a modest budget."""
    from actserve.clients.eval_options import EvalOptions
    from actserve.clients.evaluator import evaluate

    out = tmp_path / "sae"
    assert cli_main(train_args(tiny_server, out, tokens=196_608, expansion=8, lr=1e-3)) == 0
    (result,) = evaluate(EvalOptions(saes=(str(out),), cache=tiny_cache[0], out=str(tmp_path / "eval")), progress=False)
    assert result["explained_variance"] >= 0.9, result
    assert result["ce_recovered"] >= 0.9, result
    assert result["dead_features"] < 0.1 * result["d_sae"], result


def write_sweep(tmp_path, server, cache_url, **overrides) -> Path:
    spec = {"cache": cache_url, "server": server, "out": str(tmp_path / "sweep"), "tokens": 8192,
            "grid": {"hook": HOOKS, "architecture": ["standard", "topk"], "expansion": [2], "k": [8], "l1_coefficient": [3e-3]},
            "train": {"batch_size": 512, "lr_warmup_steps": 4, "log_every": 4},
            "eval": {"max_tokens": 2048}, **overrides}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sweep_trains_concurrently_and_writes_the_table(tiny_server, tiny_cache, tmp_path):
    spec = load_sweep(str(write_sweep(tmp_path, tiny_server, tiny_cache[0])))
    results = run_sweep(spec, progress=False)
    assert len(results) == 4 and all(r["status"] == "ok" for r in results), results
    assert {r["hook"] for r in results} == set(HOOKS)
    assert {r["architecture"] for r in results} == {"standard", "topk"}
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert len(table.splitlines()) == 2 + 4 and "ce_recovered" in table
    csv_rows = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 5 and all(r["ce_recovered"] is not None for r in results)


def test_failing_sweep_point_does_not_stop_the_others(tiny_server, tmp_path):
    path = write_sweep(tmp_path, tiny_server, "tiny", eval=False,
                       grid={"hook": [HOOKS[0], "blocks.9.hook_resid_pre"], "expansion": [2]})
    results = run_sweep(load_sweep(str(path)), progress=False)
    status = {r["point"].split("-")[0]: r for r in results}
    assert status["blocks.0.hook_resid_pre"]["status"] == "ok"
    assert status["blocks.9.hook_resid_pre"]["status"] == "failed"
    assert "blocks.9.hook_resid_pre" in status["blocks.9.hook_resid_pre"]["error"]
    assert "failed" in (tmp_path / "sweep" / "results.md").read_text()


@pytest.mark.parametrize("change, message", [
    ({"grdi": {}}, "unknown key grdi"),
    ({"grid": {"hook": []}}, "grid.hook is empty"),
    ({"grid": {"hook": HOOKS, "width": [2]}}, "unknown key grid.width"),
    ({"train": {"batchsize": 3}}, "unknown key train.batchsize"),
    ({"grid": {"hook": HOOKS, "l1_coefficient": ["lots"]}}, "grid.l1_coefficient takes numbers"),
    ({"grid": {"hook": HOOKS, "expansion": [2.5]}}, "grid.expansion takes whole numbers"),
])
def test_bad_sweep_files(tmp_path, change, message):
    path = write_sweep(tmp_path, "grpc://127.0.0.1:1", "tiny", **change)
    with pytest.raises(SweepError, match=message.replace(".", r"\.")):
        load_sweep(str(path))


def test_yaml_exponents_are_numbers(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("cache: c\nout: o\ntokens: 10\ngrid: {hook: [h], l1_coefficient: [8e-5], lr: [4e-4]}\n")
    spec = load_sweep(str(path))
    assert spec.grid["l1_coefficient"] == [8e-5] and spec.grid["lr"] == [4e-4]


def test_no_eval_sequence_in_a_training_stream(tiny_server, tiny_cache):
    _, manifest = tiny_cache
    eval_ids = {s.first_sequence + i for s in manifest.eval.shards for i in range(s.num_sequences)}
    stream = ActivationStream(tiny_server, cache="tiny", hooks=[HOOKS[0]], batch_size=8192, include_meta=True, seed=3)
    seen = set()
    for batch in stream:
        seen.update(batch["sequence"].unique().tolist())
    assert seen and not seen & eval_ids
    assert len(seen) == sum(s.num_sequences for s in manifest.train.shards)


@pytest.mark.parametrize("flags, message", [
    (["--target-l0", "0"], "--target-l0 must be > 0"),
    (["--arch", "topk"], "topk and batchtopk SAEs need --target-l0 (or --k)"),
    (["--arch", "topk", "--k", "8", "--target-l0", "8"], "give --target-l0 or --k, not both"),
    (["--arch", "sparse"], "--arch: unknown architecture ['sparse']"),
    (["--recipe", "seed", "--arch", "topk", "--k", "8"], "--recipe seed trains standard SAEs only"),
])
def test_train_rejects_bad_sparsity_flags_before_writing_anything(tmp_path, capsys, flags, message):
    out = tmp_path / "x"
    argv = ["train", "--server", "grpc://127.0.0.1:1", "--cache", "c", "--hook", HOOKS[0], "--tokens", "100",
            "--out", str(out), *flags]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("actserve: error: ") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_train_rejects_a_hook_the_cache_lacks(tiny_server, tmp_path, capsys):
    args = train_args(tiny_server, tmp_path / "x")
    args[args.index("--hook") + 1] = "blocks.0.hook_mlp_out"
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "blocks.0.hook_mlp_out" in err and len(err.strip().splitlines()) == 1


def test_train_without_a_server_says_what_to_start(tmp_path, capsys):
    from tests.conftest import free_port

    args = train_args(f"grpc://127.0.0.1:{free_port()}", tmp_path / "x", reconnect_timeout=2)
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "actserve serve" in err, err


def test_seed_seeds_the_initial_weights(tmp_path):
    """--seed reaches everything random in a run: two seeds give different weights, one seed the same bytes."""
    from actserve.clients.train_options import TrainOptions
    from actserve.clients.trainer import train
    from actserve.proto.manifest_pb2 import HookStats
    from actserve.testing import TensorBatches

    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    stats = HookStats(count=512, mean_norm=float(x.norm(dim=1).mean()), mean_sq_norm=float(x.pow(2).sum(1).mean()))

    def weights(seed: int, name: str) -> bytes:
        opts = TrainOptions(hook="h", out=str(tmp_path / name), tokens=256, batch_size=128, expansions=(2,), seed=seed)
        (path,) = train(opts, TensorBatches(x, "h", 128), 16, stats, progress=False)
        return (path / "sae_weights.safetensors").read_bytes()

    assert weights(1, "a") == weights(1, "b")
    assert weights(1, "a") != weights(2, "c")


def test_default_cli_run_is_sparse_and_does_not_depend_on_the_activation_scale(tiny_server, tiny_cache, tmp_path):
    """`actserve train` with nothing but where, what and how much: a sparse SAE (L0 <= d_in / 4)
    that explains >= 80% of the variance; and the same run on activations x100 ends the same."""
    from actserve.clients.eval_options import EvalOptions
    from actserve.clients.evaluator import evaluate
    from actserve.clients.train_options import TrainOptions
    from actserve.clients.trainer import train
    from actserve.proto.manifest_pb2 import HookStats
    from actserve.testing import TensorBatches

    url, manifest = tiny_cache
    tokens = 6 * manifest.train.num_tokens  # ~290 steps of the default 4096 tokens
    out = tmp_path / "default"
    assert cli_main(["train", "--server", tiny_server, "--cache", "tiny", "--hook", HOOKS[1], "--tokens", str(tokens),
                     "--out", str(out), "--quiet"]) == 0
    (result,) = evaluate(EvalOptions(saes=(str(out),), cache=url, out=str(tmp_path / "eval")), progress=False)
    print(f"defaults: L0 {result['l0']:.1f} EV {result['explained_variance']:.3f} CE {result['ce_recovered']:.3f}")
    assert result["l0"] <= manifest.d_model / 4 and result["explained_variance"] >= 0.8, result

    with ActivationStream(tiny_server, cache="tiny", hooks=[HOOKS[1]], batch_size=8192, seed=0) as stream:
        x = torch.cat([b[HOOKS[1]] for b in stream])
    stats = manifest.stats[HOOKS[1]]
    ends = {}
    for factor in (1.0, 100.0):
        scaled = HookStats(count=stats.count, mean_norm=stats.mean_norm * factor, mean_sq_norm=stats.mean_sq_norm * factor**2)
        opts = TrainOptions(hook=HOOKS[1], out=str(tmp_path / f"x{factor:g}"), tokens=len(x), log_every=10**6)
        (path,) = train(opts, TensorBatches(x * factor, HOOKS[1], opts.batch_size), manifest.d_model, scaled, progress=False)
        record = json.loads((path / "metrics.jsonl").read_text().splitlines()[-1])
        ends[factor] = (record["window_l0"], record["window_explained_variance"])
    (l0, ev), (l0_100, ev_100) = ends[1.0], ends[100.0]
    assert abs(l0_100 - l0) <= 0.02 * l0 and abs(ev_100 - ev) <= 0.02 * ev, ends
