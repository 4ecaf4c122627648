"""What one server lets its streams hold: at most `max_streams` at once, their memory within one
budget, and a stream whose client stops reading ended after an idle timeout.

A stream reserves its whole footprint when it starts (stream_plan.StreamMemory: its buffer slices,
the shard and row indices it reads into the next, its batches in flight), and is admitted only if
that fits in what the budget has left. Its buffers' memory is counted until it is freed, not until
the stream ends: each block (process_memory.ReusedBlocks) tells its lease when it is allocated
and freed, and an ended stream goes on counting the blocks still alive (a batch gRPC is still
sending, or holds after the call, is a view of one). So `held` is at least what the streams'
buffers hold, and never rises above what was admitted: a running stream's blocks stay within its
reservation, an ended stream's only get freed. A stream beyond a limit is refused at once with a
RESOURCE_EXHAUSTED error naming the limit; nothing waits for memory. The budget does not cover
the process's memory before any stream (interpreter, libraries, manifests:
ServerStats.rss_anon_baseline_bytes), gRPC's own buffers, the page cache of memory-mapped shards
(RssFile, which the kernel drops under pressure), nor a remote shard an ended stream's reader
thread is still decoding.

Idle means: the stream's generator sits at a `yield` (its batch handed to Flight) and Flight has
not asked for the next one, because the client stopped reading and gRPC's flow control holds the
writer. A stream still reading shards, or waiting for a build to commit, is not idle. The watchdog
ends an idle stream: it drops its buffers and gives back its slot and the reservation of all but
its blocks still alive (the batch the blocked write holds views one) and its batches in flight;
the batches come back when the call is over, at the client's next read (which fails with the
reason) or when its connection closes, the blocks as they are freed. gRPC gives a server no way to
abort a write its client does not read, so a client that stays connected and never reads keeps
that much.
"""
from __future__ import annotations

import threading
import time
import weakref

from actserve.services.process_memory import resident_memory
from actserve.services.stream_plan import StreamMemory


class StreamEnded(Exception):
    """The server ended the stream (idle timeout); the message says why and how to resume."""


def resource_exhausted(message: str) -> str:
    return f"RESOURCE_EXHAUSTED: {message}"


class StreamLease:
    """One admitted stream: what it counts against the budget, the buffers it holds, and when it
    last waited for Flight. It counts its whole reservation while it runs (its blocks are within
    it); once ended, its blocks still alive, plus its batches in flight until its call is over."""

    def __init__(self, admission: Admission, memory: StreamMemory):
        self.admission, self.memory = admission, memory
        self.counted = memory.total     # what `admission.held` has of it now
        self.block_bytes = 0            # of its buffers' blocks alive
        self.buffers: list = []         # objects with .release(reason), dropped when the stream ends
        self.waiting_since: float | None = None
        self.ended_reason: str | None = None
        self.call_over = False
        self.lock = threading.Lock()

    def charge(self) -> int:
        """What it counts against the budget now."""
        if self.ended_reason is None:
            return self.memory.total - self.memory.buffers + max(self.memory.buffers, self.block_bytes)
        return self.block_bytes + (0 if self.call_over else self.memory.batches)

    def blocks_changed(self, delta: int) -> None:
        """A block of its buffers was allocated (+bytes) or freed (-bytes): ReusedBlocks's `counted`."""
        with self.admission.lock:
            self.block_bytes += delta
            self.admission.recount(self)

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
        """End the stream (once): drop its buffers, give back its slot and what `charge` no longer
        counts. False when it had already ended."""
        with self.lock:
            if self.ended_reason is not None:
                return False
            self.ended_reason = reason or "the stream ended"
            buffers, self.buffers = self.buffers, []
        for buffer in buffers:
            buffer.release(self.ended_reason)
        self.admission.ended(self)
        return True

    def finish(self) -> None:
        """The stream's call is over: end the stream if it has not ended, and give back its batches."""
        self.end()
        self.call_over = True
        self.admission.recount(self)

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

    def admit(self, memory: StreamMemory) -> StreamLease:
        """A lease for a new stream, or ResourceWarning (RESOURCE_EXHAUSTED text) naming the limit."""
        with self.lock:
            if self.active >= self.max_streams:
                self.refused += 1
                raise ResourceWarning(resource_exhausted(
                    f"this server already runs {self.active} streams, its limit (--max-streams "
                    f"{self.max_streams}); retry later or use another server"))
            if self.held + memory.total > self.memory_budget:
                self.refused += 1
                raise ResourceWarning(resource_exhausted(
                    f"this stream needs {memory.total / 1e6:,.1f} MB of server memory and the streams "
                    f"hold {self.held / 1e6:,.1f} MB of this server's {self.memory_budget / 1e6:,.1f} MB "
                    "(--memory-budget-gb); retry later, or ask for fewer hooks, buffer_tokens or batch_size"))
            lease = StreamLease(self, memory)
            self.leases.add(lease)
            self.active += 1
            self.held += lease.counted
            self.peak = max(self.peak, self.held)
            return lease

    def recount(self, lease: StreamLease) -> None:
        """Bring `held` up to date with what the lease counts now."""
        with self.lock:
            charge = lease.charge()
            self.held += charge - lease.counted
            lease.counted = charge
            self.peak = max(self.peak, self.held)

    def ended(self, lease: StreamLease) -> None:
        """The lease's stream ended: its slot is free (once per lease)."""
        with self.lock:
            self.leases.discard(lease)
            self.active -= 1
            self.recount(lease)

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
