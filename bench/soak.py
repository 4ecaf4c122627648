"""Soak: 32 concurrent streams against one `actserve serve` process for --seconds: 8 stalled (opened,
never read), 8 cancelled and reopened from their cursor, 16 reading whole epochs. Reports the server's
peak RSS against its configured memory budget, streams completed, and rows lost or repeated (every
reader checks each epoch is every train row exactly once). Not a test: run by hand.

    ./dev python bench/soak.py --seconds 60
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time

import numpy as np
import pyarrow.flight as flight

from actserve.proto.stream_pb2 import ServerStats, StreamRequest
from actserve.services.serve_options import ServeOptions
from actserve.testing import SyntheticSpec, spawn_server, write_synthetic_cache

SPEC = SyntheticSpec(d_model=512, context_size=32, sequences_per_shard=64, train_shards=16, eval_shards=1)


def rss_peak_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def keys(table) -> np.ndarray:
    return table.column("sequence").to_numpy() * SPEC.context_size + table.column("position").to_numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--memory-budget-gb", type=float, default=0.5)
    args = ap.parse_args()
    url = tempfile.mkdtemp() + "/soak"
    manifest = write_synthetic_cache(url, SPEC)
    split_rows = manifest.train.num_tokens
    first_key = manifest.train.shards[0].first_sequence * SPEC.context_size
    proc, location = spawn_server(ServeOptions(caches=(url,), local_cache_gb=0, memory_budget_gb=args.memory_budget_gb,
                                               stream_memory_gb=args.memory_budget_gb, stream_idle_timeout=30))
    stop = time.monotonic() + args.seconds
    result = {"completed": 0, "lost": 0, "repeated": 0, "refused": 0, "reopened": 0}
    lock = threading.Lock()

    def ticket(seed, start=0):
        return flight.Ticket(StreamRequest(cache="soak", batch_size=1024, seed=seed, include_meta=True,
                                           buffer_tokens=2 * SPEC.sequences_per_shard * SPEC.context_size, start=start).SerializeToString())

    def epoch(seed: int, cancel_every: int | None) -> None:
        client = flight.connect(location)
        got, start, chunks = [], 0, 0
        while True:
            try:
                reader = client.do_get(ticket(seed, start))
                while True:
                    chunk = reader.read_chunk().data
                    got.append(keys(chunk))
                    start += chunk.num_rows
                    chunks += 1
                    if cancel_every and chunks % cancel_every == 0:
                        reader.cancel()
                        with lock:
                            result["reopened"] += 1
                        break
            except StopIteration:
                break
            except flight.FlightServerError as e:
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                with lock:
                    result["refused"] += 1
                time.sleep(0.2)
        seen = np.bincount(np.concatenate(got) - first_key, minlength=split_rows)
        with lock:
            result["completed"] += 1
            result["lost"] += int((seen == 0).sum())
            result["repeated"] += int((seen > 1).sum())

    def reader_loop(i: int, cancel_every: int | None) -> None:
        seed = i * 1000
        while time.monotonic() < stop:
            epoch(seed, cancel_every)
            seed += 1

    stalled = [flight.connect(location).do_get(ticket(10**6 + i)) for i in range(8)]
    threads = [threading.Thread(target=reader_loop, args=(i, None)) for i in range(16)]
    threads += [threading.Thread(target=reader_loop, args=(16 + i, 7)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (res,) = flight.connect(location).do_action(flight.Action("stats", b""))
    stats = ServerStats.FromString(res.body.to_pybytes())
    print(f"seconds {args.seconds:g}, memory budget {stats.memory_budget_bytes / 1e6:,.0f} MB, "
          f"peak block memory {stats.memory_peak_bytes / 1e6:,.0f} MB, server peak RSS {rss_peak_mb(proc.pid):,.0f} MB")
    print(f"epochs completed {result['completed']}, rows lost {result['lost']}, repeated {result['repeated']}, "
          f"cancels+reopens {result['reopened']}, RESOURCE_EXHAUSTED refusals {result['refused']}, "
          f"streams timed out {stats.streams_timed_out}, refused {stats.streams_refused}")
    del stalled
    proc.terminate()
    proc.wait()


if __name__ == "__main__":
    main()
