"""A server's resource bounds against real Flight clients on 127.0.0.1: memory budgets, the
stream limit, the idle timeout, bounded error messages, caches that cannot be opened."""
from __future__ import annotations

import gc
import itertools
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from actserve.proto.stream_pb2 import CacheList, HealthResult, StreamRequest
from actserve.services.admission import Admission
from actserve.services.manifest import read_manifest
from actserve.services.process_memory import BlocksReleased, ReusedBlocks
from actserve.services.shuffle import epoch_buffers
from actserve.services.stream_plan import StreamLimits, StreamMemory, group_rows, plan_stream, stream_memory
from actserve.services.serve_options import ServeOptions
from actserve.testing import SyntheticSpec, write_synthetic_cache
from streamkit import cycle_collector_off, running_server, server_stats, wait_until

# 48 shards of 32 sequences x 16 tokens, 2 float32 hooks of d_model 256: 1 MiB of activations a shard,
# 48 MiB an epoch: more than gRPC buffers, so a stream whose client reads nothing stalls
SPEC = SyntheticSpec(d_model=256, context_size=16, sequences_per_shard=32, train_shards=48, eval_shards=1,
                     dtype="float32")
SHARD_ROWS = 32 * 16
MB = 10**6


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("limits") / "tiny")
    write_synthetic_cache(url, SPEC)
    return url


def ticket(**fields) -> flight.Ticket:
    return flight.Ticket(StreamRequest(**{"cache": "tiny", "batch_size": 64, "buffer_tokens": SHARD_ROWS, **fields}).SerializeToString())


def test_stalled_streams_stay_within_the_memory_budget(cache):
    stream_bytes = stream_memory(read_manifest(cache), "train", list(SPEC.hooks), False, SHARD_ROWS, 1, 64).total
    budget_gb = 10 * stream_bytes / 1e9  # room for 10 streams of one-shard buffers
    with running_server([cache], memory_budget_gb=budget_gb, stream_memory_gb=budget_gb) as server:
        client = flight.connect(server.location)
        readers, refused = [], []
        for _ in range(32):  # opened, never read
            try:
                readers.append(client.do_get(ticket()))
            except flight.FlightServerError as e:
                refused.append(str(e))
        wait_until(lambda: server_stats(server.location).streams_active + len(refused) >= 10, what="streams admitted")
        s = server_stats(server.location)
        assert s.memory_held_bytes <= s.memory_peak_bytes <= s.memory_budget_bytes == int(budget_gb * 1e9)
        assert s.streams_active <= 10 and s.streams_refused >= 22
        for reader in readers[10:]:  # the refused ones fail on first read, naming the limit
            with pytest.raises(flight.FlightServerError, match="RESOURCE_EXHAUSTED: .*--memory-budget-gb"):
                reader.read_all()
        del readers
        wait_until(lambda: server_stats(server.location).memory_held_bytes == 0, what="memory given back")


def test_a_buffer_over_the_stream_memory_is_refused_up_front(cache):
    with running_server([cache], stream_memory_gb=0.01) as server:
        client = flight.connect(server.location)
        with pytest.raises(pa.ArrowInvalid, match=r"buffer_tokens 4,096 with 2 hooks, 1 consumers and batch_size 64 needs "
                                                  r"[\d.]+ MB \([\d.]+ MB of 2 buffers, .* over this server's per-stream "
                                                  r"limit of 10.0 MB \(--stream-memory-gb\): ask for at most [\d,]+ buffer_tokens"):
            client.do_get(ticket(buffer_tokens=8 * SHARD_ROWS)).read_all()
        assert client.do_get(ticket(hooks=[SPEC.hooks[0]])).read_all().num_rows > 0
        # the default buffer is lowered to what the stream's columns fit in, and the ticket says so
        info = client.get_flight_info(flight.FlightDescriptor.for_command(
            StreamRequest(cache="tiny", batch_size=64).SerializeToString()))
        resolved = StreamRequest.FromString(info.endpoints[0].ticket.ticket)
        manifest = read_manifest(cache)
        assert 0 < resolved.buffer_tokens < ServeOptions.buffer_tokens
        memory = [stream_memory(manifest, "train", list(SPEC.hooks), False, tokens, 1, 64).total
                  for tokens in (resolved.buffer_tokens, resolved.buffer_tokens + 1)]
        assert memory[0] <= 0.01e9 < memory[1]


def test_batches_over_the_stream_memory_are_refused_up_front(cache):
    with running_server([cache], stream_memory_gb=0.01) as server:
        with pytest.raises(pa.ArrowInvalid, match=r"with 2 hooks, 1 consumers and batch_size 8,192 needs .* MB of 2 "
                                                  r"batches in flight\) of server memory, over this server's per-stream "
                                                  r"limit of 10.0 MB \(--stream-memory-gb\): ask for a smaller batch_size"):
            flight.connect(server.location).do_get(ticket(batch_size=8192, dtype="float32", buffer_tokens=0)).read_all()


CLIENT_KILLED_MID_STREAM = """
import os, signal, sys
import pyarrow.flight as flight
reader = flight.connect(sys.argv[1]).do_get(flight.Ticket(bytes.fromhex(sys.argv[2])))
reader.read_chunk()
reader.read_chunk()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_clients_that_go_away_mid_stream_give_back_its_memory(cache):
    """...all of it, without the cycle collector: a stream cancelled while its next buffer is being
    filled fails that fill, whose error must not keep the buffer alive in a cycle."""
    with cycle_collector_off(), running_server([cache]) as server:
        raw = ticket().ticket
        subprocess.run([sys.executable, "-c", CLIENT_KILLED_MID_STREAM, server.location, raw.hex()])
        reader = flight.connect(server.location).do_get(flight.Ticket(raw))
        reader.read_chunk()
        reader.cancel()
        wait_until(lambda: server_stats(server.location).streams_failed == 2, what="both streams ended")
        wait_until(lambda: server_stats(server.location).memory_held_bytes == 0, what="their blocks freed")
        s = server_stats(server.location)
        assert s.streams_active == 0 and s.memory_peak_bytes > 0
        # the process as the kernel and pyarrow count it, next to the reservations
        assert min(s.rss_anon_bytes, s.rss_anon_baseline_bytes, s.rss_file_bytes, s.arrow_peak_bytes) > 0


@pytest.mark.parametrize("position_major", [True, False])
def test_every_buffer_slice_fits_the_memory_its_stream_reserves(tmp_path, position_major):
    """A stream's buffer blocks hold StreamMemory.slice_rows rows: no consumer's part of any buffer
    is larger, shuffled (a share of each buffer) or in whole sequences (a range, up to a whole
    buffer of whole shards when position-major)."""
    # d_model 8192: a position-major shard holds two row groups (pieces), a sequence-order one one
    spec = SyntheticSpec(d_model=8192, train_shards=5, eval_shards=1, position_major=position_major)
    manifest = write_synthetic_cache(str(tmp_path / "c"), spec)
    assert (group_rows(manifest) < 16 * 8) == position_major  # rows per row group, per shard
    limits = StreamLimits(max_batch_size=64, buffer_tokens=100, max_buffer_tokens=10**6, stream_memory_bytes=10**9)
    for mode, consumers, buffer_tokens, drop_bos in itertools.product(
            (StreamRequest.SHUFFLED_TOKENS, StreamRequest.SEQUENCES), (1, 3), (1, 20, 100), (False, True)):
        for c in range(consumers):
            request = StreamRequest(cache="c", batch_size=56, mode=mode, num_consumers=consumers, consumer_index=c,
                                    buffer_tokens=buffer_tokens, drop_bos=drop_bos)
            plan = plan_stream(request, manifest, "c", limits)
            largest = max(b.num_rows for b in epoch_buffers(manifest.train.shards, plan.order))
            assert 0 < largest <= plan.memory.slice_rows, (mode, consumers, buffer_tokens, largest, plan.memory)


def test_stream_limit(cache):
    with running_server([cache], max_streams=2) as server:
        client = flight.connect(server.location)
        held = [client.do_get(ticket()) for _ in range(2)]
        wait_until(lambda: server_stats(server.location).streams_active == 2, what="two streams")
        with pytest.raises(flight.FlightServerError, match=r"RESOURCE_EXHAUSTED: .*its limit \(--max-streams 2\)"):
            client.do_get(ticket()).read_all()
        del held


def test_stalled_stream_is_ended_after_its_idle_timeout(cache):
    memory = stream_memory(read_manifest(cache), "train", list(SPEC.hooks), False, SHARD_ROWS, 1, 64)
    with running_server([cache], stream_idle_timeout=0.2) as server:
        reader = flight.connect(server.location).do_get(ticket())
        reader.read_chunk()
        wait_until(lambda: server_stats(server.location).streams_timed_out == 1, what="the idle timeout")
        # its buffers are dropped but for the block(s) the blocked write views, counted until freed,
        # and its batches, until the call is over
        blocks = server_stats(server.location).memory_held_bytes - memory.batches
        assert blocks in (sum(memory.block_bytes), 2 * sum(memory.block_bytes)), (blocks, memory)
        with pytest.raises(flight.FlightServerError, match=r"read nothing for 0.2 s \(--stream-idle-timeout\)"):
            while True:
                reader.read_chunk()
        wait_until(lambda: server_stats(server.location).memory_held_bytes == 0, what="the rest given back")


def test_a_huge_hooks_list_gets_a_short_error(cache):
    with running_server([cache]) as server:
        hooks = [f"blocks.{i}.hook_resid_pre" for i in range(10_000)]
        with pytest.raises(pa.ArrowInvalid) as failure:
            flight.connect(server.location).do_get(ticket(hooks=hooks)).read_all()
        text = str(failure.value)
        assert "unknown or repeated hooks" in text and "..." in text and "metadata size" not in text
        assert len(text) < 6000


def test_caches_that_cannot_be_opened_are_reported(cache, tmp_path):
    missing = str(tmp_path / "missing")
    with running_server([cache, f"gone={missing}"]) as server:
        (result,) = flight.connect(server.location).do_action(flight.Action("health", b""))
        (gone,) = HealthResult.FromString(result.body.to_pybytes()).unavailable
        assert gone.name == "gone" and "no cache at <cache gone>" in gone.error and missing not in gone.error
        (result,) = flight.connect(server.location).do_action(flight.Action("list-caches", b""))
        listed = CacheList.FromString(result.body.to_pybytes())
        assert [c.name for c in listed.caches] == ["tiny"] and [u.name for u in listed.unavailable] == ["gone"]
    with running_server([cache], expose_urls=True) as server:
        (result,) = flight.connect(server.location).do_action(flight.Action("list-caches", b""))
        assert CacheList.FromString(result.body.to_pybytes()).caches[0].url == cache



HUGE_PAGE_PROBE = """
import pyarrow as pa
from actserve.services.process_memory import HUGE_PAGED_MIN_BYTES, allocate_huge_paged, use_returning_memory_pool
use_returning_memory_pool()
def vm_flags(address):
    inside = False
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if not first.endswith(":"):  # a mapping's first line: lo-hi perms offset ...
            lo, hi = (int(x, 16) for x in first.split("-"))
            inside = lo <= address < hi
        elif first == "VmFlags:" and inside:
            return line.split()[1:]
n = HUGE_PAGED_MIN_BYTES
buffers = pa.allocate_buffer(n), allocate_huge_paged(n // 2), allocate_huge_paged(n)
assert [b.size for b in buffers] == [n, n // 2, n]
print(*("hg" in vm_flags(b.address + b.size // 2) for b in buffers))  # the middle: inside a whole 2 MiB page
"""


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(), reason="no transparent huge pages")
def test_stream_buffers_are_marked_for_huge_pages():
    """In the server's memory pool (jemalloc, which does not ask for huge pages itself)."""
    out = subprocess.run([sys.executable, "-c", HUGE_PAGE_PROBE], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "True"]  # plain, small, large


HEAP_REUSE_PROBE = """
import ctypes, resource, sys, threading
from actserve.services.process_memory import keep_freed_heap_memory
if sys.argv[1] == "keep":
    assert keep_freed_heap_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
# four Flight messages of a 4,096-token GPT-2-width batch in flight, and a CPU SAE step's
# activations at 4,096 tokens and d_sae 2,048 (float32: above 32 MiB, which glibc maps afresh
# whatever was freed before)
sizes = [6 << 20] * 4 + [4096 * 2048 * 4]
def use_and_free():  # allocated, written, then freed
    blocks = [libc.malloc(size) for size in sizes]
    for block, size in zip(blocks, sizes):
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
faults = []
for _ in range(6):  # on this thread, then on a thread of its own, as gRPC's are
    for run in (use_and_free, lambda: (t := threading.Thread(target=use_and_free), t.start(), t.join())):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[4::2]), sum(faults[5::2]))  # after two rounds (a thread may get either of two arenas)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_heap_memory_is_reused_not_faulted_in_again():
    """The allocation pattern of gRPC's receive buffers and a training step's activations: with
    keep_freed_heap_memory (which a Flight stream, a trainer and a model host call) no page is
    faulted in again once warm, on the main thread or another; with glibc's defaults every page
    is, every round."""
    faults = {mode: [int(n) for n in subprocess.run([sys.executable, "-c", HEAP_REUSE_PROBE, mode], check=True,
                                                    capture_output=True, text=True).stdout.split()]
              for mode in ("default", "keep")}
    pages = 4 * (4 * (6 << 20) + 4096 * 2048 * 4) // 4096  # touched after two rounds, on each kind of thread
    assert max(faults["keep"]) < 0.02 * pages < min(faults["default"]), faults


def test_stream_buffer_memory_is_reused_only_once_nothing_views_it():
    """ReusedBlocks: a block serves a later buffer once its array and every Arrow buffer (a batch
    in flight, a tensor a trainer holds) exported from it are gone, never sooner; a column never
    has more than `buffers` blocks alive, and `counted` hears of each allocation and free."""
    def address(array):
        return array.__array_interface__["data"][0]

    changes = []
    blocks = ReusedBlocks([64_000, 8_000], buffers=2, wait=None, counted=changes.append)
    first = blocks.take(1000, [64, 8])
    first[0][:] = 7
    second = blocks.take(1000, [64, 8])
    assert len({address(a) for a in first + second}) == 4  # the first is still alive
    assert changes == [65536, 8192] * 2  # whole pages
    wide = address(second[0])
    batch = pa.py_buffer(first[0]).slice(64, 64)  # a zero-copy slice, as a batch of a buffer is
    del first, second
    third = blocks.take(990, [64, 8])  # the first's wide block is viewed by the batch: not taken
    assert address(third[0]) == wide and bytes(batch) == bytes([7]) * 64
    taken = []
    waiting = threading.Thread(target=lambda: taken.append(blocks.take(1000, [64, 8])))
    waiting.start()  # both wide blocks are in use: it waits for one
    time.sleep(0.2)
    assert not taken and len(changes) == 4
    del batch
    waiting.join(timeout=5)
    assert taken and all(a.flags.writeable and a.shape == (1000, w) for a, w in zip(taken[0], [64, 8]))
    assert len(changes) == 4  # reused, none allocated
    with pytest.raises(ValueError, match="larger than its reserved block"):
        blocks.take(1025, [64, 8])
    blocks.release()
    with pytest.raises(BlocksReleased):
        blocks.take(10, [8, 8])
    del third, taken
    gc.collect()
    assert sum(changes) == 0  # every block freed, and heard of


def test_a_trainer_process_reader_allocates_beyond_its_blocks_after_a_wait():
    """With `wait` seconds (a reader in a trainer's process, whose trainer may keep every batch), a
    column whose blocks are all in use gets one more after the wait."""
    blocks = ReusedBlocks([4096], buffers=1, wait=0.01)
    held = [blocks.take(100, [8]) for _ in range(3)]
    assert len({a[0].__array_interface__["data"][0] for a in held}) == 3


def test_a_stream_counts_its_blocks_until_they_are_freed():
    """An ended stream's lease counts its buffer blocks still viewed (a batch gRPC still sends) and,
    until its call is over, its batches in flight; the rest of its reservation comes back at once."""
    admission = Admission(memory_budget=10**9, max_streams=4, idle_timeout=60)
    try:
        memory = StreamMemory(slice_rows=1000, block_bytes=(65536, 8192), reading=100_000, batches=50_000)
        lease = admission.admit(memory)
        blocks = ReusedBlocks(list(memory.block_bytes), buffers=2, wait=None, counted=lease.blocks_changed)
        columns = blocks.take(1000, [64, 8])
        assert admission.held == memory.total  # blocks within the reservation
        batch = pa.py_buffer(columns[0]).slice(0, 640)
        del columns
        lease.end("idle")
        blocks.release()
        assert admission.held == 65536 + memory.batches and admission.active == 0
        lease.finish()
        assert admission.held == 65536
        with pytest.raises(ResourceWarning, match="RESOURCE_EXHAUSTED"):
            admission.admit(StreamMemory(1, (), reading=10**9 - 65536 + 1, batches=0))
        del batch
        assert admission.held == 0 and admission.peak == memory.total
    finally:
        admission.close()
