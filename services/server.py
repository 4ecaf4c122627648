"""The activation server: an Arrow Flight service streaming cached activations, shuffled, exactly
once per epoch, to many trainers and evaluators (the wire contract is proto/stream.proto).

One server process answers every call under one GIL, so the per-batch Python work is kept to one
`take` call and a yield: a block's shards are read by pyarrow into one table, and each batch's rows
are gathered from it by `take` in C++ (both release the GIL). Concurrency beyond one process comes
from several server processes (`--servers K`: Ray actors, each a FlightServer on its own port),
listed together as the locations of the endpoint that get_flight_info returns.

Each stream has its own reader thread that reads the next block while the current one is sent, so
a stream holds at most two blocks in memory. A stream that fails (a corrupt or missing shard) ends
with an error naming the shard; the other streams go on.
"""
from __future__ import annotations

import argparse
import contextlib
import hmac
import importlib.metadata
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf.message import DecodeError

from proto.manifest_pb2 import Manifest, Shard
from proto.stream_pb2 import CacheInfo, CacheList, HealthResult, ListCachesRequest, ServerStats, StreamRequest
from services.cache import (
    META_COLUMNS, SPLITS, CacheError, decode_activations, encode_activations, is_local, open_url, read_manifest,
    read_shard, shard_schema,
)
from services.shard_cache import ShardCache
from services.shuffle import Block, Order, consumer_rows, epoch_blocks, locate, row_indices

VERSION = f"actserve {importlib.metadata.version('actserve')}"
FOLLOW_POLL = (0.05, 2.0)  # seconds: first and longest wait between manifest polls in follow mode
MODES = {StreamRequest.SHUFFLED_TOKENS: "SHUFFLED_TOKENS", StreamRequest.SEQUENCES: "SEQUENCES"}
CANCEL_CHECK = 1.0  # seconds between checks that the client of a waiting stream is still there


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: localhost and all of 127.0.0.0/8 and ::1.

    127.0.0.2 and the rest of 127/8 count as loopback: Linux routes them to `lo`, so nothing off the
    machine can connect. A wildcard (0.0.0.0, ::) or any other address or name needs a token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_cache_spec(spec: str) -> tuple[str, str]:
    """`name=URL` or `URL` (named by its last path component) -> (name, URL)."""
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)=(.+)", spec)
    if match:
        return match.group(1), match.group(2)
    url = spec.rstrip("/")
    return url.rsplit("/", 1)[-1] or url, url


@dataclass(frozen=True)
class ServeOptions:
    """Everything `actserve serve` takes; validated here, trusted below."""
    caches: tuple[str, ...]            # "URL" or "name=URL"
    host: str = "127.0.0.1"
    port: int = 0                      # 0: any free port; with servers=K, ports port..port+K-1
    servers: int = 1                   # server processes (Ray actors when > 1)
    token_env: str = "ACTSERVE_TOKEN"  # environment variable holding the bearer token
    insecure: bool = False             # allow a non-loopback bind without a token
    tls_cert: str = ""                 # PEM files; both or neither
    tls_key: str = ""
    storage_options: dict = field(default_factory=dict)
    local_cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "actserve", "shards")
    local_cache_gb: float = 20.0       # 0: read remote shards directly, no node-local copy
    max_batch_size: int = 65536        # tokens
    block_shards: int = 4              # default shuffle block, in shards
    max_block_shards: int = 64
    peers: tuple[str, ...] = ()        # more grpc:// locations serving the same caches
    ray_address: str | None = None

    def __post_init__(self):
        names = [parse_cache_spec(c)[0] for c in self.caches]
        checks = [
            (bool(self.caches), "give at least one --cache URL"),
            (len(set(names)) == len(names), f"two caches share a name in {list(self.caches)}: use name=URL"),
            (0 <= self.port <= 65535 - self.servers + 1, f"--port must be in 0..65535, got {self.port}"),
            (self.servers >= 1, f"--servers must be >= 1, got {self.servers}"),
            (bool(self.tls_cert) == bool(self.tls_key), "--tls-cert and --tls-key go together"),
            (self.local_cache_gb >= 0, f"--local-cache-gb must be >= 0, got {self.local_cache_gb}"),
            (self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size}"),
            (1 <= self.block_shards <= self.max_block_shards,
             f"block_shards must be in 1..{self.max_block_shards}, got {self.block_shards}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for path in (self.tls_cert, self.tls_key):
            if path and not os.path.isfile(path):
                raise ValueError(f"TLS file {path} does not exist")

    @property
    def scheme(self) -> str:
        return "grpc+tls" if self.tls_cert else "grpc"

    def token(self) -> str | None:
        """The bearer token from the environment; a non-loopback bind without one is refused."""
        token = os.environ.get(self.token_env) or None
        if token is None and not is_loopback(self.host) and not self.insecure:
            raise ValueError(
                f"binding {self.host} (not a loopback address) needs a bearer token: set ${self.token_env} "
                "(clients send it as `authorization: Bearer <token>`), or pass --insecure"
            )
        return token


# --- caches ------------------------------------------------------------------------------------


class CacheSource:
    """One served cache: its manifest (re-read while the cache is being built) and its shards."""

    def __init__(self, name: str, url: str, storage_options: dict, shard_cache: ShardCache | None):
        self.name, self.url = name, url
        self.storage_options = storage_options
        self.fs, self.root = open_url(url, storage_options)
        self.shard_cache = None if is_local(self.fs) else shard_cache  # local disk needs no copy
        manifest = read_manifest(url, storage_options)
        if manifest is None:
            raise CacheError(f"no cache at {url} (no manifest.json there)")
        self._manifest = manifest

    def manifest(self) -> Manifest:
        if not self._manifest.complete:  # a build is (or was) running: pick up new commits
            self._manifest = read_manifest(self.url, self.storage_options) or self._manifest
        return self._manifest

    def read(self, shard: Shard, columns: list[str]) -> pa.Table:
        if self.shard_cache is not None:
            return self.shard_cache.read(self.fs, self.root, shard, columns)
        return read_shard(self.fs, self.root, shard, columns)

    def info(self) -> CacheInfo:
        return CacheInfo(name=self.name, url=self.url, manifest=self.manifest())


def split_complete(manifest: Manifest, split_name: str) -> bool:
    """Every shard of the split is committed (the eval split is built first, so it completes early)."""
    split = getattr(manifest, split_name)
    return manifest.complete or len(split.shards) >= split.planned_shards


# --- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamPlan:
    """A validated request: what to read and how to send it."""
    source: CacheSource
    request: StreamRequest     # every default resolved: the ticket get_flight_info hands out
    order: Order
    schema: pa.Schema          # sent
    cache_dtype: str           # of the shards; schema's dtype differs when the server converts to float32
    d_model: int
    row_bytes: int             # bytes of one sent row
    consumer_rows: int | None  # rows of this consumer's epoch; None while a followed cache grows


def decode_request(raw: bytes) -> StreamRequest:
    try:
        request = StreamRequest.FromString(raw)
    except (DecodeError, ValueError) as e:
        raise ValueError(f"the ticket is not a serialized actserve.v1.StreamRequest ({e}); see proto/stream.proto") from e
    if not request.cache:
        raise ValueError("StreamRequest.cache is empty: name the cache to stream (the `list-caches` action lists them)")
    return request


class StreamStats:
    """Counters of the `stats` action, updated by every stream's thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.streams_started = self.streams_active = self.streams_completed = self.streams_failed = 0
        self.batches = self.tokens = self.bytes = 0

    def started(self) -> None:
        with self.lock:
            self.streams_started += 1
            self.streams_active += 1

    def sent(self, rows: int, row_bytes: int) -> None:
        with self.lock:
            self.batches += 1
            self.tokens += rows
            self.bytes += rows * row_bytes

    def ended(self, ok: bool) -> None:
        with self.lock:
            self.streams_active -= 1
            if ok:
                self.streams_completed += 1
            else:
                self.streams_failed += 1


# --- the server --------------------------------------------------------------------------------


class BearerTokenMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Rejects every call without `authorization: Bearer <token>`."""

    def __init__(self, token: str, token_env: str):
        self.expected = f"Bearer {token}".encode()
        self.token_env = token_env

    def start_call(self, info, headers):
        sent = headers.get("authorization", [])
        if not any(hmac.compare_digest(value.encode() if isinstance(value, str) else value, self.expected)
                   for value in sent):
            why = "a wrong bearer token" if sent else "no bearer token"
            raise flight.FlightUnauthenticatedError(
                f"actserve: this server requires `authorization: Bearer <token>` and the call had {why}; "
                f"use the token the server was started with (${self.token_env})"
            )
        return None


class ActivationServer(flight.FlightServerBase):
    def __init__(self, options: ServeOptions, port: int | None = None, token: str | None = None):
        self.options = options
        middleware = {"auth": BearerTokenMiddlewareFactory(token, options.token_env)} if token else {}
        tls = []
        if options.tls_cert:
            with open(options.tls_cert, "rb") as cert, open(options.tls_key, "rb") as key:
                tls = [flight.CertKeyPair(cert=cert.read(), key=key.read())]
        port = options.port if port is None else port
        super().__init__(f"{options.scheme}://{options.host}:{port}", tls_certificates=tls, middleware=middleware)
        host = options.host if options.host not in ("0.0.0.0", "::") else os.uname().nodename
        self.location = f"{options.scheme}://{host}:{self.port}"
        self.locations = [self.location, *options.peers]  # the replicas get_flight_info lists
        shard_cache = None
        if options.local_cache_gb > 0:
            shard_cache = ShardCache(options.local_cache_dir, int(options.local_cache_gb * 1e9))
        self.shard_cache = shard_cache
        self.caches: dict[str, CacheSource] = {}
        for spec in options.caches:
            name, url = parse_cache_spec(spec)
            self.caches[name] = CacheSource(name, url, options.storage_options, shard_cache)
        self.stats = StreamStats()
        self.started_at = time.time()

    # -- validation --

    def find_cache(self, name_or_url: str) -> CacheSource:
        for source in self.caches.values():
            if name_or_url in (source.name, source.url):
                return source
        served = ", ".join(f"{s.name} ({s.url})" for s in self.caches.values())
        raise ValueError(f"unknown cache {name_or_url!r}; this server serves: {served}")

    def plan(self, raw: bytes) -> StreamPlan:
        request = decode_request(raw)
        source = self.find_cache(request.cache)
        manifest = source.manifest()
        config = manifest.config
        split_name = request.split or "train"
        if split_name not in SPLITS:
            raise ValueError(f"unknown split {request.split!r}; choose one of {', '.join(SPLITS)}")
        split = getattr(manifest, split_name)
        hooks = list(request.hooks) or list(config.hooks)
        unknown = [h for h in hooks if h not in config.hooks]
        if unknown or len(set(hooks)) != len(hooks):
            raise ValueError(f"unknown or repeated hooks {unknown or hooks} for cache {source.name}; "
                             f"its hooks: {', '.join(config.hooks)}")
        if request.mode not in MODES:
            raise ValueError(f"unknown mode {request.mode}; choose {MODES}")
        num_consumers = request.num_consumers or 1
        if request.consumer_index >= num_consumers:
            raise ValueError(f"consumer_index {request.consumer_index} is out of range for num_consumers {num_consumers}")
        block_shards = request.block_shards or self.options.block_shards
        if block_shards > self.options.max_block_shards:
            raise ValueError(f"block_shards {block_shards} exceeds this server's limit of {self.options.max_block_shards}")
        if not 1 <= request.batch_size <= self.options.max_batch_size:
            raise ValueError(f"batch_size must be in 1..{self.options.max_batch_size} tokens, got {request.batch_size}")
        if request.dtype not in ("", config.dtype, "float32"):
            raise ValueError(f"dtype {request.dtype!r} is not served; ask for '' (the cache's {config.dtype}) or 'float32'")
        order = Order(
            seed=request.seed, epoch=request.epoch, block_shards=block_shards, context_size=config.context_size,
            drop_bos=request.drop_bos and config.prepend_bos, num_consumers=num_consumers,
            consumer_index=request.consumer_index, shuffle=request.mode == StreamRequest.SHUFFLED_TOKENS,
            follow=request.follow,
        )
        if not order.shuffle and request.batch_size % order.rows_per_sequence:
            raise ValueError(f"SEQUENCES mode sends whole sequences: batch_size must be a multiple of "
                             f"{order.rows_per_sequence} rows per sequence, got {request.batch_size}")
        split_done = split_complete(manifest, split_name)
        if not request.follow and not split_done:
            raise ValueError(f"the {split_name} split of cache {source.name} is still being built "
                             f"({len(split.shards)}/{split.planned_shards} shards committed): set follow to stream it as it grows")
        rows = None
        if split_done:
            if not split.shards:
                raise ValueError(f"the {split_name} split of cache {source.name} is empty")
            rows = consumer_rows(epoch_blocks(split.shards, order))
            if request.start > rows:
                raise ValueError(f"start {request.start} is past the end of this consumer's part of the epoch ({rows} tokens)")

        out_dtype = request.dtype or config.dtype
        schema = shard_schema(hooks, manifest.d_model, out_dtype)
        if not request.include_meta:
            schema = pa.schema([f for f in schema if f.name not in META_COLUMNS])
        resolved = StreamRequest()
        resolved.CopyFrom(request)
        resolved.split, resolved.num_consumers, resolved.block_shards, resolved.dtype = (
            split_name, num_consumers, block_shards, out_dtype)
        resolved.ClearField("hooks")
        resolved.hooks.extend(hooks)
        row_bytes = sum(f.type.byte_width for f in schema)
        return StreamPlan(source, resolved, order, schema, config.dtype, manifest.d_model, row_bytes, rows)

    # -- Flight methods --

    def get_flight_info(self, context, descriptor):
        with flight_errors():
            plan = self.plan(descriptor.command or b"")
        endpoint = flight.FlightEndpoint(plan.request.SerializeToString(), self.locations)
        rows = -1 if plan.consumer_rows is None else plan.consumer_rows - plan.request.start
        return flight.FlightInfo(plan.schema, descriptor, [endpoint], total_records=rows,
                                 total_bytes=-1 if rows < 0 else rows * plan.row_bytes, ordered=True)

    def do_get(self, context, ticket):
        with flight_errors():
            plan = self.plan(ticket.ticket)
        return flight.GeneratorStream(plan.schema, self.counted(plan, context))

    def list_actions(self, context):
        return [
            ("health", "liveness: one HealthResult (proto/stream.proto)"),
            ("stats", "counters since start: one ServerStats"),
            ("list-caches", "the served caches and their manifests: one CacheList; body: optional ListCachesRequest"),
        ]

    def do_action(self, context, action):
        kind, body = action.type, action.body.to_pybytes() if action.body else b""
        if kind == "health":
            result = HealthResult(status="ok", version=VERSION, uptime_seconds=time.time() - self.started_at,
                                  location=self.location)
        elif kind == "stats":
            result = self.server_stats()
        elif kind == "list-caches":
            try:
                wanted = ListCachesRequest.FromString(body).cache
            except DecodeError as e:
                raise ValueError(f"list-caches body is not a ListCachesRequest: {e}") from e
            sources = [self.find_cache(wanted)] if wanted else list(self.caches.values())
            result = CacheList(caches=[s.info() for s in sources])
        else:
            raise ValueError(f"unknown action {kind!r}; actions: health, stats, list-caches")
        return [result.SerializeToString()]

    def server_stats(self) -> ServerStats:
        s = self.stats
        with s.lock:
            counters = dict(streams_started=s.streams_started, streams_active=s.streams_active,
                            streams_completed=s.streams_completed, streams_failed=s.streams_failed,
                            batches=s.batches, tokens=s.tokens, bytes=s.bytes)
        cache = self.shard_cache
        return ServerStats(**counters, max_batch_size=self.options.max_batch_size,
                           default_block_shards=self.options.block_shards,
                           shard_fetches=cache.fetches if cache else 0, shard_cache_hits=cache.hits if cache else 0)

    # -- streaming --

    def counted(self, plan: StreamPlan, context) -> Iterator[pa.RecordBatch]:
        """The stream's batches, with the stats kept and failures turned into clear Flight errors."""
        self.stats.started()
        ok = False
        try:
            with flight_errors():
                for batch in cut_batches(self.blocks(plan, context), plan.request.batch_size):
                    self.stats.sent(batch.num_rows, plan.row_bytes)
                    yield batch
            ok = True
        finally:
            self.stats.ended(ok)

    def blocks(self, plan: StreamPlan, context) -> Iterator[BlockRows]:
        """This consumer's rows of each block from the cursor on; the next block is read on the
        stream's reader thread while this one is sent."""
        stop = threading.Event()
        todo = self.pending_blocks(plan, stop)
        reader = ThreadPoolExecutor(1, thread_name_prefix="actserve-read")

        def read_next():
            item = next(todo, None)
            return None if item is None else self.read_block(plan, *item)

        try:
            future = reader.submit(read_next)
            while (block := result_unless_cancelled(future, context)) is not None:
                future = reader.submit(read_next)
                yield block
        finally:
            stop.set()
            reader.shutdown(wait=False, cancel_futures=True)

    def pending_blocks(self, plan: StreamPlan, stop: threading.Event) -> Iterator[tuple]:
        """(shards, block, offset in the block's slice) from the cursor on. In follow mode, waits
        for blocks still to be committed, polling the manifest with backoff."""
        skip = plan.request.start
        served = 0
        wait = FOLLOW_POLL[0]
        while True:
            manifest = plan.source.manifest()
            shards = getattr(manifest, plan.request.split).shards
            final = split_complete(manifest, plan.request.split) or not plan.request.follow
            blocks = epoch_blocks(shards, plan.order, complete=final)[served:]
            first, skip = locate(blocks, skip)
            for block in blocks[first:]:
                if block.num_rows:  # a block with fewer rows than consumers leaves some none
                    yield shards, block, skip
                skip = 0
            served += len(blocks)
            if blocks:
                wait = FOLLOW_POLL[0]
            if final:
                if skip:
                    raise ValueError(f"start {plan.request.start} is past the end of this consumer's part of the epoch")
                return
            if stop.wait(wait):
                return
            wait = min(2 * wait, FOLLOW_POLL[1])

    def read_block(self, plan: StreamPlan, shards, block: Block, offset: int) -> BlockRows:
        """The block's shards in one table, and the consumer's rows of it from `offset` on."""
        tables = [plan.source.read(shards[i], plan.schema.names) for i in block.shards]
        # one chunk per column: `take` from a chunked column is several times slower
        table = pa.concat_tables(tables).combine_chunks()
        return BlockRows(table, row_indices(block, plan.order)[offset:], plan)


@dataclass(frozen=True)
class BlockRows:
    """This consumer's rows of one block: the block's table and the order to send its rows in."""
    table: pa.Table
    order: np.ndarray
    plan: StreamPlan

    def __len__(self) -> int:
        return len(self.order)

    def batch(self, start: int, stop: int) -> pa.RecordBatch:
        """Rows order[start:stop], gathered by `take` in C++. A batch at a time, not the whole block
        at once: the allocator then reuses the memory of batches already sent (fewer page faults)."""
        (batch,) = self.table.take(self.order[start:stop]).to_batches()
        plan = self.plan
        columns = batch.columns
        if plan.request.dtype != plan.cache_dtype:  # the server converts to float32
            columns = [c if name in META_COLUMNS else
                       encode_activations(decode_activations(c, plan.cache_dtype, plan.d_model).float())
                       for name, c in zip(plan.schema.names, columns)]
        return pa.RecordBatch.from_arrays(columns, schema=plan.schema)


def result_unless_cancelled(future: Future, context) -> BlockRows | None:
    """The future's result, or None once the client has gone away: a follow stream can wait for
    the build for long. Asked on the call's own thread, where its context is alive."""
    while True:
        try:
            return future.result(timeout=CANCEL_CHECK)
        except FutureTimeout:
            if context.is_cancelled():
                return None


@contextlib.contextmanager
def flight_errors():
    """A cache that cannot be read (corrupt or missing shard...) fails the call with its message."""
    try:
        yield
    except CacheError as e:
        raise flight.FlightServerError(str(e)) from e


def cut_batches(blocks: Iterator[BlockRows], batch_size: int) -> Iterator[pa.RecordBatch]:
    """Batches of exactly batch_size rows (the last may be short) out of blocks of any size; a
    batch that spans blocks is gathered from each and concatenated."""
    pieces: list[pa.RecordBatch] = []
    rows = 0
    for block in blocks:
        pos = 0
        while pos < len(block):
            n = min(batch_size - rows, len(block) - pos)
            pieces.append(block.batch(pos, pos + n))
            rows += n
            pos += n
            if rows == batch_size:
                yield joined(pieces)
                pieces, rows = [], 0
    if pieces:
        yield joined(pieces)


def joined(pieces: list[pa.RecordBatch]) -> pa.RecordBatch:
    return pieces[0] if len(pieces) == 1 else pa.concat_batches(pieces)


# --- running: in this process, or as Ray actors ------------------------------------------------


class ServerActor:
    """An ActivationServer inside a Ray actor (`ray.remote(ServerActor)`), serving on a thread."""

    def __init__(self, options: ServeOptions, port: int, token: str | None):
        self.server = ActivationServer(options, port, token)
        threading.Thread(target=self.server.serve, daemon=True, name="actserve-flight").start()

    def location(self) -> str:
        return self.server.location

    def set_locations(self, locations: list[str]) -> None:
        self.server.locations = list(locations)


def start_actors(options: ServeOptions, token: str | None) -> list:
    """options.servers ServerActors on Ray, each listing all of them as replicas."""
    import ray

    from services.build import ensure_ray

    ensure_ray(options.ray_address)
    actor_class = ray.remote(num_cpus=1)(ServerActor)
    ports = [options.port + i if options.port else 0 for i in range(options.servers)]
    actors = [actor_class.remote(options, port, token) for port in ports]
    locations = ray.get([a.location.remote() for a in actors]) + list(options.peers)
    ray.get([a.set_locations.remote(locations) for a in actors])
    return actors


def spawn_server(options: ServeOptions) -> tuple[subprocess.Popen, str]:
    """serve(options) in a new Python process (servers=1); returns it and its location once it listens.
    For notebooks, tests and benchmarks: the process is the caller's to stop."""
    code = "import json, sys; from services.server import ServeOptions, serve; serve(ServeOptions(**json.loads(sys.argv[1])))"
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(asdict(options))], stdout=subprocess.PIPE, text=True)
    location = proc.stdout.readline().strip()
    if not location:
        raise RuntimeError(f"the server process exited with code {proc.wait()} before listening (its stderr says why)")
    return proc, location


def serve(options: ServeOptions) -> None:
    """Serve until interrupted, printing each grpc:// location on its own line of stdout."""
    token = options.token()
    names = ", ".join(f"{n}={u}" for n, u in map(parse_cache_spec, options.caches))
    if options.servers == 1:
        server = ActivationServer(options, token=token)
        print(server.location, flush=True)
        print(f"actserve: serving {names} at {server.location}{' (token required)' if token else ''}; "
              "Ctrl-C stops", file=sys.stderr, flush=True)
        try:
            server.serve()  # returns on SIGINT / SIGTERM
        finally:
            server.shutdown()
        return
    import ray

    actors = start_actors(options, token)
    for location in ray.get([a.location.remote() for a in actors]):
        print(location, flush=True)
    print(f"actserve: {len(actors)} servers serving {names}; Ctrl-C stops", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for actor in actors:
            ray.kill(actor)


# --- command line ------------------------------------------------------------------------------


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to an argparse subparsers object; its func runs the server and returns 0."""
    p = subparsers.add_parser(
        "serve", help="stream cached activations over Arrow Flight",
        description="Serve one or more activation caches over Arrow Flight (gRPC): shuffled, exactly-once "
                    "epochs for trainers, whole sequences for evaluators. Prints each grpc:// location, runs "
                    "until interrupted. Wire contract: proto/stream.proto.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache", action="append", required=True, metavar="[NAME=]URL",
                   help="cache to serve (repeatable); named by NAME or the URL's last path component")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs a token")
    p.add_argument("--port", type=int, default=0, help="port (0: any free one); with --servers K, ports PORT..PORT+K-1")
    p.add_argument("--servers", type=int, default=1, help="server processes (Ray actors when > 1), listed as replicas")
    p.add_argument("--token-env", default="ACTSERVE_TOKEN", help="environment variable holding the bearer token")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without a token")
    p.add_argument("--tls-cert", default="", help="PEM certificate: serve grpc+tls://")
    p.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    p.add_argument("--storage-options", default="{}", help="JSON of fsspec options for the cache URLs")
    p.add_argument("--local-cache-dir", default=ServeOptions.local_cache_dir,
                   help="node-local copy of remote (s3://) shards, shared by the servers of this node")
    p.add_argument("--local-cache-gb", type=float, default=ServeOptions.local_cache_gb,
                   help="size bound of --local-cache-dir (LRU eviction); 0 reads remote shards directly")
    p.add_argument("--max-batch-size", type=int, default=ServeOptions.max_batch_size, help="largest batch_size accepted, tokens")
    p.add_argument("--block-shards", type=int, default=ServeOptions.block_shards, help="default shuffle block, in shards")
    p.add_argument("--peer", action="append", default=[], metavar="LOCATION",
                   help="grpc:// location of another server of the same caches, listed as a replica (repeatable)")
    p.add_argument("--ray-address", default=None, help="Ray cluster for --servers > 1 (default: $RAY_ADDRESS, else local)")
    p.set_defaults(func=run_serve_command)
    return p


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    from services.cli import parse_json_object  # the CLI's one parser for JSON flags

    storage_options = parse_json_object(args.storage_options, "--storage-options")
    return ServeOptions(
        caches=tuple(args.cache), host=args.host, port=args.port, servers=args.servers, token_env=args.token_env,
        insecure=args.insecure, tls_cert=args.tls_cert, tls_key=args.tls_key, storage_options=storage_options,
        local_cache_dir=args.local_cache_dir, local_cache_gb=args.local_cache_gb,
        max_batch_size=args.max_batch_size, block_shards=args.block_shards, peers=tuple(args.peer),
        ray_address=args.ray_address,
    )


def run_serve_command(args: argparse.Namespace) -> int:
    serve(options_from_args(args))
    return 0
