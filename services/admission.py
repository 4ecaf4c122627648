"""What one server lets its streams hold: at most `max_streams` at once, their buffers within one
memory budget, and a stream whose client stops reading ended after an idle timeout.

A stream reserves its whole footprint (StreamPlan.memory_bytes: the bytes of its requested columns
in the shuffle buffers it can hold at once) when it starts and returns it when it ends, so the sum of
reservations bounds the buffer memory of all streams together. A stream beyond a limit is refused
at once with a RESOURCE_EXHAUSTED error naming the limit; nothing waits for memory.

Idle means: the stream's generator sits at a `yield` (its batch handed to Flight) and Flight has
not asked for the next one, because the client stopped reading and gRPC's flow control holds the
writer. A stream still reading shards, or waiting for a build to commit, is not idle. The watchdog
ends an idle stream by dropping its buffers (their memory is freed at once, whatever the writer
thread does) and returning its reservation; the client's next read fails with the reason.
"""
from __future__ import annotations

import threading
import time
import weakref


class StreamEnded(Exception):
    """The server ended the stream (idle timeout); the message says why and how to resume."""


def resource_exhausted(message: str) -> str:
    return f"RESOURCE_EXHAUSTED: {message}"


class StreamLease:
    """One admitted stream: its reservation, the buffers it holds, and when it last waited for Flight."""

    def __init__(self, admission: Admission, memory_bytes: int):
        self.admission, self.memory_bytes = admission, memory_bytes
        self.buffers: list = []         # objects with .release(reason), dropped when the stream ends
        self.waiting_since: float | None = None
        self.ended_reason: str | None = None
        self.lock = threading.Lock()

    def hold(self, buffer):
        """Track a buffer so that ending the stream frees it; returns it."""
        with self.lock:
            if self.ended_reason is not None:
                raise StreamEnded(self.ended_reason)
            self.buffers = [b for b in self.buffers if not b.released] + [buffer]
        return buffer

    def yielded(self) -> None:
        self.waiting_since = time.monotonic()

    def resumed(self) -> None:
        self.waiting_since = None
        if self.ended_reason is not None:
            raise StreamEnded(self.ended_reason)

    def end(self, reason: str | None = None) -> bool:
        """Release the reservation and the buffers (once); False when it had already ended."""
        with self.lock:
            if self.ended_reason is not None:
                return False
            self.ended_reason = reason or "the stream ended"
            buffers, self.buffers = self.buffers, []
        for buffer in buffers:
            buffer.release(self.ended_reason)
        self.admission.release(self)
        return True

    def __del__(self):  # a stream whose generator never started still gives its reservation back
        if self.ended_reason is None:
            self.end()


class Admission:
    def __init__(self, memory_budget: int, max_streams: int, idle_timeout: float):
        self.memory_budget, self.max_streams, self.idle_timeout = memory_budget, max_streams, idle_timeout
        self.lock = threading.Lock()
        self.leases: weakref.WeakSet[StreamLease] = weakref.WeakSet()  # for the watchdog; see StreamLease.__del__
        self.active = self.held = self.peak = self.refused = self.timed_out = 0
        self.stop = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, name="actserve-idle-watchdog", daemon=True)
        self.watchdog.start()

    def admit(self, memory_bytes: int) -> StreamLease:
        """A lease for a new stream, or ResourceWarning (RESOURCE_EXHAUSTED text) naming the limit."""
        with self.lock:
            if self.active >= self.max_streams:
                self.refused += 1
                raise ResourceWarning(resource_exhausted(
                    f"this server already runs {self.active} streams, its limit (--max-streams "
                    f"{self.max_streams}); retry later or use another server"))
            if self.held + memory_bytes > self.memory_budget:
                self.refused += 1
                raise ResourceWarning(resource_exhausted(
                    f"this stream needs {memory_bytes / 1e6:,.1f} MB of buffer memory and the streams running "
                    f"hold {self.held / 1e6:,.1f} MB of this server's {self.memory_budget / 1e6:,.1f} MB "
                    "(--memory-budget-gb); retry later, or ask for fewer hooks or buffer_tokens"))
            lease = StreamLease(self, memory_bytes)
            self.leases.add(lease)
            self.active += 1
            self.held += memory_bytes
            self.peak = max(self.peak, self.held)
            return lease

    def release(self, lease: StreamLease) -> None:
        """Called once per lease, by StreamLease.end."""
        with self.lock:
            self.leases.discard(lease)
            self.active -= 1
            self.held -= lease.memory_bytes

    def _watch(self) -> None:
        period = min(1.0, self.idle_timeout / 4)
        while not self.stop.wait(period):
            now = time.monotonic()
            with self.lock:
                idle = [lease for lease in self.leases
                        if lease.waiting_since is not None and now - lease.waiting_since > self.idle_timeout]
            for lease in idle:
                if lease.end(f"the server ended this stream: its client read nothing for {self.idle_timeout:g} s "
                             "(--stream-idle-timeout); resume from the rows received"):
                    with self.lock:
                        self.timed_out += 1

    def close(self) -> None:
        self.stop.set()
