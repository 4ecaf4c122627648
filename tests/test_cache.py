"""The activation cache: real model actors on a local Ray, real Parquet files, local disk and S3."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from actserve.services.build import build_cache, start_model_hosts
from actserve.services.build_options import BuildOptions, WeightProcessing
from actserve.services.model_host import GIL_SWITCH_INTERVAL, ModelHost
from actserve.services.shard_format import decode_activations, in_sequence_order, read_shard, write_shard
from actserve.services.storage import open_url
from actserve.services.manifest import read_manifest
from actserve.cli import main as cli_main, os_error_message
from actserve.services.data import DatasetSpec, iter_documents, iter_sequences
from tests.conftest import free_port

HOOKS = "blocks.0.hook_resid_pre,blocks.1.hook_resid_post"
SMALL = dict(tokens=2048, eval_tokens=512, context_size=32, shard_mb=0.02, batch_sequences=2)


def options(tiny_model, corpus, out, **overrides) -> BuildOptions:
    return BuildOptions(**{"model": str(tiny_model), "dataset": str(corpus), "hooks": HOOKS, "out": str(out),
                           **SMALL, **overrides})


def shard_tokens(table) -> np.ndarray:
    """Rebuild [n_seq, ctx] token ids from the token / sequence / position columns."""
    seq = table.column("sequence").to_numpy()
    pos = table.column("position").to_numpy()
    tok = table.column("token").to_numpy()
    ids = np.unique(seq)
    out = np.empty((len(ids), pos.max() + 1), dtype=np.int32)
    out[np.searchsorted(ids, seq), pos] = tok
    return out


@pytest.fixture(scope="module")
def built(tiny_model, corpus, ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    manifest = build_cache(options(tiny_model, corpus, out), progress=False)
    return out, manifest


def test_activations_equal_run_with_cache(built, tiny_model, corpus):
    from actserve.services.model import load_model

    out, manifest = built
    model = load_model(str(tiny_model))
    hooks = list(manifest.config.hooks)
    assert len(hooks) == 2 and manifest.complete
    expected_sequences = iter_sequences(
        iter_documents(DatasetSpec(str(corpus)), model.tokenizer), 32, model.tokenizer.bos_token_id)
    fs, root = open_url(str(out))
    assert manifest.config.position_major
    for shard in list(manifest.eval.shards) + list(manifest.train.shards):
        stored = read_shard(fs, root, shard)
        # stored position-major: row p * N + s is position p of the shard's sequence s
        n = shard.num_sequences
        np.testing.assert_array_equal(stored.column("position").to_numpy(), np.repeat(np.arange(32), n))
        np.testing.assert_array_equal(stored.column("sequence").to_numpy(),
                                      np.tile(np.arange(shard.first_sequence, shard.first_sequence + n), 32))
        table = in_sequence_order(stored, 32, True)
        tokens = shard_tokens(table)
        # the cached tokens are the tokenized input, in order, BOS first
        np.testing.assert_array_equal(tokens, np.stack([next(expected_sequences) for _ in range(len(tokens))]))
        assert (tokens[:, 0] == model.tokenizer.bos_token_id).all()
        _, cache = model.run_with_cache(torch.from_numpy(tokens).long(), names_filter=hooks)
        for hook in hooks:
            got = decode_activations(table.column(hook), "float16", manifest.d_model).float()
            want = cache[hook].reshape(-1, manifest.d_model)
            torch.testing.assert_close(got, want, atol=2e-3 * want.abs().max().item(), rtol=1e-2)


def test_both_shard_layouts_hold_the_same_rows(tiny_model, tmp_path):
    """A model host lays each shard out as the writer stores it: position-major (new caches) or in
    sequence order (a build resumed into a cache started before position-major shards). Read back
    in sequence order, both hold the same tokens and activations, row for row."""
    host = ModelHost(str(tiny_model), WeightProcessing())
    hooks = host.resolve_hooks(HOOKS)
    tokens = np.random.default_rng(0).integers(1, 100, (5, 16)).astype(np.int32)
    fs, root = open_url(str(tmp_path))
    tables, sums = {}, {}
    for position_major in (True, False):
        acts, sums[position_major] = host.activations(tokens, hooks, "float32", 2, True, position_major)
        path = f"{root}/{position_major}.parquet"
        write_shard(fs, path, tokens, 7, acts, hooks, "float32", 16, position_major)
        tables[position_major] = in_sequence_order(pq.read_table(path), 16, position_major)
    for column in ("sequence", "position", "token", *hooks):
        assert tables[True].column(column).equals(tables[False].column(column)), column
    np.testing.assert_array_equal(tables[True].column("token").to_numpy().reshape(5, 16), tokens)
    np.testing.assert_array_equal(tables[True].column("sequence").to_numpy(), np.repeat(np.arange(7, 12), 16))
    for hook in hooks:
        np.testing.assert_array_equal(sums[True][hook][0], sums[False][hook][0])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_model_host_forward_reuses_freed_memory(tiny_model, ray_session):
    """A CPU forward frees and allocates megabytes in every layer. In the model host's process,
    once warm, a forward faults in almost no fresh page; with glibc's defaults it faulted pages
    in again on every call (~18 a token for the bench's model), at up to half the forward's speed."""
    def forward_page_faults(host: ModelHost, tokens: np.ndarray) -> int:  # in the host's process
        hooks = host.resolve_hooks(HOOKS)
        host.activations(tokens, hooks, "float16", 128, True, True)  # warm; one batch of all 128 sequences
        faults = []
        for _ in range(3):  # the fewest: Ray's own threads fault now and then in the same process
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            host.activations(tokens, hooks, "float16", 128, True, True)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return min(faults)

    host = ray.remote(ModelHost).remote(str(tiny_model), WeightProcessing(), "cpu", 2)
    tokens = np.random.default_rng(0).integers(1, 100, (128, 64)).astype(np.int32)  # the model's n_ctx: 64
    faults = ray.get(host.__ray_call__.remote(forward_page_faults, tokens))
    ray.kill(host)
    assert faults < 0.25 * tokens.size, faults  # glibc's defaults: 18,000-24,000 here


def test_model_host_hands_the_gil_over_quickly(tiny_model, ray_session):
    """A writer thread beside a forward that holds the GIL gets it back within 0.5 ms, not Python's
    default 5 ms (bench/cache_build.py measures what that does to a shard write)."""
    host = ray.remote(ModelHost).remote(str(tiny_model), WeightProcessing(), "cpu", 1)
    interval = ray.get(host.__ray_call__.remote(lambda _: sys.getswitchinterval()))
    ray.kill(host)
    assert interval == GIL_SWITCH_INTERVAL <= 0.0005


def test_splits_and_manifest(built):
    out, manifest = built
    assert manifest.eval.num_tokens == 512 and manifest.train.num_tokens == 2048
    eval_ids = {s.first_sequence + i for s in manifest.eval.shards for i in range(s.num_sequences)}
    train_ids = {s.first_sequence + i for s in manifest.train.shards for i in range(s.num_sequences)}
    assert not eval_ids & train_ids
    assert len(manifest.train.shards) == manifest.train.planned_shards > 1
    for hook in manifest.config.hooks:
        st = manifest.stats[hook]
        assert st.count == 2048 - 2048 // 32  # every train position but BOS
        assert len(st.mean) == manifest.d_model and st.mean_sq_norm >= st.mean_norm ** 2 > 0
    # the field metadata says how to decode the bytes
    schema = pq.read_schema(os.path.join(out, manifest.train.shards[0].path))
    field = schema.field(manifest.config.hooks[0])
    assert field.metadata == {b"dtype": b"float16", b"d_model": str(manifest.d_model).encode()}


def test_duckdb_reads_the_cache(built):
    import duckdb

    out, manifest = built
    rows, seqs, max_pos, width = duckdb.sql(
        f"select count(*), count(distinct sequence), max(position), max(octet_length(\"{manifest.config.hooks[0]}\"))"
        f" from read_parquet('{out}/train/*.parquet')").fetchall()[0]
    assert (rows, seqs, max_pos, width) == (2048, 64, 31, manifest.d_model * 2)


def test_other_dtypes_built_by_one_started_model_host(tiny_model, corpus, ray_session, tmp_path):
    """Two builds on model hosts started once (build_cache's `hosts`), which outlive both."""
    opts = options(tiny_model, corpus, tmp_path, tokens=256, eval_tokens=0, writers=2)
    hosts = start_model_hosts(opts)
    assert ray.get(hosts[0].describe.remote())["shards_at_once"] == 3  # its forward and two writers
    try:
        for dtype in ("bfloat16", "float32"):
            manifest = build_cache(replace(opts, out=str(tmp_path / dtype), dtype=dtype), progress=False, hosts=hosts)
            fs, root = open_url(str(tmp_path / dtype))
            table = read_shard(fs, root, manifest.train.shards[0])
            acts = decode_activations(table.column(manifest.config.hooks[0]), dtype, manifest.d_model)
            assert acts.dtype == getattr(torch, dtype) and torch.isfinite(acts).all()
        unfolded = replace(opts, out=str(tmp_path / "unfolded"), processing=WeightProcessing(fold_ln=False))
        with pytest.raises(ValueError, match=r"the model hosts given hold .*fold_ln=True.*this build is for .*fold_ln=False"):
            build_cache(unfolded, progress=False, hosts=hosts)
        assert read_manifest(unfolded.out) is None and not any(Path(unfolded.out).iterdir())  # nothing written
        assert ray.get(hosts[0].describe.remote())["d_model"] == manifest.d_model  # still running
    finally:
        ray.kill(hosts[0])


def test_s3_build_equals_local(built, tiny_model, corpus, ray_session, s3_options):
    local_out, local_manifest = built
    url = "s3://actserve-test/caches/tiny"
    manifest = build_cache(options(tiny_model, corpus, url, storage_options=s3_options), progress=False)
    assert read_manifest(url, s3_options) == manifest
    assert manifest.config == local_manifest.config and manifest.stats == local_manifest.stats
    fs, root = open_url(url, s3_options)
    for remote, local in zip(manifest.train.shards, local_manifest.train.shards):
        assert fs.cat_file(f"{root}/{remote.path}") == (Path(local_out) / local.path).read_bytes()


def cli_build_args(tiny_model, corpus, out, tokens=8192):
    return ["cache", "build", "--model", str(tiny_model), "--dataset", str(corpus), "--hooks", HOOKS,
            "--tokens", str(tokens), "--eval-tokens", "512", "--context-size", "32", "--shard-mb", "0.02",
            "--batch-sequences", "2", "--out", str(out), "--quiet"]


def test_killed_build_resumes_to_identical_cache(tiny_model, corpus, ray_session, tmp_path):
    reference = tmp_path / "reference"
    assert cli_main(cli_build_args(tiny_model, corpus, reference)) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "actserve", *cli_build_args(tiny_model, corpus, out)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for a few committed shards, then kill -9 the builder
            m = read_manifest(str(out))
            if m is not None and len(m.train.shards) >= 3:
                break
            assert proc.poll() is None, "the build finished before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    interrupted = read_manifest(str(out))
    assert not interrupted.complete and len(interrupted.train.shards) < interrupted.train.planned_shards

    # resumed with three writers per model host (four shards in flight): the same bytes, in order
    assert cli_main(cli_build_args(tiny_model, corpus, out) + ["--writers", "3"]) == 0
    want, got = read_manifest(str(reference)), read_manifest(str(out))
    assert got == want
    for shard in list(want.eval.shards) + list(want.train.shards):
        assert (out / shard.path).read_bytes() == (reference / shard.path).read_bytes(), shard.path
    # nothing but committed shards and the manifest is left behind
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == {"manifest.json"} | {s.path for s in list(want.eval.shards) + list(want.train.shards)}


# --- bad input: one line naming the problem, exit code 2, nothing written ---------------------


def run_cli_error(capsys, args) -> str:
    code = cli_main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("actserve: error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("change, message", [
    ({"--hooks": "blocks.0.hook_resid_pre,blocks.7.hook_nothing"}, "blocks.7.hook_nothing"),
    ({"--hooks": "blocks.0.hook_resid_pre,blocks.1.mlp.hook_post"}, "blocks.1.mlp.hook_post [256]"),
    ({"--context-size": "4096"}, "n_ctx"),
    ({"--tokens": "0"}, "--tokens must be > 0"),
    ({"--writers": "-1"}, "--writers must be >= 0"),
    ({"--text-column": "body"}, "no column 'body'"),
    ({"--storage-options": "{not json"}, "--storage-options"),
])
def test_bad_build_input(tiny_model, corpus, ray_session, tmp_path, capsys, change, message):
    args = cli_build_args(tiny_model, corpus, tmp_path / "out")
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert message in run_cli_error(capsys, args)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))
    assert read_manifest(str(tmp_path / "out")) is None


def test_unwritable_url(tiny_model, corpus, ray_session, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    err = run_cli_error(capsys, cli_build_args(tiny_model, corpus, blocker / "cache"))
    assert "cannot write to cache URL" in err


def test_mismatched_existing_cache_is_refused(built, tiny_model, corpus, ray_session, capsys):
    out, manifest = built
    before = (Path(out) / "manifest.json").read_bytes()
    args = cli_build_args(tiny_model, corpus, out, tokens=4096)
    err = run_cli_error(capsys, args)
    assert "different config" in err and "train_tokens" in err
    assert (Path(out) / "manifest.json").read_bytes() == before


def test_cache_info(built, capsys):
    out, manifest = built
    assert cli_main(["cache", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2,048 tokens" in text and "complete" in text
    assert cli_main(["cache", "info", str(out), "--json"]) == 0
    assert '"d_model"' in capsys.readouterr().out


# --- object storage that cannot be used: the message says which problem and what to set -------


def test_missing_bucket(tiny_model, corpus, ray_session, s3_options, capsys):
    args = cli_build_args(tiny_model, corpus, "s3://no-such-bucket/cache")
    args += ["--storage-options", json.dumps(s3_options)]
    assert "bucket 'no-such-bucket' does not exist" in run_cli_error(capsys, args)


def test_refusing_endpoint(capsys):
    options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"}, "key": "k", "secret": "s",
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    err = run_cli_error(capsys, ["cache", "info", "s3://bucket/cache", "--storage-options", json.dumps(options)])
    assert "endpoint did not answer" in err and "endpoint_url" in err


def test_missing_credentials(s3_endpoint, monkeypatch, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}, "skip_instance_cache": True}  # fresh credential lookup
    err = run_cli_error(capsys, ["cache", "info", "s3://actserve-test/cache", "--storage-options", json.dumps(options)])
    assert "no credentials found" in err and "AWS_ACCESS_KEY_ID" in err


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, to fill up; skipped where mounting is not permitted."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_full_disk_is_one_line_and_the_build_resumes(small_disk, tiny_model, corpus, ray_session, capsys):
    from actserve.services.verify import verify_cache

    out = small_disk / "cache"
    err = run_cli_error(capsys, cli_build_args(tiny_model, corpus, out))
    assert "no space left" in err, err
    interrupted = read_manifest(str(out))
    assert interrupted is None or not interrupted.complete
    if interrupted is not None:
        # what the manifest lists is whole; the one problem is that the build did not finish
        assert [p for p in verify_cache(str(out)) if "interrupted" not in p] == []
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    assert cli_main(cli_build_args(tiny_model, corpus, out)) == 0
    assert read_manifest(str(out)).complete and verify_cache(str(out)) == []


def test_pyarrow_full_disk_error_names_the_problem():
    # pyarrow's writer raises OSError with errno None and the errno in its text; Ray wraps it
    error = OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert os_error_message(error) == "no space left on the device"


# --- a model host that cannot finish a shard: one line, the committed prefix kept, resumable ----


def test_failed_shard_write_is_one_line_and_the_build_resumes(tiny_model, corpus, ray_session, tmp_path, capsys):
    from actserve.services.verify import verify_cache

    out = tmp_path / "cache"
    out.mkdir()
    (out / "train").write_text("a file where the train shards' directory goes")  # every train write fails
    err = run_cli_error(capsys, cli_build_args(tiny_model, corpus, out))
    assert "train" in err and "File exists" in err, err
    interrupted = read_manifest(str(out))
    assert not interrupted.complete and not interrupted.train.shards
    assert [p for p in verify_cache(str(out)) if "interrupted" not in p] == []  # what it lists is whole
    (out / "train").unlink()
    assert cli_main(cli_build_args(tiny_model, corpus, out)) == 0
    assert read_manifest(str(out)).complete and verify_cache(str(out)) == []


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: Ray's workers are children of its raylet)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def model_host_processes(pid: int) -> list[int]:
    hosts = []
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"ray::ModelHost"):
                hosts.append(child)
    return hosts


def test_killed_model_host_is_one_line_and_the_build_resumes(tiny_model, corpus, ray_session, tmp_path):
    from actserve.services.verify import verify_cache

    out = tmp_path / "killed-host"
    cmd = [sys.executable, "-m", "actserve", *cli_build_args(tiny_model, corpus, out)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # a few shards committed, then the model host dies mid-build
            m = read_manifest(str(out))
            if m is not None and len(m.train.shards) >= 2 and model_host_processes(proc.pid):
                break
            assert proc.poll() is None, "the build finished before its model host could be killed"
            time.sleep(0.05)
        for host in model_host_processes(proc.pid):
            os.kill(host, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # no hang: the builder stops on its own
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2, err
    ours = [line for line in err.splitlines() if line.startswith("actserve")]  # Ray logs its own start
    assert len(ours) == 1 and ours[0].startswith("actserve: error: the model host writing "), err
    assert "died" in ours[0] and "rerun" in ours[0]
    interrupted = read_manifest(str(out))
    assert not interrupted.complete and len(interrupted.train.shards) >= 2
    assert [p for p in verify_cache(str(out)) if "interrupted" not in p] == []
    assert cli_main(cli_build_args(tiny_model, corpus, out)) == 0
    assert read_manifest(str(out)).complete and verify_cache(str(out)) == []
