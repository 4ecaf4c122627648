"""Streaming benchmark: each figure next to its reference, measured in the same run, and the ratio.

  * one stream (server process -> ActivationStream, cache dtype, CPU) vs pyarrow reading the same
    shards' hook columns from local disk (page cache warm for both); and the same stream with
    `read_from` (the same batches cut in the client's process, no socket);
  * 4 concurrent streams (4 client processes, one server process) aggregate vs one stream;
  * client cost per batch: Flight record batch -> torch tensors vs torch.from_numpy of the same bytes;
  * with --epochs > 1, a bare pyarrow.flight client reading all epochs in one call
    (StreamRequest.epochs) vs a call per epoch;
  * CPU seconds per GB (user + system) of one stream, server and client process, vs pyarrow's read:
    client and server share the machine's cores, so a stream over Flight cannot pass
    cores / (its CPU seconds per GB) GB/s;
  * CUDA: one stream to a CUDA device, when there is one.

The cache is synthetic and GPT-2-small-shaped: d_model 768, 4 hooks, float16, context 128; every
stream asks for the first `--stream-hooks` of them (4: all; 1: one GPT-2-width hook, as one SAE
trainer reads) and the local read reads the same columns.
Figures swing between runs on shared machines; the ratios measured side by side are what count.

    python bench/stream.py [--dir /tmp/actserve-bench] [--shards 12] [--repeat 3] [--stream-hooks 1] [--epochs 4]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import torch

from actserve.clients.stream import ActivationStream, batch_to_tensors
from actserve.proto.stream_pb2 import StreamRequest
from actserve.services.manifest import read_manifest
from actserve.services.shard_format import decode_activations
from actserve.services.serve_options import ServeOptions
from actserve.testing import spawn_server
from actserve.testing import SyntheticSpec, write_synthetic_cache

HOOKS = tuple(f"blocks.{i}.hook_resid_pre" for i in (2, 5, 8, 11))
BATCH = 4096
BUFFER_TOKENS = 0  # shuffle buffer of every stream (main sets it: a quarter of the split unless --buffer-tokens)
STREAMED = HOOKS  # the hooks every stream asks for (main sets it from --stream-hooks)
EPOCHS = 1  # epochs each stream reads (and pyarrow reads the shards); timings are per epoch


def ensure_cache(directory: Path, shards: int, position_major: bool) -> tuple[str, int]:
    url = str(directory / ("gpt2-small-synthetic" if position_major else "gpt2-small-synthetic-sequence-order"))
    spec = SyntheticSpec(hooks=HOOKS, d_model=768, context_size=128, sequences_per_shard=40, train_shards=shards,
                         eval_shards=0, dtype="float16", position_major=position_major)
    manifest = read_manifest(url)
    if manifest is None or len(manifest.train.shards) != shards:
        write_synthetic_cache(url, spec)
        manifest = read_manifest(url)
    return url, manifest.train.num_tokens


def row_bytes() -> int:
    return len(STREAMED) * 768 * 2


def time_pyarrow(url: str) -> float:
    """Seconds to read every train shard's streamed hook columns with pyarrow and decode them to
    tensors (what the server reads; the tensors view Arrow's buffers)."""
    paths = sorted((Path(url) / "train").glob("*.parquet"))
    start = time.perf_counter()
    for _ in range(EPOCHS):
        for path in paths:
            table = pq.read_table(path, columns=list(STREAMED))
            for hook in STREAMED:
                decode_activations(table.column(hook), "float16", 768)
    return (time.perf_counter() - start) / EPOCHS


def time_stream(location: str, seed: int = 0, device: str = "cpu", read_from: str = "") -> float:
    """Seconds per epoch through one ActivationStream reading EPOCHS epochs, in the cache dtype (no
    conversion); with read_from, cut from the shards in this process (the server only plans)."""
    start = time.perf_counter()
    tokens = 0
    for batch in ActivationStream(location, cache="gpt2-small-synthetic", hooks=STREAMED, batch_size=BATCH, seed=seed,
                                  dtype=None, drop_bos=False, device=device, buffer_tokens=BUFFER_TOKENS,
                                  read_from=read_from, epochs=EPOCHS):
        tokens += len(batch[STREAMED[0]])
    if device != "cpu":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / EPOCHS


def time_raw_flight(location: str, one_call: bool = False) -> float:
    """Seconds per epoch of the same stream read by a bare pyarrow.flight client (the server's
    share): a call per epoch, or one call of all EPOCHS (StreamRequest.epochs)."""
    request = StreamRequest(cache="gpt2-small-synthetic", hooks=STREAMED, batch_size=BATCH, buffer_tokens=BUFFER_TOKENS)
    calls = [(0, EPOCHS)] if one_call else [(epoch, 1) for epoch in range(EPOCHS)]
    start = time.perf_counter()
    for request.epoch, request.epochs in calls:
        for _ in flight.connect(location).do_get(flight.Ticket(request.SerializeToString())):
            pass
    return (time.perf_counter() - start) / EPOCHS


class ReplayServer(flight.FlightServerBase):
    """Batches of the stream's shape, built once in memory: what Flight alone costs on this machine."""

    def __init__(self, tokens: int):
        super().__init__("grpc://127.0.0.1:0")
        width = row_bytes()
        column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), BATCH, [None, pa.py_buffer(np.random.bytes(BATCH * width))])
        self.table = pa.Table.from_batches([pa.record_batch([column], names=["x"])] * (tokens // BATCH))

    def do_get(self, context, ticket):
        return flight.RecordBatchStream(self.table)


def run_replay_server(tokens: int, streamed: tuple[str, ...], ports: mp.Queue) -> None:
    global STREAMED
    STREAMED = streamed
    server = ReplayServer(tokens)
    ports.put(server.port)
    server.serve()


def transport_ceiling(tokens: int, repeat: int) -> float:
    """Median seconds to receive `tokens` rows of prebuilt batches from another process."""
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    proc = ctx.Process(target=run_replay_server, args=(tokens, STREAMED, ports), daemon=True)
    proc.start()
    try:
        client = flight.connect(f"grpc://127.0.0.1:{ports.get()}")
        times = []
        for _ in range(repeat + 1):  # the first warms up
            start = time.perf_counter()
            for _ in client.do_get(flight.Ticket(b"")):
                pass
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:]) * tokens / (tokens // BATCH * BATCH)
    finally:
        proc.kill()


def stream_worker(location: str, seed: int, start_at: float, buffer_tokens: int, streamed: tuple[str, ...],
                  epochs: int, out: mp.Queue) -> None:
    global BUFFER_TOKENS, STREAMED, EPOCHS
    BUFFER_TOKENS, STREAMED, EPOCHS = buffer_tokens, streamed, epochs
    time.sleep(max(0.0, start_at - time.time()))
    out.put(time_stream(location, seed))


def time_concurrent(location: str, n: int) -> float:
    """Wall seconds per epoch for n client processes to each read EPOCHS epochs (different seeds)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0  # every process imported and waiting
    procs = [ctx.Process(target=stream_worker, args=(location, seed, start_at, BUFFER_TOKENS, STREAMED, EPOCHS, out)) for seed in range(n)]
    for p in procs:
        p.start()
    durations = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return max(durations)


def client_cost(location: str) -> tuple[float, float]:
    """Microseconds per batch: Flight batch -> tensors, and torch.from_numpy of the same bytes."""
    request = StreamRequest(cache="gpt2-small-synthetic", batch_size=BATCH, hooks=STREAMED)
    batches = [c.data for c in flight.connect(location).do_get(flight.Ticket(request.SerializeToString()))][:-1]
    arrays = [{h: np.frombuffer(b.column(h).buffers()[1], np.float16).reshape(-1, 768) for h in STREAMED} for b in batches]
    reps = 20

    start = time.perf_counter()
    for _ in range(reps):
        for b in batches:
            batch_to_tensors(b)
    ours = (time.perf_counter() - start) / (reps * len(batches))

    start = time.perf_counter()
    for _ in range(reps):
        for a in arrays:
            {h: torch.from_numpy(v) for h, v in a.items()}
    plain = (time.perf_counter() - start) / (reps * len(arrays))
    return ours * 1e6, plain * 1e6


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process so far, all its threads (Linux: /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_gb(server_pid: int, run, gb: float) -> tuple[float, float]:
    """CPU seconds per GB of (the server, this process) while `run()` reads EPOCHS epochs of gb."""
    server, client = cpu_seconds(server_pid), cpu_seconds()
    run()
    return (cpu_seconds(server_pid) - server) / (gb * EPOCHS), (cpu_seconds() - client) / (gb * EPOCHS)


def line(what: str, value: float, unit: str, ref_what: str, ref: float, higher_is_better: bool = True) -> None:
    """One figure, its reference (same unit) and the ratio (> 1: better than the reference)."""
    ratio = value / ref if higher_is_better else ref / value
    print(f"  {what:<34} {value:>10,.1f} {unit:<9} | {ref_what:<34} {ref:>10,.1f} {unit:<9} | ratio {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/actserve-bench")
    parser.add_argument("--shards", type=int, default=12, help="31.5 MB shards of 5120 tokens")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are shown")
    parser.add_argument("--stream-hooks", type=int, choices=range(1, len(HOOKS) + 1), default=len(HOOKS),
                        help="hooks every stream asks for, of the cache's 4 (1: one GPT-2-width hook)")
    parser.add_argument("--buffer-tokens", type=int, default=0,
                        help="shuffle buffer of the streams; 0: a quarter of the split, so that reading the next "
                             "buffer overlaps sending this one as in a split of many buffers")
    parser.add_argument("--sequence-order", action="store_true",
                        help="shards with rows in sequence order, as caches built before position-major shards")
    parser.add_argument("--epochs", type=int, default=1,
                        help="epochs each stream reads in one call (a stream's setup, ~0.1 s, spread over them)")
    args = parser.parse_args()

    global BUFFER_TOKENS, STREAMED, EPOCHS
    STREAMED, EPOCHS = HOOKS[:args.stream_hooks], args.epochs
    url, tokens = ensure_cache(Path(args.dir), args.shards, not args.sequence_order)
    BUFFER_TOKENS = args.buffer_tokens or tokens // 4
    gb = tokens * row_bytes() / 1e9
    print(f"cache {url}: {tokens:,} tokens, {len(HOOKS)} hooks x d_model 768 float16; streams of {len(STREAMED)} "
          f"hook(s), {gb:.2f} GB of activations per epoch;"
          f" batch {BATCH}; buffer {BUFFER_TOKENS:,} tokens; {EPOCHS} epoch(s) per stream; {torch.get_num_threads()} CPU threads; median of {args.repeat}")
    proc, location = spawn_server(ServeOptions(caches=(f"gpt2-small-synthetic={url}",), local_cache_gb=0))
    try:
        time_pyarrow(url)  # warm the page cache for both sides
        time_stream(location)
        time_stream(location, read_from=url)
        ref, one, direct = [], [], []
        for _ in range(args.repeat):  # interleaved, so all see the same machine
            ref.append(time_pyarrow(url))
            one.append(time_stream(location))
            direct.append(time_stream(location, read_from=url))
        ref_s, one_s, direct_s = statistics.median(ref), statistics.median(one), statistics.median(direct)
        print("one stream vs pyarrow reading the same shards' columns from local disk and decoding them to tensors")
        line("stream tokens/s", tokens / one_s / 1e3, "k tok/s", "pyarrow read tokens/s", tokens / ref_s / 1e3)
        line("stream GB/s", gb / one_s, "GB/s", "pyarrow read GB/s", gb / ref_s)
        line("same stream, read_from (no socket)", tokens / direct_s / 1e3, "k tok/s", "pyarrow read tokens/s",
             tokens / ref_s / 1e3)
        # Interleaved, the memory a run frees sits idle through the others' runs; a VM can hand idle
        # memory back to its host, and touching it again costs page faults. Back to back, each
        # run's first one warming up, the same two reads keep their memory warm.
        ref_warm = statistics.median([time_pyarrow(url) for _ in range(args.repeat + 1)][1:])
        direct_warm = statistics.median([time_stream(location, read_from=url) for _ in range(args.repeat + 1)][1:])
        line("read_from, runs back to back", tokens / direct_warm / 1e3, "k tok/s", "pyarrow read, back to back",
             tokens / ref_warm / 1e3)
        if Path("/proc/self/stat").exists():
            _, reading = cpu_per_gb(proc.pid, lambda: time_pyarrow(url), gb)
            server, client = cpu_per_gb(proc.pid, lambda: time_stream(location), gb)
            print(f"CPU seconds per GB, user + system (lower is better; the stream's: server {server:.2f} + client "
                  f"{client:.2f}; {os.cpu_count()} cores bound it at {os.cpu_count() / (server + client):.2f} GB/s)")
            line("stream over Flight, both processes", server + client, "s/GB", "pyarrow read", reading,
                 higher_is_better=False)
        raw, raw_one = [], []
        for _ in range(args.repeat):  # interleaved
            raw.append(time_raw_flight(location))
            raw_one.append(time_raw_flight(location, one_call=True))
        raw, raw_one = statistics.median(raw), statistics.median(raw_one)
        line("same stream, bare pyarrow.flight", gb / raw_one, "GB/s", "pyarrow read GB/s", gb / ref_s)
        if EPOCHS > 1:
            line("bare, one call of all epochs", gb / raw_one, "GB/s", "a call per epoch", gb / raw)
        ceiling = transport_ceiling(tokens, args.repeat)
        line("Flight ceiling: prebuilt batches", gb / ceiling, "GB/s", "pyarrow read GB/s", gb / ref_s)

        four = statistics.median(time_concurrent(location, 4) for _ in range(args.repeat))
        print("4 concurrent streams (4 client processes, 1 server process) vs one stream")
        line("4 streams aggregate tokens/s", 4 * tokens / four / 1e3, "k tok/s", "one stream tokens/s", tokens / one_s / 1e3)

        ours, plain = client_cost(location)
        print(f"client cost per batch of {BATCH} tokens x {len(STREAMED)} hooks (lower is better)")
        line("Flight batch -> torch tensors", ours, "us", "torch.from_numpy, same bytes", plain, higher_is_better=False)

        if torch.cuda.is_available():
            cuda = statistics.median(time_stream(location, device="cuda") for _ in range(args.repeat))
            print("one stream to CUDA vs to CPU")
            line("stream to cuda tokens/s", tokens / cuda / 1e3, "k tok/s", "stream to cpu tokens/s", tokens / one_s / 1e3)
        else:
            print("CUDA: not available on this machine, skipped")
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
