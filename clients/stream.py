"""ActivationStream: cached activations from an actserve server as torch tensors, for training loops.

    stream = ActivationStream("grpc://127.0.0.1:8815", cache="gpt2-small", hooks=["blocks.8.hook_resid_pre"],
                              batch_size=4096, seed=0, consumer_index=rank, num_consumers=world_size)
    for batch in stream:                    # one epoch of this rank's disjoint part
        x = batch["blocks.8.hook_resid_pre"]  # [4096, d_model] float32
    torch.save(stream.state_dict(), ...)    # ... and load_state_dict() to resume exactly there

A background thread reads a few batches ahead (`prefetch`) and turns each Arrow batch into tensors
that view Arrow's buffers (no copy; one copy into pinned memory when the device is CUDA, then a
non-blocking transfer). Activations travel in the cache's dtype and are converted on the device.
A stream over Flight makes the process keep glibc's freed heap memory (services/process_memory.py:
keep_freed_heap_memory), so that gRPC's receive buffers are reused.
One call asks for every epoch still to read (StreamRequest.epochs), so the server prepares each
epoch while the one before is sent; the stream counts each epoch's rows out of it.

The stream survives server restarts: on an unavailable server it reconnects with exponential
backoff, to the same or another replica, and asks for the rest from the last row it received
(`epoch`, `start`), so no token is lost or repeated. It gives up after `reconnect_timeout` seconds
without progress, with an error naming the servers it tried.

With `read_from` (the cache's URL as this process can read it) the server still resolves the
request, its defaults and the cache's manifest, but the batches are cut from the shards in this
process by the server's own reader (services/block_reader.py), in exactly the order the server
would send: for a consumer on the server's node, where Flight over loopback is the limit.
"""
from __future__ import annotations

import functools
import queue
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.flight as flight
import torch

from actserve.proto.manifest_pb2 import HookStats, Manifest
from actserve.proto.stream_pb2 import CacheList, ListCachesRequest, ServerStats, StreamRequest
from actserve.services.block_reader import cut_batches, stream_buffers
from actserve.services.process_memory import REUSE_WAIT, ReusedBlocks, keep_freed_heap_memory
from actserve.services.shard_format import META_COLUMNS, decode_activations
from actserve.services.sources import CacheSource
from actserve.services.stream_plan import BUFFERS_HELD, StreamLimits, plan_stream

MODES = {"shuffled": StreamRequest.SHUFFLED_TOKENS, "sequences": StreamRequest.SEQUENCES}
META_DTYPES = {"sequence": torch.int64, "position": torch.int32, "token": torch.int32}
# what resume must keep equal: these decide the order (hooks and batch_size do not)
ORDER_FIELDS = ("cache", "split", "seed", "consumer_index", "num_consumers", "drop_bos", "mode", "buffer_tokens")
CALL_EPOCHS = 1 << 20  # epochs one call of an endless stream asks for
_END = object()

# Tensors view Arrow's receive buffers, which are read-only: that is the point (no copy). Treat
# batches as read-only; torch's one-time warning about it would only alarm users.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class StreamUnavailable(ConnectionError):
    """No server answered for reconnect_timeout seconds."""


RETRIED = (flight.FlightUnavailableError, flight.FlightTimedOutError)  # a server away, maybe restarting


def one_line(error: pa.ArrowException) -> pa.ArrowException:
    """A server's error as the server wrote it: gRPC appends ". Detail: " and a status detail, for a
    refused request (INVALID_ARGUMENT) the server's whole Python traceback."""
    text = str(error).split(". Detail: ", 1)[0]
    if isinstance(error, flight.FlightError):
        return type(error)(text, extra_info=error.extra_info)
    return type(error)(text)


@functools.lru_cache(maxsize=None)
def direct_source(url: str) -> CacheSource:
    """One CacheSource per cache URL and process, as a server has: its memory-mapped shards serve
    every stream of the process (mapping them afresh per stream cost up to half of an epoch of
    a 0.5 GB split in page faults: 0.2-2.4M tokens/s against 2.1-3.4M reusing them)."""
    return CacheSource(url, url, {}, shard_cache=None)


def shard_keys(shards) -> list[tuple]:
    return [(shard.path, shard.num_rows, shard.sha256) for shard in shards]


class StopFlag:
    """The `context` the server's reader polls while it waits (a Flight call's is_cancelled)."""

    def __init__(self, stop: threading.Event):
        self.stop = stop

    def is_cancelled(self) -> bool:
        return self.stop.is_set()


class Retry:
    """The one retry policy of the client: after each failure move to the next replica and wait,
    doubling the wait from `first` up to `longest`; give up (raise `give_up(error)`) once `timeout`
    seconds pass without progress, or when `stop` is set. `progressed()` restarts the clock."""

    def __init__(self, first: float, longest: float, timeout: float, give_up, next_replica, stop: threading.Event):
        self.first, self.longest, self.timeout = first, longest, timeout
        self.give_up, self.next_replica, self.stop = give_up, next_replica, stop
        self.progressed()

    def progressed(self) -> None:
        self.delay, self.deadline = self.first, time.monotonic() + self.timeout

    def wait(self, error: Exception) -> None:
        if time.monotonic() + self.delay > self.deadline or self.stop.is_set():
            raise self.give_up(error) from error
        self.next_replica()
        time.sleep(self.delay)
        self.delay = min(2 * self.delay, self.longest)


@dataclass(frozen=True)
class StreamOptions:
    cache: str                              # name or URL the server serves
    hooks: tuple[str, ...] = ()             # () = every hook of the cache
    batch_size: int = 4096                  # tokens per batch (the epoch's last may be short)
    seed: int = 0
    consumer_index: int = 0
    num_consumers: int = 1
    split: str = "train"
    epochs: int | None = 1                  # read epochs up to this number (a resumed stream ends there too);
                                            # None: endless. Each epoch has its own order
    dtype: torch.dtype | None = torch.float32  # None: the cache's dtype
    device: str = "cpu"
    drop_bos: bool = True
    include_meta: bool = False              # also `sequence`, `position`, `token` tensors
    mode: str = "shuffled"                  # or "sequences": whole sequences in order (evaluators)
    buffer_tokens: int = 0                  # shuffle buffer in tokens; 0: the server's default (proto/stream.proto)
    follow: bool = False                    # stream a cache still being built (proto/stream.proto)
    prefetch: int = 4                       # batches read ahead
    token: str | None = None                # bearer token, for a server started with one
    tls_root_certs: bytes | None = None     # PEM roots to verify a grpc+tls:// server
    call_timeout: float = 30.0              # seconds for one metadata call (info, actions)
    reconnect_timeout: float = 60.0         # give up after this long without progress
    backoff: tuple[float, float] = (0.1, 5.0)  # first and longest wait between reconnects
    read_from: str = ""                     # the cache's URL as this process reads it: batches cut here, not
                                            # sent over Flight (same order; the server still plans the stream)

    def __post_init__(self):
        checks = [
            (bool(self.cache), "cache is empty"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0 <= self.consumer_index < self.num_consumers,
             f"consumer_index must be in 0..{self.num_consumers - 1}, got {self.consumer_index}"),
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1 or None, got {self.epochs}"),
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}"),
            (self.prefetch >= 1, f"prefetch must be >= 1, got {self.prefetch}"),
            (self.dtype in (None, torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {self.dtype}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def request(self) -> StreamRequest:
        return StreamRequest(
            cache=self.cache, split=self.split, hooks=list(self.hooks), batch_size=self.batch_size, seed=self.seed,
            consumer_index=self.consumer_index, num_consumers=self.num_consumers, include_meta=self.include_meta,
            drop_bos=self.drop_bos, mode=MODES[self.mode], buffer_tokens=self.buffer_tokens, follow=self.follow,
        )


class ActivationStream:
    """Iterable of {hook: Tensor[batch, d_model]} (plus meta columns when asked), epoch after epoch."""

    def __init__(self, location: str | list[str], options: StreamOptions | None = None, **kwargs):
        self.options = replace(options, **kwargs) if options else StreamOptions(**kwargs)
        self.locations = [location] if isinstance(location, str) else list(location)
        if not self.locations:
            raise ValueError("give at least one server location (grpc://host:port)")
        self._given = tuple(self.locations)  # the token goes to these, and to replicas of their scheme
        self._warned: set[str] = set()
        self._preferred = self.options.consumer_index % len(self.locations)  # spread consumers over replicas
        self._base: StreamRequest | None = None  # the server-resolved request
        self._cache_info = None
        self.epoch = 0              # state as the caller has consumed it
        self.position = 0           # tokens of this epoch's part received by the caller
        self.epoch_tokens: int | None = None  # this consumer's tokens in the current epoch (None in follow mode)
        self.reconnects = 0         # streams resumed after a server became unavailable
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._flight_reader = None  # the open do_get, cancelled by close()
        self._call_ends = 0         # the epoch it ends before
        self._direct: CacheSource | None = None  # the cache at read_from, opened on first read
        self._device = torch.device(self.options.device)
        if not self.options.read_from:
            keep_freed_heap_memory()  # before gRPC's threads first allocate: its receive buffers reused

    # -- what trainers ask before streaming --

    @property
    def manifest(self) -> Manifest:
        if self._cache_info is None:
            body = ListCachesRequest(cache=self.options.cache).SerializeToString()
            (result,) = self._call(lambda c, o: list(c.do_action(flight.Action("list-caches", body), o)))
            self._cache_info = CacheList.FromString(result.body.to_pybytes()).caches[0]
        return self._cache_info.manifest

    @property
    def d_model(self) -> int:
        return self.manifest.d_model

    @property
    def hooks(self) -> list[str]:
        return list(self.resolved_request().hooks)

    @property
    def hook_stats(self) -> dict[str, HookStats]:
        """Per-hook statistics of the train split (mean, E|x|, E|x|^2), for normalisation."""
        return dict(self.manifest.stats)

    def server_stats(self) -> ServerStats:
        (result,) = self._call(lambda c, o: list(c.do_action(flight.Action("stats", b""), o)))
        return ServerStats.FromString(result.body.to_pybytes())

    def resolved_request(self) -> StreamRequest:
        """The request with the server's defaults filled in (buffer_tokens, hooks...), fetched once."""
        if self._base is None:
            self._flight_info(self.options.request())
        return self._base

    # -- resume --

    def state_dict(self) -> dict:
        """Where the caller is: reload into a stream with the same order fields to continue exactly."""
        request = self.resolved_request()
        state = {name: getattr(request, name) for name in ORDER_FIELDS}
        return {**state, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if self._reader is not None:
            raise RuntimeError("load_state_dict before iterating, not during")
        request = self.resolved_request()
        explicit = [n for n in ORDER_FIELDS if n != "buffer_tokens" or self.options.buffer_tokens]
        if "buffer_tokens" not in state:
            raise ValueError("the saved stream has no buffer_tokens: it was read in whole-shard blocks, an order this "
                             "server no longer serves; start the epoch again")
        different = [f"{n}: saved {state[n]!r}, now {getattr(request, n)!r}" for n in explicit if state[n] != getattr(request, n)]
        if different:
            raise ValueError("the saved stream had another order, it cannot resume here: " + "; ".join(different))
        request.buffer_tokens = state["buffer_tokens"]  # the order it was saved with, whatever the server's default now
        self.epoch, self.position = state["epoch"], state["position"]

    # -- iteration --

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._reader is not None:
            raise RuntimeError("an ActivationStream is iterated once; make another to read again")
        self.resolved_request()
        items: queue.Queue = queue.Queue(maxsize=self.options.prefetch)
        self._reader = threading.Thread(target=self._read, args=(items,), daemon=True, name="actserve-stream")
        self._reader.start()
        try:
            while (item := items.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                epoch, position, epoch_tokens, tensors = item
                if self._device.type != "cpu":  # from pinned memory; converted on the device
                    tensors = {k: self._convert(k, v.to(self._device, non_blocking=True)) for k, v in tensors.items()}
                self.epoch, self.position, self.epoch_tokens = epoch, position, epoch_tokens
                yield tensors
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._flight_reader is not None:
            self._flight_reader.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self, items: queue.Queue) -> None:
        """Reader thread: every batch of every epoch from the caller's position on, into `items`."""
        try:
            epoch, position = self.epoch, self.position
            while self.options.epochs is None or epoch < self.options.epochs:
                request = StreamRequest()
                request.CopyFrom(self._base)
                request.epoch = epoch
                epoch_tokens = self._epoch_tokens(request)
                for batch in self._epoch_batches(request, position, epoch_tokens):
                    position += batch.num_rows
                    if not self._put(items, (epoch, position, epoch_tokens, self._tensors(batch))):
                        return
                epoch, position = epoch + 1, 0
            self._put(items, _END)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self._put(items, e)

    def _put(self, items: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _epoch_tokens(self, request: StreamRequest) -> int | None:
        info = self._flight_info(request)
        return None if info.total_records < 0 else info.total_records

    def _epoch_batches(self, request: StreamRequest, start: int, rows: int | None) -> Iterator[pa.RecordBatch]:
        """The epoch's batches from `start` (of `rows`; None while a followed split grows),
        reconnecting and resuming after the last row received. One call sends every epoch still to
        read (StreamRequest.epochs): the server reads an epoch's first buffer while the epoch before
        is sent, where a call per epoch would wait for it; this epoch's rows are counted out of it."""
        if self.options.read_from:
            yield from self._direct_batches(request, start)
            return
        retry = self._retry()
        opened = None  # where this epoch's call began, when opened here (not for an epoch before)
        while True:
            try:
                if self._flight_reader is None:
                    request.start, request.epochs = start, self._epochs_in_call(request.epoch)
                    client = self._client(self.locations[self._preferred])
                    self._flight_reader = client.do_get(flight.Ticket(request.SerializeToString()),
                                                        self._call_options(timeout=None))
                    self._call_ends = request.epoch + request.epochs
                    opened = start
                last = request.epoch + 1 == self._call_ends  # the call ends with this epoch: read it to its end
                if start == rows and not last:
                    return
                try:
                    batch = self._flight_reader.read_chunk().data
                except StopIteration:
                    self._flight_reader = None
                    if rows is None or start == rows:
                        return
                    if start == opened:  # ended before sending the epoch: opening again would loop
                        raise RuntimeError(f"the server ended epoch {request.epoch} at row {start} of {rows}") from None
                    continue
                start += batch.num_rows
                retry.progressed()
                yield batch
            except RETRIED as e:
                self._flight_reader = None
                retry.wait(e)
                self.reconnects += 1
            except pa.ArrowException as e:
                raise one_line(e) from None

    def _epochs_in_call(self, epoch: int) -> int:
        """Epochs a call from `epoch` asks for: the rest (CALL_EPOCHS at a time when endless); one
        in follow mode."""
        if self.options.follow:
            return 1
        return CALL_EPOCHS if self.options.epochs is None else self.options.epochs - epoch

    def _direct_batches(self, request: StreamRequest, start: int) -> Iterator[pa.RecordBatch]:
        """The epoch's batches from `start`, read from the shards at read_from in this process."""
        if self._direct is None:
            direct = direct_source(self.options.read_from)
            split = request.split or "train"
            theirs, mine = (shard_keys(getattr(m, split).shards) for m in (self.manifest, direct.manifest()))
            n = min(len(theirs), len(mine)) if request.follow else None  # a followed cache grows on either side
            if theirs[:n] != mine[:n]:
                raise ValueError(f"read_from {self.options.read_from} holds other {split} shards than the server's "
                                 f"cache {self.options.cache}: not the same cache")
            self._direct = direct
        request.start = start
        # every default is resolved in the server's request, so these limits only admit it as it is
        limits = StreamLimits(max_batch_size=request.batch_size, buffer_tokens=request.buffer_tokens,
                              max_buffer_tokens=request.buffer_tokens, stream_memory_bytes=1 << 62)
        plan = plan_stream(request, self._direct.manifest(), self.options.cache, limits)
        blocks = ReusedBlocks(plan.memory.block_bytes, BUFFERS_HELD, wait=REUSE_WAIT)  # the trainer may keep batches
        yield from cut_batches(stream_buffers(self._direct, plan, StopFlag(self._stop), blocks), request.batch_size)

    def _tensors(self, batch: pa.RecordBatch) -> dict[str, torch.Tensor]:
        tensors = batch_to_tensors(batch)
        if self._device.type == "cuda":
            return {k: v.pin_memory() for k, v in tensors.items()}
        if self._device.type == "cpu":
            return {k: self._convert(k, v) for k, v in tensors.items()}
        return tensors

    def _convert(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self.options.dtype
        return tensor if dtype is None or name in META_COLUMNS else tensor.to(dtype)

    # -- calls --

    def _client(self, location: str) -> flight.FlightClient:
        # a fresh client per (re)connection: gRPC's reconnect backoff of an old channel can reach minutes
        return flight.FlightClient(location, tls_root_certs=self.options.tls_root_certs)

    def _call_options(self, timeout: float | None) -> flight.FlightCallOptions:
        headers = [(b"authorization", f"Bearer {self.options.token}".encode())] if self.options.token else []
        return flight.FlightCallOptions(timeout=timeout, headers=headers)

    def _call(self, fn):
        """A metadata call, with the same retry and backoff as streaming."""
        retry = self._retry()
        while True:
            try:
                return fn(self._client(self.locations[self._preferred]), self._call_options(self.options.call_timeout))
            except RETRIED as e:
                retry.wait(e)
            except pa.ArrowException as e:
                raise one_line(e) from None

    def _retry(self) -> Retry:
        def next_replica():
            self._preferred = (self._preferred + 1) % len(self.locations)
        return Retry(*self.options.backoff, self.options.reconnect_timeout, self._unreachable, next_replica, self._stop)

    def _flight_info(self, request: StreamRequest) -> flight.FlightInfo:
        descriptor = flight.FlightDescriptor.for_command(request.SerializeToString())
        info = self._call(lambda c, o: c.get_flight_info(descriptor, o))
        (endpoint,) = info.endpoints
        if self._base is None:
            self._base = StreamRequest.FromString(endpoint.ticket.ticket)
        listed = [location.uri.decode() for location in endpoint.locations]
        accepted, dropped = trusted_replicas(self._given, listed)
        for location in dropped:
            if location not in self._warned:
                self._warned.add(location)
                warnings.warn(f"actserve: ignoring replica {location} listed by the server: its scheme differs from "
                              f"{', '.join(self._given)}, so it would get this client's calls (and token)", stacklevel=2)
        for location in accepted:  # the server's replicas join the ones we were given
            if location not in self.locations:
                self.locations.append(location)
        return info

    def _unreachable(self, error: Exception) -> StreamUnavailable:
        return StreamUnavailable(
            f"no actserve server answered at {', '.join(self.locations)} for {self.options.reconnect_timeout:.0f} s "
            f"(last error: {str(error).splitlines()[0]}). Is the server running? Start one with "
            f"`actserve serve --cache <URL of {self.options.cache}> --port <port>` and point the stream at its grpc:// location."
        )


def scheme(location: str) -> str:
    return location.split("://", 1)[0].lower() if "://" in location else ""


def trusted_replicas(given, listed) -> tuple[list[str], list[str]]:
    """(accepted, dropped) of the replicas a server lists. The client sends its calls, bearer token
    included, only to the locations it was given and to listed replicas of the same scheme as
    them: never a grpc:// replica of a grpc+tls:// location (nor the other way round). Given
    locations of several schemes admit only grpc+tls:// replicas."""
    schemes = {scheme(g) for g in given}
    allowed = schemes if len(schemes) == 1 else schemes & {"grpc+tls"}
    accepted = [loc for loc in listed if loc in given or scheme(loc) in allowed]
    return accepted, [loc for loc in listed if loc not in accepted]


def batch_to_tensors(batch: pa.RecordBatch) -> dict[str, torch.Tensor]:
    """A stream's record batch as tensors viewing its buffers (no copy): [rows, d_model] per hook
    in the stream's dtype, [rows] per meta column."""
    out = {}
    for field, column in zip(batch.schema, batch.columns):
        if field.name in META_COLUMNS:
            out[field.name] = primitive_tensor(column, META_DTYPES[field.name])
        else:
            out[field.name] = decode_activations(column, field.metadata[b"dtype"].decode(), int(field.metadata[b"d_model"]))
    return out


def primitive_tensor(column: pa.Array, dtype: torch.dtype) -> torch.Tensor:
    """A view of a null-free primitive Arrow array's values."""
    data = column.buffers()[1]
    start = column.offset * dtype.itemsize
    view = memoryview(data)[start:start + len(column) * dtype.itemsize]
    return torch.frombuffer(view, dtype=dtype) if len(view) else torch.empty(0, dtype=dtype)
