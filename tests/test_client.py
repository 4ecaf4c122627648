"""ActivationStream against real servers on 127.0.0.1: exactly-once epochs, consumers, seeds,
resume, a server killed and restarted mid-stream, many concurrent clients."""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from actserve.clients.stream import ActivationStream, StreamUnavailable
from actserve.services.storage import CacheError
from conftest import free_port
from actserve.testing import SyntheticSpec, read_split, write_synthetic_cache
from streamkit import row_keys, running_server, server_process, server_stats

SPEC = SyntheticSpec(train_shards=6, eval_shards=2)  # 16 sequences of 8 tokens per shard
CTX = SPEC.context_size
TRAIN_FIRST_ROW = SPEC.eval_shards * 16 * CTX  # train sequence ids follow eval's
TRAIN_KEYS = [k for k in range(TRAIN_FIRST_ROW, TRAIN_FIRST_ROW + 6 * 128) if k % CTX]  # BOS dropped


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("client") / "tiny")
    return url, write_synthetic_cache(url, SPEC)


@pytest.fixture(scope="module")
def server(cache):
    with running_server([cache[0]], buffer_tokens=2 * 128) as server:
        yield server


def stream(server, **options) -> ActivationStream:
    return ActivationStream(server.location, **{"cache": "tiny", "batch_size": 50, "include_meta": True, **options})


def keys_of(batches) -> np.ndarray:
    if not batches:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([row_keys(b["sequence"], b["position"], CTX) for b in batches])


def test_one_epoch_exactly_once_with_the_right_values(server, cache):
    url, manifest = cache
    s = stream(server, batch_size=64)
    batches = list(s)
    assert sorted(keys_of(batches).tolist()) == TRAIN_KEYS
    assert [len(b["token"]) for b in batches[:-1]] == [64] * (len(batches) - 1)
    reference = read_split(url, manifest, "train")
    rows = keys_of(batches) - TRAIN_FIRST_ROW
    for hook in SPEC.hooks:
        got = torch.cat([b[hook] for b in batches])
        assert got.dtype == torch.float32 and got.shape == (len(TRAIN_KEYS), SPEC.d_model)
        assert torch.equal(got, torch.from_numpy(reference[hook][rows]).view(torch.float16).float())
    assert s.d_model == SPEC.d_model and s.hooks == list(SPEC.hooks) and s.epoch_tokens == len(TRAIN_KEYS)
    assert set(s.hook_stats) == set(SPEC.hooks) and s.hook_stats[SPEC.hooks[0]].count == len(TRAIN_KEYS)
    assert s.state_dict()["position"] == len(TRAIN_KEYS)


def test_cache_dtype_and_chosen_hooks(server):
    batch = next(iter(stream(server, dtype=None, hooks=(SPEC.hooks[1],), include_meta=False)))
    assert list(batch) == [SPEC.hooks[1]] and batch[SPEC.hooks[1]].dtype == torch.float16


def test_a_refused_request_is_the_servers_one_line(server):
    # gRPC appends ". Detail: " and the server's Python traceback to a refused request's text
    with pytest.raises(pa.ArrowInvalid) as refused:
        next(iter(stream(server, hooks=("blocks.9.hook_resid_pre",))))
    text = str(refused.value)
    assert text.startswith("unknown or repeated hooks ['blocks.9.hook_resid_pre'] for cache tiny"), text
    assert "Detail" not in text and "Traceback" not in text and len(text.splitlines()) == 1


def test_three_consumers_are_disjoint_and_cover_the_epoch(server):
    parts = [None] * 3

    def consume(c):
        parts[c] = keys_of(list(stream(server, consumer_index=c, num_consumers=3)))

    threads = [threading.Thread(target=consume, args=(c,)) for c in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sets = [set(p.tolist()) for p in parts]
    assert all(len(s) == len(p) for s, p in zip(sets, parts))
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sorted(sets[0] | sets[1] | sets[2]) == TRAIN_KEYS


def test_seeds_and_epochs_decide_the_order(server):
    def order(**kw):
        return keys_of(list(stream(server, **kw)))

    a = order(seed=1)
    assert np.array_equal(a, order(seed=1))
    assert not np.array_equal(a, order(seed=2))
    two = keys_of(list(stream(server, seed=1, epochs=2)))
    assert np.array_equal(two[:len(a)], a) and not np.array_equal(two[len(a):], a)
    assert sorted(two[len(a):].tolist()) == TRAIN_KEYS


def test_epochs_come_in_one_call(server):
    before = server_stats(server.location)
    keys = keys_of(list(stream(server, seed=6, epochs=3, batch_size=64)))
    assert server_stats(server.location).streams_started - before.streams_started == 1
    n = len(TRAIN_KEYS)
    assert len(keys) == 3 * n and all(sorted(keys[e * n:(e + 1) * n].tolist()) == TRAIN_KEYS for e in range(3))


def test_resume_from_state_equals_the_uninterrupted_tail(server):
    full = keys_of(list(stream(server, seed=4, epochs=2)))
    first = stream(server, seed=4, epochs=2)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == 17:  # into the second epoch (14 batches per epoch)
            break
    state = first.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3 * 50
    resumed = stream(server, seed=4, epochs=2, batch_size=37)  # batch size may change; the order may not
    resumed.load_state_dict(state)
    tail = keys_of(list(resumed))
    assert np.array_equal(np.concatenate([keys_of(head), tail]), full)
    with pytest.raises(ValueError, match="seed: saved 4, now 5"):
        stream(server, seed=5).load_state_dict(state)


def test_read_from_gives_the_servers_batches_and_resumes_as_they_do(server, cache, tmp_path):
    url, _ = cache
    options = dict(seed=3, epochs=2, num_consumers=2, consumer_index=1)
    served = list(stream(server, **options))
    direct = stream(server, read_from=url, **options)
    cut = list(direct)
    assert [list(b) for b in cut] == [list(b) for b in served]
    assert all(torch.equal(c[k], s[k]) for c, s in zip(cut, served, strict=True) for k in s)
    # in the cache's dtype every tensor views its buffer's memory, which later buffers reuse only
    # once nothing views it: batches held to the end keep their values
    views = list(stream(server, read_from=url, dtype=None, **options))
    assert all(torch.equal(v[k].float(), s[k]) for v, s in zip(views, served, strict=True) for k in s)

    first = stream(server, read_from=url, **options)
    head = [batch for _, batch in zip(range(9), first)]  # into the second epoch (7 batches each)
    resumed = stream(server, read_from=url, **options)
    resumed.load_state_dict(first.state_dict())
    assert np.array_equal(np.concatenate([keys_of(head), keys_of(list(resumed))]), keys_of(served))

    other = str(tmp_path / "other")
    write_synthetic_cache(other, SyntheticSpec(train_shards=5, eval_shards=2))
    with pytest.raises(ValueError, match=r"holds other train shards than the server's cache tiny: not the same cache"):
        next(iter(stream(server, read_from=other)))
    with pytest.raises(CacheError, match=r"no cache at .*missing"):
        next(iter(stream(server, read_from=str(tmp_path / "missing"))))


def test_endless_epochs_each_exactly_once(server):
    s = stream(server, epochs=None, batch_size=128)
    seen = []
    for batch in s:
        seen.append(batch)
        if s.epoch == 3:
            break
    s.close()
    keys = keys_of(seen)
    per_epoch = len(TRAIN_KEYS)
    for e in range(3):
        assert sorted(keys[e * per_epoch:(e + 1) * per_epoch].tolist()) == TRAIN_KEYS


def test_sequences_of_the_eval_split_in_order(server):
    batches = list(stream(server, split="eval", mode="sequences", batch_size=2 * CTX, drop_bos=False))
    keys = keys_of(batches)
    assert np.array_equal(keys, np.arange(SPEC.eval_shards * 16 * CTX))
    assert all(len(b["position"]) == 2 * CTX and b["position"][0] == 0 for b in batches)


@pytest.mark.parametrize("read_from", [False, True])
def test_sequences_split_between_consumers_with_buffers_smaller_than_a_shard(server, cache, read_from):
    """Whole sequences, 3 consumers, a buffer of one sequence: each buffer is a whole position-major
    shard of 16 sequences, of which a consumer's range takes up to all; every row once, in order."""
    options = dict(split="eval", mode="sequences", batch_size=2 * CTX, drop_bos=False, buffer_tokens=CTX, num_consumers=3)
    if read_from:
        options["read_from"] = cache[0]
    parts = [keys_of(list(stream(server, consumer_index=c, **options))) for c in range(3)]
    assert np.array_equal(np.concatenate(parts), np.arange(SPEC.eval_shards * 16 * CTX))


def test_a_cache_in_sequence_order_streams_the_same(tmp_path):
    """Caches built before position-major shards (rows in sequence order) stream every row once,
    with its own values, and their sequences in order."""
    url = str(tmp_path / "tiny")
    manifest = write_synthetic_cache(url, dataclasses.replace(SPEC, position_major=False))
    assert not manifest.config.position_major
    reference = read_split(url, manifest, "train")
    with running_server([url], buffer_tokens=2 * 128) as old:
        batches = list(stream(old, batch_size=64))
        assert sorted(keys_of(batches).tolist()) == TRAIN_KEYS
        got = torch.cat([b[SPEC.hooks[0]] for b in batches])
        want = torch.from_numpy(reference[SPEC.hooks[0]][keys_of(batches) - TRAIN_FIRST_ROW]).view(torch.float16)
        assert torch.equal(got, want.float())
        in_order = keys_of(list(stream(old, split="eval", mode="sequences", batch_size=2 * CTX, drop_bos=False)))
        assert np.array_equal(in_order, np.arange(SPEC.eval_shards * 16 * CTX))


def test_sixteen_concurrent_clients(server):
    results, errors = [None] * 16, []

    def consume(c):
        try:
            results[c] = keys_of(list(stream(server, consumer_index=c, num_consumers=16, batch_size=8, seed=7)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=consume, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    union = np.concatenate(results)
    assert len(union) == len(TRAIN_KEYS) and sorted(union.tolist()) == TRAIN_KEYS


def test_server_killed_mid_stream_and_restarted(tmp_path):
    # big enough (16 MB) that the stream is still in flight when the server dies
    spec = SyntheticSpec(d_model=256, context_size=32, sequences_per_shard=64, train_shards=8, eval_shards=0)
    url = str(tmp_path / "big")
    write_synthetic_cache(url, spec)
    port = free_port()
    server = server_process(url, port)
    restarted = []

    def restart():
        time.sleep(1.0)  # the client finds nothing listening, and backs off
        restarted.append(server_process(url, port))

    s = ActivationStream(f"grpc://127.0.0.1:{port}", cache="big", batch_size=256, include_meta=True, prefetch=2,
                         backoff=(0.05, 0.5), reconnect_timeout=30)
    keys = []
    try:
        for i, batch in enumerate(s):
            keys.append(row_keys(batch["sequence"], batch["position"], spec.context_size))
            if i == 4:
                server.kill()
                server.wait()
                threading.Thread(target=restart).start()
    finally:
        server.kill()
        wait_for = time.monotonic() + 30
        while not restarted and time.monotonic() < wait_for:
            time.sleep(0.05)
        for proc in restarted:
            proc.kill()
            proc.wait()
    keys = np.concatenate(keys)
    rows = spec.train_shards * spec.sequences_per_shard * spec.context_size
    assert s.reconnects >= 1
    assert len(keys) == rows - rows // spec.context_size  # nothing lost, nothing twice
    assert sorted(keys.tolist()) == [k for k in range(rows) if k % spec.context_size]


def test_unreachable_server_gives_up_with_a_clear_error():
    port = free_port()
    s = ActivationStream(f"grpc://127.0.0.1:{port}", cache="tiny", reconnect_timeout=0.5, backoff=(0.05, 0.1))
    with pytest.raises(StreamUnavailable, match=rf"no actserve server answered at grpc://127\.0\.0\.1:{port}.*actserve serve --cache"):
        list(s)


def test_token_on_the_client(cache):
    with running_server([cache[0]], host="0.0.0.0", token="s3cret") as server:
        location = f"grpc://127.0.0.1:{server.port}"
        assert len(list(ActivationStream(location, cache="tiny", batch_size=256, token="s3cret"))) == 3
        with pytest.raises(Exception, match="wrong bearer token"):
            list(ActivationStream(location, cache="tiny", token="guess"))


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"consumer_index": 2, "num_consumers": 2}, r"consumer_index must be in 0\.\.1"),
    ({"mode": "random"}, "mode must be one of shuffled, sequences"),
    ({"epochs": 0}, "epochs must be >= 1 or None"),
])
def test_bad_client_options(options, message):
    with pytest.raises(ValueError, match=message):
        ActivationStream("grpc://127.0.0.1:1", cache="tiny", **options)


def test_token_goes_only_to_replicas_of_the_given_scheme():
    from actserve.clients.stream import trusted_replicas

    tls, plain = "grpc+tls://a:1", "grpc://a:1"
    assert trusted_replicas([tls], [tls, "grpc+tls://b:2", "grpc://b:2"]) == ([tls, "grpc+tls://b:2"], ["grpc://b:2"])
    assert trusted_replicas([plain], [plain, "grpc://b:2", "grpc+tls://b:2"]) == ([plain, "grpc://b:2"], ["grpc+tls://b:2"])
    assert trusted_replicas([tls, plain], ["grpc://c:3", "grpc+tls://c:3"]) == (["grpc+tls://c:3"], ["grpc://c:3"])
    assert trusted_replicas([tls], ["unix:///tmp/s", "http://evil:80"]) == ([], ["unix:///tmp/s", "http://evil:80"])
