"""Soak: 16 concurrent streams against one `actserve serve` process for --seconds: 8 reading whole
epochs, 4 that stall (read a batch, then nothing for longer than the idle timeout, then resume from
their cursor) and 4 that disconnect mid-stream (cancel the call, or close the connection) and
reopen from their cursor. The server's memory budget is smaller than 16 streams' buffers, so some
are refused and retry.

Reports the server's peak anonymous resident memory (RssAnon, sampled every 10 ms) above its
RssAnon at start (before any stream), next to the configured bound (--memory-budget-gb), as a ratio,
and the total peak RSS (VmHWM, which also counts memory-mapped shard pages); the streams completed;
rows lost or repeated (every epoch must be every train row exactly once). Not a test: run by hand.

    ./dev python bench/soak.py --seconds 60
    ./dev python bench/soak.py --seconds 60 --shards 64 --buffer-tokens 32768 --memory-budget-gb 1

The second run's buffers are 32 MiB a column, so the server puts them in transparent huge pages
(services/process_memory.py: allocate_huge_paged); the first's 8 MiB buffers stay in 4 KiB pages.
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from dataclasses import replace

import numpy as np
import pyarrow.flight as flight

from actserve.proto.stream_pb2 import ServerStats, StreamRequest
from actserve.services.process_memory import resident_memory
from actserve.services.serve_options import ServeOptions
from actserve.testing import SyntheticSpec, spawn_server, write_synthetic_cache

SPEC = SyntheticSpec(d_model=512, context_size=32, sequences_per_shard=64, train_shards=16, eval_shards=1)
BUFFER_TOKENS = 4 * SPEC.sequences_per_shard * SPEC.context_size  # 4 shards (main sets it from --buffer-tokens)
IDLE_TIMEOUT = 3.0  # seconds; the stalling clients stall for twice this
MB = 1e6


def keys(table) -> np.ndarray:
    return table.column("sequence").to_numpy() * SPEC.context_size + table.column("position").to_numpy()


class PeakSampler(threading.Thread):
    """The peak RssAnon of a process, and its RssFile at that moment, read every 10 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.peak_anon = self.file_at_peak = 0

    def run(self) -> None:
        while not self.stop.wait(0.01):
            now = resident_memory(self.pid)
            if now.get("RssAnon", 0) > self.peak_anon:
                self.peak_anon, self.file_at_peak = now["RssAnon"], now["RssFile"]


def main() -> None:
    global SPEC, BUFFER_TOKENS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--memory-budget-gb", type=float, default=0.5)
    ap.add_argument("--shards", type=int, default=SPEC.train_shards,
                    help=f"train shards of {SPEC.sequences_per_shard * SPEC.context_size:,} tokens")
    ap.add_argument("--buffer-tokens", type=int, default=BUFFER_TOKENS,
                    help=f"each stream's shuffle buffer; a column of it is {SPEC.d_model * 2:,} bytes a token")
    args = ap.parse_args()
    if args.shards < 1 or args.buffer_tokens < 1:
        ap.error("--shards and --buffer-tokens must be >= 1")
    SPEC, BUFFER_TOKENS = replace(SPEC, train_shards=args.shards), args.buffer_tokens
    url = tempfile.mkdtemp() + "/soak"
    manifest = write_synthetic_cache(url, SPEC)
    split_rows = manifest.train.num_tokens
    first_key = manifest.train.shards[0].first_sequence * SPEC.context_size
    proc, location = spawn_server(ServeOptions(caches=(url,), local_cache_gb=0, memory_budget_gb=args.memory_budget_gb,
                                               stream_memory_gb=args.memory_budget_gb, stream_idle_timeout=IDLE_TIMEOUT))
    sampler = PeakSampler(proc.pid)
    sampler.start()
    stop = time.monotonic() + args.seconds
    result = {"completed": 0, "lost": 0, "repeated": 0, "refused": 0, "reopened": 0, "timed_out": 0}
    lock = threading.Lock()

    def count(key: str, n: int = 1) -> None:
        with lock:
            result[key] += n

    def ticket(seed, start=0):
        return flight.Ticket(StreamRequest(cache="soak", batch_size=1024, seed=seed, include_meta=True,
                                           buffer_tokens=BUFFER_TOKENS, start=start).SerializeToString())

    def epoch(seed: int, behaviour: str) -> None:
        """One epoch of `seed`, read as `behaviour` says: "read", "stall" or "disconnect"."""
        got, start, chunks = [], 0, 0
        while True:
            client = flight.connect(location)
            try:
                reader = client.do_get(ticket(seed, start))
                while True:
                    chunk = reader.read_chunk().data
                    got.append(keys(chunk))
                    start += chunk.num_rows
                    chunks += 1
                    if behaviour == "stall" and chunks % 5 == 1:
                        time.sleep(2 * IDLE_TIMEOUT)  # the server ends the stream meanwhile
                    if behaviour == "disconnect" and chunks % 7 == 0:
                        reader.cancel() if chunks % 14 else client.close()
                        count("reopened")
                        break
            except StopIteration:
                break
            except flight.FlightServerError as e:
                if "RESOURCE_EXHAUSTED" in str(e):
                    count("refused")
                    time.sleep(0.2)
                elif "--stream-idle-timeout" in str(e):
                    count("timed_out")
                else:
                    raise
            finally:
                client.close()
        seen = np.bincount(np.concatenate(got) - first_key, minlength=split_rows)
        count("completed")
        count("lost", int((seen == 0).sum()))
        count("repeated", int((seen > 1).sum()))

    def reader_loop(i: int, behaviour: str) -> None:
        seed = i * 1000
        while time.monotonic() < stop:
            epoch(seed, behaviour)
            seed += 1

    behaviours = ["read"] * 8 + ["stall"] * 4 + ["disconnect"] * 4
    threads = [threading.Thread(target=reader_loop, args=(i, b)) for i, b in enumerate(behaviours)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sampler.stop.set()
    sampler.join()
    (res,) = flight.connect(location).do_action(flight.Action("stats", b""))
    stats = ServerStats.FromString(res.body.to_pybytes())
    total_peak = resident_memory(proc.pid)["VmHWM"]
    proc.terminate()
    proc.wait()
    above = sampler.peak_anon - stats.rss_anon_baseline_bytes
    print(f"{args.seconds:g} s, {len(threads)} concurrent streams (8 reading, 4 stalling past the {IDLE_TIMEOUT:g} s idle "
          f"timeout, 4 disconnecting), {BUFFER_TOKENS:,}-token buffers of {len(SPEC.hooks)} hooks x d_model "
          f"{SPEC.d_model} {SPEC.dtype}")
    print(f"configured bound (--memory-budget-gb) {stats.memory_budget_bytes / MB:,.0f} MB | peak RssAnon above start "
          f"{above / MB:,.0f} MB | ratio {above / stats.memory_budget_bytes:.2f}")
    print(f"RssAnon at start {stats.rss_anon_baseline_bytes / MB:,.0f} MB (interpreter, libraries); peak RssAnon "
          f"{sampler.peak_anon / MB:,.0f} MB; RssFile then {sampler.file_at_peak / MB:,.0f} MB (mapped shards, "
          f"libraries); peak total RSS (VmHWM) {total_peak / MB:,.0f} MB")
    print(f"streams' reservations peak {stats.memory_peak_bytes / MB:,.0f} MB; pyarrow pool peak "
          f"{stats.arrow_peak_bytes / MB:,.0f} MB")
    print(f"epochs completed {result['completed']}, rows lost {result['lost']}, repeated {result['repeated']}, "
          f"disconnects+reopens {result['reopened']}, idle timeouts seen by clients {result['timed_out']}, "
          f"RESOURCE_EXHAUSTED refusals seen {result['refused']}; server: timed out {stats.streams_timed_out}, "
          f"refused {stats.streams_refused}")


if __name__ == "__main__":
    main()
