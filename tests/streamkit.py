"""Helpers of the streaming tests: real servers on 127.0.0.1, in a thread or in their own process."""
from __future__ import annotations

import contextlib
import gc
import subprocess
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from actserve.proto.stream_pb2 import ServerStats
from actserve.services.server import ActivationServer
from actserve.services.serve_options import ServeOptions
from actserve.testing import spawn_server


@contextlib.contextmanager
def running_server(caches, token: str | None = None, **options):
    """An ActivationServer serving on a thread of this process."""
    server = ActivationServer(ServeOptions(caches=tuple(caches), **{"local_cache_gb": 0, **options}), token=token)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()


def server_process(cache: str, port: int) -> subprocess.Popen:
    """`serve()` in its own process (what `actserve serve --cache ... --port ...` runs), once it listens."""
    proc, location = spawn_server(ServeOptions(caches=(cache,), port=port, local_cache_gb=0))
    assert location == f"grpc://127.0.0.1:{port}", location
    return proc


def server_stats(location: str) -> ServerStats:
    (result,) = flight.connect(location).do_action(flight.Action("stats", b""))
    return ServerStats.FromString(result.body.to_pybytes())


@contextlib.contextmanager
def cycle_collector_off():
    """Python's cycle collector off, so that memory kept only by a reference cycle stays kept
    (with it on, whether such memory is freed depends on when a collection happens to run)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def row_keys(sequence, position, context_size: int) -> np.ndarray:
    """One integer per (sequence, position): the row's index in a split that starts at sequence 0."""
    return np.asarray(sequence, dtype=np.int64) * context_size + np.asarray(position, dtype=np.int64)


def read_table(location: str, ticket: bytes, headers=()) -> pa.Table:
    client = flight.connect(location)
    return client.do_get(flight.Ticket(ticket), flight.FlightCallOptions(headers=list(headers))).read_all()
