"""The activation server: an Arrow Flight service streaming cached activations, shuffled, exactly
once per epoch, to many trainers and evaluators (the wire contract is proto/stream.proto).

A request travels: ticket -> `stream_plan.plan_stream` (validated against the manifest and this
server's limits) -> `block_reader.stream_buffers` (shuffle buffers filled on the stream's own
threads, at most two in memory, batches sent as soon as their rows are in) -> `block_reader.cut_batches` -> Flight. A stream that fails (a corrupt or missing
shard) ends with an error naming the shard; the other streams go on. Concurrency beyond one
process comes from several server processes (`run_server.start_actors`), listed together as the
locations of the endpoint that get_flight_info returns.
"""
from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import os
import threading
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf.message import DecodeError

from actserve import __version__
from actserve.proto.stream_pb2 import CacheList, HealthResult, ListCachesRequest, ServerStats, UnavailableCache
from actserve.services.admission import Admission, StreamEnded, StreamLease
from actserve.services.block_reader import cut_batches, stream_buffers
from actserve.services.process_memory import ReusedBlocks, resident_memory
from actserve.services.serve_options import ServeOptions, parse_cache_spec
from actserve.services.shard_cache import ShardCache
from actserve.services.sources import CacheSource
from actserve.services.storage import CacheError
from actserve.services.stream_plan import BUFFERS_HELD, StreamLimits, StreamPlan, decode_request, plan_stream

VERSION = f"actserve {__version__}"
log = logging.getLogger(__name__)
MAX_ERROR_CHARS = 1000  # of an error's text sent to a client (gRPC metadata is bounded); --debug sends it all
GB = 10**9


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
        try:
            super().__init__(f"{options.scheme}://{options.host}:{port}", tls_certificates=tls, middleware=middleware)
        except pa.ArrowException as e:  # gRPC says only "did not start properly"; a taken port is the usual cause
            raise OSError(errno.EADDRINUSE, f"cannot listen on {options.host}:{port} (port in use or address not "
                          f"bindable: {e})") from e
        host = options.host if options.host not in ("0.0.0.0", "::") else os.uname().nodename
        self.location = f"{options.scheme}://{host}:{self.port}"
        self.locations = [self.location, *options.peers]  # the replicas get_flight_info lists
        shard_cache = None
        if options.local_cache_gb > 0:
            shard_cache = ShardCache(options.local_cache_dir, int(options.local_cache_gb * 1e9))
        self.shard_cache = shard_cache
        self.urls = {name: url for name, url in map(parse_cache_spec, options.caches)}
        self.caches: dict[str, CacheSource] = {}
        self.unavailable: dict[str, str] = {}  # cache name -> why it could not be opened
        for name, url in self.urls.items():
            try:
                self.caches[name] = CacheSource(name, url, options.storage_options, shard_cache)
            except (CacheError, OSError, ValueError) as e:  # serve the others; health and list-caches say why
                self.unavailable[name] = self.client_text(e)
        if not self.caches:
            raise CacheError("no cache could be opened: " + "; ".join(f"{n}: {why}" for n, why in self.unavailable.items()))
        self.limits = StreamLimits(options.max_batch_size, options.buffer_tokens, options.max_buffer_tokens,
                                   int(options.stream_memory_gb * GB))
        self.admission = Admission(int(options.memory_budget_gb * GB), options.max_streams, options.stream_idle_timeout)
        self.stats = StreamStats()
        self.started_at = time.time()

    def shutdown(self):
        self.admission.close()
        super().shutdown()

    def client_text(self, error: BaseException) -> str:
        """What a client may see of an error: one line of at most MAX_ERROR_CHARS, the caches'
        storage URLs replaced by their names unless --expose-urls (all of it with --debug)."""
        text = str(error)
        if not self.options.expose_urls:
            for name, url in sorted(self.urls.items(), key=lambda item: -len(item[1])):
                text = text.replace(url, f"<cache {name}>")
        if self.options.debug:
            return text
        text = " ".join(text.split())
        return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."

    def unavailable_caches(self) -> list[UnavailableCache]:
        return [UnavailableCache(name=n, error=why) for n, why in self.unavailable.items()]

    def find_cache(self, name_or_url: str) -> CacheSource:
        for source in self.caches.values():
            if name_or_url in (source.name, source.url):
                return source
        if name_or_url in self.unavailable:
            raise ValueError(f"cache {name_or_url} is unavailable on this server: {self.unavailable[name_or_url]}")
        served = ", ".join(s.name if not self.options.expose_urls else f"{s.name} ({s.url})" for s in self.caches.values())
        raise ValueError(f"unknown cache {name_or_url!r}; this server serves: {served}")

    def plan(self, raw: bytes) -> tuple[CacheSource, StreamPlan]:
        request = decode_request(raw)
        source = self.find_cache(request.cache)
        return source, plan_stream(request, source.manifest(), source.name, self.limits)

    # -- Flight methods --

    def get_flight_info(self, context, descriptor):
        with self.flight_errors():
            _, plan = self.plan(descriptor.command or b"")
        endpoint = flight.FlightEndpoint(plan.request.SerializeToString(), self.locations)
        rows = -1 if plan.consumer_rows is None else plan.consumer_rows - plan.request.start
        return flight.FlightInfo(plan.schema, descriptor, [endpoint], total_records=rows,
                                 total_bytes=-1 if rows < 0 else rows * plan.row_bytes, ordered=True)

    def do_get(self, context, ticket):
        with self.flight_errors():
            source, plan = self.plan(ticket.ticket)
            lease = self.admission.admit(plan.memory)
        return flight.GeneratorStream(plan.schema, self.counted(source, plan, context, lease))

    def list_actions(self, context):
        return [
            ("health", "liveness: one HealthResult (proto/stream.proto)"),
            ("stats", "counters since start: one ServerStats"),
            ("list-caches", "the served caches and their manifests: one CacheList; body: optional ListCachesRequest"),
        ]

    def do_action(self, context, action):
        with self.flight_errors():
            return [self.action_result(action.type, action.body.to_pybytes() if action.body else b"").SerializeToString()]

    def action_result(self, kind: str, body: bytes):
        if kind == "health":
            return HealthResult(status="ok", version=VERSION, uptime_seconds=time.time() - self.started_at,
                                location=self.location, unavailable=self.unavailable_caches())
        if kind == "stats":
            return self.server_stats()
        if kind == "list-caches":
            try:
                wanted = ListCachesRequest.FromString(body).cache
            except DecodeError as e:
                raise ValueError(f"list-caches body is not a ListCachesRequest: {e}") from e
            sources = [self.find_cache(wanted)] if wanted else list(self.caches.values())
            infos = [s.info() for s in sources]
            if not self.options.expose_urls:
                for info in infos:
                    info.url = ""
            return CacheList(caches=infos, unavailable=[] if wanted else self.unavailable_caches())
        raise ValueError(f"unknown action {kind!r}; actions: health, stats, list-caches")

    def server_stats(self) -> ServerStats:
        s = self.stats
        with s.lock:
            counters = dict(streams_started=s.streams_started, streams_active=s.streams_active,
                            streams_completed=s.streams_completed, streams_failed=s.streams_failed,
                            batches=s.batches, tokens=s.tokens, bytes=s.bytes)
        a = self.admission
        with a.lock:
            memory = dict(memory_held_bytes=a.held, memory_peak_bytes=a.peak, streams_refused=a.refused,
                          streams_timed_out=a.timed_out)
        process = resident_memory()
        pool = pa.default_memory_pool()
        memory.update(rss_anon_bytes=process.get("RssAnon", 0), rss_file_bytes=process.get("RssFile", 0),
                      rss_anon_baseline_bytes=a.baseline_rss_anon, arrow_allocated_bytes=pool.bytes_allocated(),
                      arrow_peak_bytes=pool.max_memory())
        cache = self.shard_cache
        return ServerStats(**counters, **memory, max_batch_size=self.options.max_batch_size,
                           default_buffer_tokens=self.options.buffer_tokens, max_buffer_tokens=self.options.max_buffer_tokens,
                           shard_fetches=cache.fetches if cache else 0, shard_cache_hits=cache.hits if cache else 0,
                           memory_budget_bytes=a.memory_budget, stream_memory_budget_bytes=self.limits.stream_memory_bytes,
                           max_streams=a.max_streams, stream_idle_timeout_seconds=a.idle_timeout)

    def counted(self, source: CacheSource, plan: StreamPlan, context, lease: StreamLease) -> Iterator[pa.RecordBatch]:
        """The stream's batches, with the stats kept, the lease's memory given back at the end and
        failures turned into clear Flight errors."""
        self.stats.started()
        ok = False
        try:
            with self.flight_errors():
                blocks = ReusedBlocks(plan.memory.block_bytes, BUFFERS_HELD, wait=None, counted=lease.blocks_changed)
                buffers = stream_buffers(source, plan, context, blocks, lease.hold)
                for batch in cut_batches(buffers, plan.request.batch_size):
                    self.stats.sent(batch.num_rows, plan.row_bytes)
                    lease.yielded()
                    yield batch
                    lease.resumed()
            ok = True
        finally:
            lease.finish()
            self.stats.ended(ok)

    @contextlib.contextmanager
    def flight_errors(self):
        """Errors as clients see them: a bad request INVALID_ARGUMENT, a cache that cannot be read
        (corrupt or missing shard...) or a limit a Flight server error, each with one bounded line
        (client_text); the traceback stays in this server's log."""
        try:
            yield
        except flight.FlightError:
            raise
        except (ResourceWarning, StreamEnded) as e:
            log.info("%s", e)
            raise flight.FlightServerError(self.client_text(e)) from None
        except (ValueError, KeyError, TypeError) as e:
            raise pa.ArrowInvalid(self.client_text(e)) from None
        except Exception as e:  # noqa: BLE001 - a corrupt shard (CacheError) or a bug: logged whole, sent as one line
            log.warning("stream failed", exc_info=True)
            raise flight.FlightServerError(self.client_text(e)) from None
