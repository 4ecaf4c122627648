"""The Flight server against real clients on 127.0.0.1: wire contract, bad input, auth, TLS,
follow mode, S3 through the node-local shard cache."""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import torch

from actserve.proto.stream_pb2 import CacheList, HealthResult, StreamRequest
from actserve.services.shard_format import decode_activations
from actserve.services.storage import open_url
from actserve.services.serve_options import ServeOptions, is_loopback
from actserve.cli import add_serve_parser, dataclass_from_args
from actserve.services.shard_cache import ShardCache
from actserve.services.shuffle import expected_distinct
from actserve.testing import SyntheticCache, SyntheticSpec, read_split, write_synthetic_cache
from streamkit import read_table, row_keys, running_server, server_stats, wait_until

SPEC = SyntheticSpec()  # 6 train shards of 16 sequences of 8 tokens, 2 eval shards, 2 hooks of d_model 16
HOOK = SPEC.hooks[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("streams") / "tiny")
    return url, write_synthetic_cache(url, SPEC)


@pytest.fixture(scope="module")
def server(cache):
    with running_server([cache[0]]) as server:
        yield server


def request(**fields) -> bytes:
    return StreamRequest(**{"cache": "tiny", "batch_size": 100, **fields}).SerializeToString()


def stream_keys(table: pa.Table) -> np.ndarray:
    return row_keys(table.column("sequence"), table.column("position"), SPEC.context_size)


def action(location: str, kind: str, body: bytes = b"", headers=()) -> bytes:
    client = flight.connect(location)
    (result,) = client.do_action(flight.Action(kind, body), flight.FlightCallOptions(headers=list(headers)))
    return result.body.to_pybytes()


# --- the wire contract -------------------------------------------------------------------------


PLAIN_CLIENT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import pyarrow.flight as flight
from actserve.proto import stream_pb2    # generated from the .proto files just now, nothing of the project
assert stream_pb2.__file__.startswith(sys.argv[1]), stream_pb2.__file__
client = flight.connect(sys.argv[2])
req = stream_pb2.StreamRequest(cache="tiny", batch_size=50, seed=3, include_meta=True, drop_bos=True)
info = client.get_flight_info(flight.FlightDescriptor.for_command(req.SerializeToString()))
(endpoint,) = info.endpoints
batches = [chunk.data for chunk in client.do_get(endpoint.ticket)]
(result,) = client.do_action(flight.Action("list-caches", b""))
caches = stream_pb2.CacheList.FromString(result.body.to_pybytes())
print(json.dumps({
    "total_records": info.total_records, "sizes": [b.num_rows for b in batches],
    "columns": batches[0].schema.names, "dtype": batches[0].schema.field(3).metadata[b"dtype"].decode(),
    "keys": [s * 8 + p for b in batches for s, p in zip(b.column(0).to_pylist(), b.column(1).to_pylist())],
    "hooks": list(caches.caches[0].manifest.config.hooks),
    "locations": [loc.uri.decode() for loc in endpoint.locations],
}))
"""


def test_plain_flight_client_with_only_the_proto(server, tmp_path):
    from grpc_tools import protoc

    repo = Path(__file__).resolve().parents[1]
    wire = tmp_path / "wire"
    (wire / "actserve" / "proto").mkdir(parents=True)
    for package in (wire / "actserve", wire / "actserve" / "proto"):
        (package / "__init__.py").write_text("")
    # the files import each other as actserve/proto/..., the package they are installed as
    assert protoc.main(["protoc", f"-Iactserve/proto={repo / 'proto'}", f"--python_out={wire}",
                        "actserve/proto/manifest.proto", "actserve/proto/stream.proto"]) == 0
    script = tmp_path / "client.py"
    script.write_text(PLAIN_CLIENT)
    out = subprocess.run([sys.executable, "-I", str(script), str(wire), server.location],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    kept = 6 * 16 * 7  # train rows without BOS
    assert got["total_records"] == kept and sum(got["sizes"]) == kept
    assert set(got["sizes"][:-1]) == {50} and got["sizes"][-1] == kept % 50
    assert got["columns"] == ["sequence", "position", "token", *SPEC.hooks] and got["dtype"] == "float16"
    assert sorted(got["keys"]) == [k for k in range(2 * 16 * 8, 8 * 16 * 8) if k % 8]  # train ids follow eval's
    assert got["hooks"] == list(SPEC.hooks) and got["locations"] == [server.location]


@pytest.mark.parametrize("batch_size", [1, 7, 128, 767, 768, 5000])
def test_batches_have_exactly_batch_size_rows(server, batch_size):
    client = flight.connect(server.location)
    sizes = [c.data.num_rows for c in client.do_get(flight.Ticket(request(batch_size=batch_size, hooks=[HOOK])))]
    assert sum(sizes) == 768 and all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size


def test_one_call_of_several_epochs_sends_what_a_call_per_epoch_sends(server):
    client = flight.connect(server.location)
    fields = dict(seed=2, num_consumers=2, consumer_index=1, buffer_tokens=200, include_meta=True, hooks=[HOOK])
    before = server_stats(server.location)
    together = [c.data for c in client.do_get(flight.Ticket(request(**fields, epoch=1, start=30, epochs=3)))]
    assert server_stats(server.location).streams_started - before.streams_started == 1
    apart = [c.data for epoch, start in ((1, 30), (2, 0), (3, 0))
             for c in client.do_get(flight.Ticket(request(**fields, epoch=epoch, start=start)))]
    sizes = [b.num_rows for b in apart]
    assert [b.num_rows for b in together] == sizes and sizes.count(100) == len(sizes) - 3  # each epoch's last is short
    assert all(a.equals(b) for a, b in zip(together, apart, strict=True))


def test_rows_carry_their_own_activations(server, cache):
    url, manifest = cache
    reference = read_split(url, manifest, "train")
    first_row = manifest.train.shards[0].first_sequence * SPEC.context_size
    for dtype in ("", "float32"):
        table = read_table(server.location, request(include_meta=True, dtype=dtype, seed=5))
        rows = stream_keys(table) - first_row
        assert np.array_equal(table.column("token").to_numpy(), reference["token"][rows])
        for hook in SPEC.hooks:
            got = decode_activations(table.column(hook), dtype or "float16", SPEC.d_model)
            want = torch.from_numpy(reference[hook][rows]).view(torch.float16)
            assert torch.equal(got, want.to(got.dtype))


def test_actions(server, cache):
    health = HealthResult.FromString(action(server.location, "health"))
    assert health.status == "ok" and health.location == server.location
    caches = CacheList.FromString(action(server.location, "list-caches"))
    (info,) = caches.caches
    assert info.name == "tiny" and info.url == "" and info.manifest == cache[1]  # URLs only with --expose-urls
    assert set(info.manifest.stats) == set(SPEC.hooks) and not caches.unavailable and not health.unavailable
    before = server_stats(server.location)
    read_table(server.location, request())
    after = server_stats(server.location)
    assert after.streams_completed - before.streams_completed == 1 and after.streams_active == 0
    assert after.tokens - before.tokens == 768 and after.bytes - before.bytes == 768 * 2 * 16 * 2  # 2 float16 hooks
    assert after.batches - before.batches == 8 and after.max_batch_size == 65536
    assert after.memory_held_bytes == 0 and 0 < after.memory_peak_bytes <= after.memory_budget_bytes == 8 * 10**9
    assert after.stream_memory_budget_bytes == 10**9 and after.max_streams == 64
    with pytest.raises(pa.ArrowException, match="unknown action"):
        action(server.location, "reboot")


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"cache": "nope"}, r"unknown cache 'nope'; this server serves: tiny\."),  # its URL only with --expose-urls
    ({"cache": ""}, "cache is empty"),
    ({"hooks": ["blocks.9.hook_x"]}, "blocks.9.hook_x.*its hooks: blocks.0.hook_resid_pre, blocks.1.hook_resid_pre"),
    ({"hooks": [HOOK, HOOK]}, "repeated"),
    ({"batch_size": 0}, r"batch_size must be in 1\.\.65536"),
    ({"batch_size": 65537}, r"batch_size must be in 1\.\.65536"),
    ({"num_consumers": 3, "consumer_index": 3}, "consumer_index 3 is out of range for num_consumers 3"),
    ({"consumer_index": 1}, "consumer_index 1 is out of range for num_consumers 1"),
    ({"split": "test"}, "unknown split 'test'"),
    ({"dtype": "int8"}, "dtype 'int8' is not served"),
    ({"start": 10_000}, "past the end of this consumer's part of the epoch"),
    ({"mode": StreamRequest.SEQUENCES, "batch_size": 10}, "multiple of 8"),
    ({"mode": 7}, "unknown mode 7"),
    ({"follow": True, "epochs": 2}, "epochs 2 with follow: a followed split is sent one epoch a call"),
    ({"buffer_tokens": 2**30 + 1}, r"buffer_tokens 1,073,741,825 exceeds this server's limit of 1,073,741,824 "
                                   r"\(--max-buffer-tokens\)"),
])
def test_bad_requests_are_refused_clearly(server, fields, message):
    client = flight.connect(server.location)
    with pytest.raises(pa.ArrowInvalid, match=message):
        client.do_get(flight.Ticket(request(**fields))).read_all()
    with pytest.raises(pa.ArrowInvalid, match=message):
        client.get_flight_info(flight.FlightDescriptor.for_command(request(**fields)))


def test_random_and_malformed_tickets_then_a_normal_stream(server):
    rng = np.random.default_rng(0)
    valid = request()
    tickets = [rng.bytes(int(rng.integers(0, 80))) for _ in range(150)]
    tickets += [valid[:int(n)] for n in rng.integers(0, len(valid), 25)]  # truncated
    tickets += [valid[:int(n)] + rng.bytes(3) + b"\x07" for n in rng.integers(0, len(valid), 25)]  # bad wire type
    client = flight.connect(server.location)
    for ticket in tickets:
        with pytest.raises((pa.ArrowException, flight.FlightError)):
            client.do_get(flight.Ticket(ticket)).read_all()
    assert len(tickets) == 200
    assert read_table(server.location, request()).num_rows == 768


@pytest.mark.parametrize("damage, message", [
    ("garbage", r"shard train/shard-00002\.parquet is corrupt"),
    ("truncated", r"shard train/shard-00002\.parquet is corrupt: \d+ bytes on storage, manifest says"),
    ("missing", r"shard train/shard-00002\.parquet is missing"),
])
def test_damaged_shard_is_named_and_others_keep_streaming(cache, tmp_path, damage, message):
    url, _ = cache
    broken = tmp_path / "broken"
    shutil.copytree(url, broken)
    shard = broken / "train" / "shard-00002.parquet"
    size = shard.stat().st_size
    if damage == "garbage":
        shard.write_bytes(bytes(size))  # same size, no Parquet inside
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: size // 2])
    else:
        shard.unlink()
    with running_server([url, f"broken={broken}"]) as server:
        client = flight.connect(server.location)
        healthy = client.do_get(flight.Ticket(request(batch_size=16)))
        healthy.read_chunk()  # a stream in flight on the good cache while the broken one fails
        with pytest.raises(flight.FlightServerError, match=message):
            client.do_get(flight.Ticket(request(cache="broken"))).read_all()
        assert healthy.read_all().num_rows == 768 - 16
        assert read_table(server.location, request()).num_rows == 768
        stats = server_stats(server.location)
        assert stats.streams_failed == 1 and stats.streams_completed == 2


# --- follow mode -------------------------------------------------------------------------------


def test_follow_mode_sees_shards_committed_after_the_stream_started(tmp_path):
    url = str(tmp_path / "growing")
    build = SyntheticCache(url, SPEC)
    build.commit("eval", SPEC.eval_shards)
    build.commit("train", 4)
    with running_server([url]) as server:
        client = flight.connect(server.location)
        with pytest.raises(pa.ArrowInvalid, match=r"still being built \(4/6 shards committed\): set follow"):
            client.do_get(flight.Ticket(request(cache="growing"))).read_all()
        info = client.get_flight_info(flight.FlightDescriptor.for_command(request(cache="growing", follow=True)))
        assert info.total_records == -1  # not known while the cache grows

        batches, done = [], threading.Event()

        def follow():
            reader = client.do_get(flight.Ticket(request(cache="growing", follow=True, include_meta=True,
                                                         buffer_tokens=2 * 128, batch_size=64)))
            batches.extend(chunk.data for chunk in reader)
            done.set()

        thread = threading.Thread(target=follow)
        thread.start()
        wait_until(lambda: sum(b.num_rows for b in batches) == 4 * 128, what="the 4 committed shards")
        assert not done.wait(0.3)  # served what exists, and waits for more
        build.commit("train", 1)
        assert not done.wait(0.3)  # a buffer needs 2 shards' rows while the build runs
        build.finish()
        thread.join(timeout=20)
    assert done.is_set()
    keys = stream_keys(pa.Table.from_batches(batches))
    train_first = SPEC.eval_shards * 16 * 8
    assert sorted(keys.tolist()) == list(range(train_first, train_first + 6 * 128))
    assert set(keys[4 * 128:] // 128 - SPEC.eval_shards) == {4, 5}  # the late shards come last


def test_follow_streams_end_with_their_split_or_their_client(tmp_path):
    url = str(tmp_path / "growing")
    build = SyntheticCache(url, SPEC)
    build.commit("eval", SPEC.eval_shards)
    build.commit("train", 1)
    with running_server([url]) as server:
        # eval is complete while train is still being built: following it ends, last short buffer included
        table = read_table(server.location, request(cache="growing", split="eval", follow=True, buffer_tokens=3 * 128))
        assert table.num_rows == SPEC.eval_shards * 128
        client = flight.connect(server.location)
        reader = client.do_get(flight.Ticket(request(cache="growing", follow=True, buffer_tokens=128)))
        reader.read_chunk()
        reader.cancel()  # the client goes away while the stream waits for the build
        wait_until(lambda: server_stats(server.location).streams_active == 0,
                   what="the abandoned stream to be released")


# --- security ----------------------------------------------------------------------------------


def test_non_loopback_bind_needs_a_token(monkeypatch, cache):
    monkeypatch.delenv("ACTSERVE_TOKEN", raising=False)
    with pytest.raises(ValueError, match=r"binding 0\.0\.0\.0 \(not a loopback address\) needs a bearer token: set \$ACTSERVE_TOKEN"):
        ServeOptions(caches=(cache[0],), host="0.0.0.0").token()
    assert ServeOptions(caches=(cache[0],), host="0.0.0.0", insecure=True).token() is None
    # all of 127/8 is loopback (Linux routes it to lo): no token needed there
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    monkeypatch.setenv("MY_TOKEN", "s3cret")
    assert ServeOptions(caches=(cache[0],), host="0.0.0.0", token_env="MY_TOKEN").token() == "s3cret"


def test_token_is_enforced(cache):
    with running_server([cache[0]], host="0.0.0.0", token="s3cret") as server:
        location = f"grpc://127.0.0.1:{server.port}"
        with pytest.raises(flight.FlightUnauthenticatedError, match="requires `authorization: Bearer <token>` and the call had no bearer token"):
            read_table(location, request())
        with pytest.raises(flight.FlightUnauthenticatedError, match="a wrong bearer token"):
            read_table(location, request(), headers=[(b"authorization", b"Bearer guess")])
        with pytest.raises(flight.FlightUnauthenticatedError):
            action(location, "health")
        assert read_table(location, request(), headers=[(b"authorization", b"Bearer s3cret")]).num_rows == 768


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls(cache, tmp_path):
    cert, key = self_signed(tmp_path)
    with running_server([cache[0]], tls_cert=str(cert), tls_key=str(key)) as server:
        assert server.location.startswith("grpc+tls://127.0.0.1:")
        client = flight.FlightClient(server.location, tls_root_certs=cert.read_bytes())
        assert client.do_get(flight.Ticket(request())).read_all().num_rows == 768
        with pytest.raises(flight.FlightUnavailableError):
            flight.FlightClient(server.location).do_get(flight.Ticket(request())).read_all()  # unverified cert


class RecordingPeer(flight.FlightServerBase):
    """A Flight server on loopback that records the headers of every call it receives."""

    class Recorder(flight.ServerMiddlewareFactory):
        def __init__(self, calls):
            self.calls = calls

        def start_call(self, info, headers):
            self.calls.append(headers)

    def __init__(self):
        self.calls = []
        super().__init__("grpc://127.0.0.1:0", middleware={"recorder": self.Recorder(self.calls)})


def test_token_never_reaches_a_plaintext_peer_of_a_tls_server(cache, tmp_path):
    from actserve.clients.stream import ActivationStream, StreamUnavailable

    cert, key = self_signed(tmp_path)
    peer = RecordingPeer()
    threading.Thread(target=peer.serve, daemon=True).start()
    peer_location = f"grpc://127.0.0.1:{peer.port}"
    try:
        with running_server([cache[0]], token="s3cret", tls_cert=str(cert), tls_key=str(key),
                            peers=(peer_location,)) as server:
            stream = ActivationStream(server.location, cache="tiny", batch_size=64, token="s3cret",
                                      tls_root_certs=cert.read_bytes(), reconnect_timeout=1.0, backoff=(0.05, 0.2))
            assert peer_location not in stream.locations and stream.hooks  # listed by the server, dropped
        with pytest.raises(StreamUnavailable):  # the TLS server is gone: the client must not fail over in the clear
            next(iter(stream))
        assert peer.calls == [], f"the plaintext peer received {peer.calls}"
    finally:
        peer.shutdown()


# --- remote caches -----------------------------------------------------------------------------


def test_s3_cache_through_the_node_local_shard_cache(s3_options, tmp_path):
    url = "s3://actserve-test/stream/tiny"
    manifest = write_synthetic_cache(url, SPEC, s3_options)
    local = tmp_path / "shards"
    with running_server([url], storage_options=s3_options, local_cache_dir=str(local), local_cache_gb=1) as server:
        for epoch in range(2):
            table = read_table(server.location, request(epoch=epoch, include_meta=True, drop_bos=True, buffer_tokens=2 * 112))
            assert len(np.unique(stream_keys(table))) == table.num_rows == 672
        stats = server_stats(server.location)
    assert stats.shard_fetches == 6 and stats.shard_cache_hits == 6  # fetched once, then read locally
    assert sorted(p.name for p in local.rglob("*.parquet")) == [f"shard-{i:05d}.parquet" for i in range(6)]
    assert sum(s.num_bytes for s in manifest.train.shards) == sum(p.stat().st_size for p in local.rglob("*.parquet"))


def test_shard_cache_fetches_once_per_node_and_evicts_lru(cache, tmp_path):
    url, manifest = cache
    fs, root = open_url(url)
    shards = list(manifest.train.shards)
    caches = [ShardCache(str(tmp_path / "node"), 10**9) for _ in range(2)]  # two server processes' views

    def read_all(shard_cache):
        for shard in shards:
            assert shard_cache.read(fs, root, shard, [HOOK]).num_rows == 128

    threads = [threading.Thread(target=read_all, args=(caches[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(c.fetches for c in caches) == len(shards) and sum(c.hits for c in caches) == 3 * len(shards)

    small = ShardCache(str(tmp_path / "small"), int(2.5 * shards[0].num_bytes))
    for shard in shards:
        small.read(fs, root, shard, [HOOK])
    small.read(fs, root, shards[-2], [HOOK])  # most recently used: kept
    small.read(fs, root, shards[0], [HOOK])   # evicts the least recently used, shards[-1]
    kept = sorted(p.name for p in (tmp_path / "small").rglob("*.parquet"))
    assert kept == [Path(shards[0].path).name, Path(shards[-2].path).name] and small.fetches == len(shards) + 1


# --- running it --------------------------------------------------------------------------------


def test_serve_command_line(cache, tmp_path):
    parser = argparse.ArgumentParser(prog="actserve")
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--cache", f"mine={cache[0]}", "--cache", "s3://b/x", "--port", "8815",
                              "--servers", "2", "--storage-options", '{"anon": true}', "--local-cache-gb", "0",
                              "--peer", "grpc://a:1", "--peer", "grpc://b:2", "--insecure"])
    opts = dataclass_from_args(ServeOptions, args)
    assert opts.caches == (f"mine={cache[0]}", "s3://b/x") and opts.port == 8815 and opts.servers == 2
    assert opts.peers == ("grpc://a:1", "grpc://b:2") and opts.insecure and not opts.debug
    assert opts.storage_options == {"anon": True} and args.func.__name__ == "run_serve_command"
    for bad, message in [(["--storage-options", "{oops"], "--storage-options is not valid JSON"),
                         (["--tls-cert", str(tmp_path)], "--tls-cert and --tls-key go together"),
                         (["--servers", "0"], "--servers must be >= 1")]:
        with pytest.raises(ValueError, match=message):
            dataclass_from_args(ServeOptions, parser.parse_args(["serve", "--cache", cache[0], *bad]))
    with pytest.raises(ValueError, match="share a name"):
        ServeOptions(caches=(cache[0], f"{cache[0]}/"))


def test_server_actors_are_replicas(cache, ray_session):
    import ray

    from actserve.services.run_server import start_actors

    actors = start_actors(ServeOptions(caches=(cache[0],), servers=2, local_cache_gb=0), token=None)
    try:
        locations = ray.get([a.location.remote() for a in actors])
        client = flight.connect(locations[1])
        info = client.get_flight_info(flight.FlightDescriptor.for_command(request(seed=9)))
        (endpoint,) = info.endpoints  # one ticket, redeemable at either replica
        assert [loc.uri.decode() for loc in endpoint.locations] == locations
        tables = [flight.connect(loc).do_get(endpoint.ticket).read_all() for loc in locations]
        assert tables[0].equals(tables[1]) and tables[0].num_rows == 768
    finally:
        for actor in actors:
            ray.kill(actor)


def test_a_batch_mixes_as_many_sequences_as_a_global_shuffle(tmp_path):
    """Through the server, from many small shards: distinct sequences per batch within 10% of the
    computed expectation of a uniform shuffle of the whole split (proto/stream.proto)."""
    spec = SyntheticSpec(context_size=8, sequences_per_shard=3, train_shards=300, eval_shards=1)
    url = str(tmp_path / "many")
    write_synthetic_cache(url, spec)
    batch = 40
    with running_server([url]) as server:
        table = read_table(server.location, request(cache="many", batch_size=batch, include_meta=True, drop_bos=True,
                                                    buffer_tokens=5 * batch * 7))
    sequences = table.column("sequence").to_numpy()
    counts = [len(np.unique(sequences[k:k + batch])) for k in range(0, len(sequences) - batch + 1, batch)]
    uniform = expected_distinct(spec.train_shards * spec.sequences_per_shard, batch)
    assert abs(np.mean(counts) / uniform - 1) <= 0.1, (np.mean(counts), uniform)


def test_a_built_cache_mixes_as_many_sequences_as_a_global_shuffle(tiny_cache, tiny_server):
    """The same through a cache the real builder wrote (the tiny model, 2 MB position-major shards)."""
    _, manifest = tiny_cache
    assert manifest.config.position_major
    batch, ctx = 64, manifest.config.context_size
    table = read_table(tiny_server, StreamRequest(cache="tiny", batch_size=batch, include_meta=True, drop_bos=True,
                                                  hooks=[manifest.config.hooks[0]],
                                                  buffer_tokens=10 * batch * (ctx - 1)).SerializeToString())
    sequences = table.column("sequence").to_numpy()
    counts = [len(np.unique(sequences[k:k + batch])) for k in range(0, len(sequences) - batch + 1, batch)]
    uniform = expected_distinct(manifest.train.num_tokens // ctx, batch)
    assert abs(np.mean(counts) / uniform - 1) <= 0.1, (np.mean(counts), uniform)
