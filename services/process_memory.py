"""How this process's memory is allocated and measured: the resident bytes /proc reports, the
pyarrow pool a server uses, stream buffers in transparent huge pages and reused, and glibc's heap
kept for gRPC's receive buffers. Every function is Linux-specific where it touches the kernel or libc and a
no-op (or empty) elsewhere."""
from __future__ import annotations

import ctypes
import functools
import platform
import sys
import threading
import time
import weakref
from collections.abc import Callable

import numpy as np
import pyarrow as pa

HUGE_PAGE = 2 << 20  # bytes of a transparent huge page on x86-64 Linux
HUGE_PAGED_MIN_BYTES = 32 << 20  # buffers below this stay in ordinary pages (allocate_huge_paged)
MADV_HUGEPAGE = 14
# glibc's mallopt parameters (malloc.h) and the values keep_freed_heap_memory sets
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# free memory at the heap's top kept up to this: a CPU training step at the library's defaults
# (4,096 tokens x d_sae 4,096) frees ~0.5 GB; with 128 MiB kept it faulted 30-50k pages a step
HEAP_TRIM_THRESHOLD = 1 << 30
REUSE_WAIT, REUSE_POLL = 0.05, 0.001  # seconds a trainer process's ReusedBlocks waits for a block in use, and between looks
LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
if LIBC is not None:
    LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def resident_memory(pid: int | str = "self") -> dict[str, int]:
    """A process's resident bytes by kind, from /proc/PID/status (Linux; empty elsewhere): RssAnon
    (heap: buffers, batches, the interpreter), RssFile (memory-mapped shards and libraries: page
    cache the kernel can drop), VmRSS (their sum with RssShmem) and VmHWM (VmRSS's peak)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = [line.split() for line in f]
    except FileNotFoundError:
        return {}
    return {fields[0].rstrip(":"): int(fields[1]) * 1024 for fields in lines
            if fields[0] in ("RssAnon:", "RssFile:", "VmRSS:", "VmHWM:")}


def use_returning_memory_pool() -> None:
    """Make this process's default pyarrow memory pool jemalloc returning freed pages to the system at
    once. pyarrow's default, mimalloc, keeps freed pages resident for a while: under 16 streams the
    server's RssAnon stood ~25% above what its pool had allocated. Process-wide: called where a
    server process starts. A pyarrow built without jemalloc (macOS wheels) keeps its default."""
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:
        return
    pa.set_memory_pool(pool)
    pa.jemalloc_set_decay_ms(0)


def allocate_huge_paged(nbytes: int) -> pa.Buffer:
    """nbytes from pyarrow's pool; from HUGE_PAGED_MIN_BYTES up, its whole 2 MiB pages marked for
    transparent huge pages (Linux; elsewhere, or with THP off, ordinary pages). A stream's buffer is
    written once, sent and freed, so every buffer is touched afresh: in 4 KiB pages that is one page
    fault per 4 KiB, ~0.35 s of system time per GB filled (of the server's 0.9 s of CPU per GB sent
    over Flight); in huge pages 1/512 as many faults. The mark outlives the buffer on its address
    range, where jemalloc later puts small allocations that then take whole 2 MiB pages: marking
    the 8 MiB buffers of bench/soak.py raised the server's RssAnon from 393 to 493 MB (bound 500)."""
    buffer = pa.allocate_buffer(nbytes)
    start = -(-buffer.address // HUGE_PAGE) * HUGE_PAGE
    end = (buffer.address + buffer.size) // HUGE_PAGE * HUGE_PAGE
    if LIBC is not None and nbytes >= HUGE_PAGED_MIN_BYTES and end > start:
        LIBC.madvise(start, end - start, MADV_HUGEPAGE)  # advice: a refusal leaves ordinary pages
    return buffer


class BlocksReleased(Exception):
    """The stream these blocks were for has ended: a `take` waiting for a block gives up."""


class ReusedBlocks:
    """Memory for a stream's buffers: per column, blocks of one fixed size, at most `buffers` of
    them alive at once, each reused once nothing made from it is alive.

    A stream's buffers are each filled once, sent and dropped. Allocated afresh, every buffer's
    pages are faulted in and zeroed by the kernel (in huge pages: ~19% of a server's CPU while it
    sends one GPT-2-width hook over Flight, `perf`), and the freed ones go back to the system
    (the server's jemalloc purges at once, for the memory bound). Here a block serves a later
    buffer once the array it was last handed out as, and every Arrow buffer exported from that
    array (`pa.py_buffer`: the batches gRPC is sending, the tensors a trainer holds), are gone.

    A block is alive from its allocation until it is freed, whether or not the pool still keeps
    it: a batch gRPC sends after its stream has ended keeps its block alive. `counted` is told of
    each allocation (+bytes) and free (-bytes), from whichever thread drops the last view, so
    that a server counts every block against its budget until it is freed. When a column's
    `buffers` blocks are all alive and in use, `take` waits for one: for as long as it takes when
    `wait` is None (a server, where only its own sends view a buffer and they drain as the client
    reads, so a stream's buffers never hold more than `buffers` blocks per column), else `wait`
    seconds before it allocates one more (a reader in a trainer's process, whose trainer may keep
    batches as long as it likes). Blocks come from pyarrow's pool (which counts them; glibc's
    malloc kept ~2x the live buffers resident under many streams), in whole pages
    (`rounded_up`). One thread takes; `release` (the stream ended) may come from another."""

    def __init__(self, block_bytes: list[int], buffers: int, wait: float | None,
                 counted: Callable[[int], None] = lambda delta: None):
        self.sizes = [rounded_up(max(n, 1)) for n in block_bytes]
        self.buffers, self.wait, self.counted = buffers, wait, counted
        self.kept: list[list[tuple[pa.Buffer, weakref.ref]]] = [[] for _ in self.sizes]  # (block, its last array)
        self.alive = [0] * len(self.sizes)  # per column: blocks allocated and not yet freed
        self.released = False
        self.lock = threading.RLock()  # re-entrant: a block freed while it is held updates `alive`

    def release(self) -> None:
        """Keep no block from now on: each is freed once nothing views it; a waiting `take` raises BlocksReleased."""
        with self.lock:
            self.released, kept = True, self.kept
            self.kept = [[] for _ in self.sizes]
        del kept  # outside the lock: dropping the last reference frees a block, whose finalizer takes it

    def take(self, rows: int, widths: list[int]) -> list[np.ndarray]:
        """One buffer's columns: a [rows, width] array for each column's width."""
        memory = [self._block(column, rows * width) for column, width in enumerate(widths)]
        arrays = [np.frombuffer(m, np.uint8, count=rows * w).reshape(rows, w) for m, w in zip(memory, widths)]
        with self.lock:
            dropped, self.kept = self.kept, [[] if self.released else
                                             [*((b, u) for b, u in kept if b is not m), (m, weakref.ref(a))][-self.buffers:]
                                             for kept, m, a in zip(self.kept, memory, arrays)]
        del dropped
        return arrays

    def _block(self, column: int, nbytes: int) -> pa.Buffer:
        """A free kept block of the column, or a new one once the column has fewer than `buffers` alive."""
        if nbytes > self.sizes[column]:
            raise ValueError(f"a buffer column of {nbytes:,} bytes is larger than its reserved block of "
                             f"{self.sizes[column]:,} bytes")
        deadline = None if self.wait is None else time.monotonic() + self.wait
        while True:
            with self.lock:
                if self.released:
                    raise BlocksReleased("the stream ended")
                free = next((block for block, user in self.kept[column] if user() is None), None)
                if free is not None:
                    return free
                if self.alive[column] < self.buffers or (deadline is not None and time.monotonic() > deadline):
                    self.alive[column] += 1
                    break
            time.sleep(REUSE_POLL)
        try:
            block = allocate_huge_paged(self.sizes[column])
        except BaseException:
            with self.lock:
                self.alive[column] -= 1
            raise
        self.counted(block.size)
        weakref.finalize(block, block_freed, self.alive, column, block.size, self.lock, self.counted).atexit = False
        return block


def block_freed(alive: list[int], column: int, nbytes: int, lock: threading.RLock, counted: Callable[[int], None]) -> None:
    """A ReusedBlocks block's finalizer. It holds what it updates, not the pool, whose kept blocks
    would otherwise keep the pool and so themselves alive."""
    with lock:
        alive[column] -= 1
    counted(-nbytes)


def rounded_up(nbytes: int) -> int:
    """nbytes in whole pages: huge ones where allocate_huge_paged marks them, else 4 KiB ones."""
    page = HUGE_PAGE if nbytes >= HUGE_PAGED_MIN_BYTES else 4096
    return -(-nbytes // page) * page


@functools.cache
def keep_freed_heap_memory() -> bool:
    """Keep glibc's freed heap memory in this process for reuse (mallopt; False where libc is not
    glibc). By default glibc maps allocations of 128 KiB up afresh (rising that threshold only to
    the largest size freed so far, at most 32 MiB), gives the heap's top back once more than twice
    that is free there, and gives threads arenas of 64 MiB heaps that it unmaps as soon as one is
    wholly free; every page given back is faulted in again at its next use. That cost:
    - a stream client, whose gRPC threads receive each Flight message (6 MB for a batch of 4,096
      GPT-2-width tokens) into buffers from malloc, a fresh 4 KiB page every ~14-50 KB received
      (0.15-0.7 s of system time per GB);
    - a CPU forward of the tiny model, which frees and allocates megabytes in every layer, 30-50%
      of its speed (~18 faults a token), on some runs and not others;
    - a CPU SAE training step at the library's defaults (4,096 tokens, d_sae 4,096 for the tiny
      model: 64 MB activations), ~100,000 faults and a third of its speed.
    Here no allocation is mapped afresh (all come from the heap), up to HEAP_TRIM_THRESHOLD of free
    memory stays at the heap's top, and threads that allocate for the first time share the main
    arena. Process-wide, once: called where a model host, a trainer, an evaluation or the tiny
    model's training starts, and before a stream's first call."""
    if LIBC is None or platform.libc_ver()[0] != "glibc":
        return False
    return all(LIBC.mallopt(option, value) == 1 for option, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD), (M_ARENA_MAX, 1)))
