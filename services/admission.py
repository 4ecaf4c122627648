"""What one server lets its streams hold: at most `max_streams` at once, their memory within one
budget, and a stream whose client stops reading ended after an idle timeout.

A stream reserves its whole footprint when it starts (stream_plan.StreamMemory: its buffer slices,
the shard and row indices it reads into the next, its batches in flight) and gives it back when its
call is over, so the sum of reservations bounds what all streams allocate together. A stream
beyond a limit is refused at once with a RESOURCE_EXHAUSTED error naming the limit; nothing waits
for memory. The budget does not cover the process's memory before any stream (interpreter,
libraries, manifests: ServerStats.rss_anon_baseline_bytes) nor the page cache of memory-mapped
shards (RssFile, which the kernel drops under pressure).

Idle means: the stream's generator sits at a `yield` (its batch handed to Flight) and Flight has
not asked for the next one, because the client stopped reading and gRPC's flow control holds the
writer. A stream still reading shards, or waiting for a build to commit, is not idle. The watchdog
ends an idle stream: it drops its buffers, gives back its slot and the reservation of all but what
the blocked write still holds (StreamMemory.pinned: the batch gRPC holds is a view of the buffer
being sent); that rest comes back when the call is over, at the client's next read (which fails
with the reason) or when its connection closes. gRPC gives a server no way to abort a write its
client does not read, so a client that stays connected and never reads keeps that much.
"""
from __future__ import annotations

import threading
import time
import weakref

from actserve.services.process_memory import resident_memory


class StreamEnded(Exception):
    """The server ended the stream (idle timeout); the message says why and how to resume."""


def resource_exhausted(message: str) -> str:
    return f"RESOURCE_EXHAUSTED: {message}"


class StreamLease:
    """One admitted stream: its reservation, the buffers it holds, and when it last waited for Flight."""

    def __init__(self, admission: Admission, memory_bytes: int, pinned_bytes: int):
        self.admission, self.memory_bytes, self.pinned_bytes = admission, memory_bytes, pinned_bytes
        self.buffers: list = []         # objects with .release(reason), dropped when the stream ends
        self.waiting_since: float | None = None
        self.ended_reason: str | None = None
        self.lock = threading.Lock()

    def hold(self, buffer):
        """Track a buffer so that ending the stream frees it; returns it. A stream sends one buffer
        while the next is read, so the lease keeps the last two: one sent before those is dropped
        here (keeping it would hold every buffer of the epoch until the stream ends)."""
        with self.lock:
            if self.ended_reason is not None:
                raise StreamEnded(self.ended_reason)
            self.buffers = [*self.buffers[-1:], buffer]
        return buffer

    def yielded(self) -> None:
        self.waiting_since = time.monotonic()

    def resumed(self) -> None:
        self.waiting_since = None
        if self.ended_reason is not None:
            raise StreamEnded(self.ended_reason)

    def end(self, reason: str | None = None) -> bool:
        """End the stream (once): drop its buffers, give back its slot and its reservation but for
        `pinned_bytes`, which its call may go on holding until `finish`. False when it had already ended."""
        with self.lock:
            if self.ended_reason is not None:
                return False
            self.ended_reason = reason or "the stream ended"
            buffers, self.buffers = self.buffers, []
        for buffer in buffers:
            buffer.release(self.ended_reason)
        self.admission.release(self, self.memory_bytes - self.pinned_bytes, ended=True)
        return True

    def finish(self) -> None:
        """The stream's call is over: end the stream if it has not ended, and give back the rest."""
        self.end()
        with self.lock:
            pinned, self.pinned_bytes = self.pinned_bytes, 0
        if pinned:
            self.admission.release(self, pinned, ended=False)

    def __del__(self):  # a stream whose generator never started still gives its reservation back
        self.finish()


class Admission:
    def __init__(self, memory_budget: int, max_streams: int, idle_timeout: float):
        self.memory_budget, self.max_streams, self.idle_timeout = memory_budget, max_streams, idle_timeout
        self.lock = threading.RLock()  # re-entrant: a lease collected while it is held gives its reservation back
        self.leases: weakref.WeakSet[StreamLease] = weakref.WeakSet()  # for the watchdog; see StreamLease.__del__
        self.active = self.held = self.peak = self.refused = self.timed_out = 0
        self.baseline_rss_anon = resident_memory().get("RssAnon", 0)  # before any stream
        self.stop = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, name="actserve-idle-watchdog", daemon=True)
        self.watchdog.start()

    def admit(self, memory_bytes: int, pinned_bytes: int) -> StreamLease:
        """A lease for a new stream (StreamMemory's total and pinned bytes), or ResourceWarning
        (RESOURCE_EXHAUSTED text) naming the limit."""
        with self.lock:
            if self.active >= self.max_streams:
                self.refused += 1
                raise ResourceWarning(resource_exhausted(
                    f"this server already runs {self.active} streams, its limit (--max-streams "
                    f"{self.max_streams}); retry later or use another server"))
            if self.held + memory_bytes > self.memory_budget:
                self.refused += 1
                raise ResourceWarning(resource_exhausted(
                    f"this stream needs {memory_bytes / 1e6:,.1f} MB of server memory and the streams running "
                    f"hold {self.held / 1e6:,.1f} MB of this server's {self.memory_budget / 1e6:,.1f} MB "
                    "(--memory-budget-gb); retry later, or ask for fewer hooks, buffer_tokens or batch_size"))
            lease = StreamLease(self, memory_bytes, pinned_bytes)
            self.leases.add(lease)
            self.active += 1
            self.held += memory_bytes
            self.peak = max(self.peak, self.held)
            return lease

    def release(self, lease: StreamLease, memory_bytes: int, ended: bool) -> None:
        """Give back part of a lease's reservation; `ended`: the stream's slot too (once per lease)."""
        with self.lock:
            self.held -= memory_bytes
            if ended:
                self.leases.discard(lease)
                self.active -= 1

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
