"""What the server's memory pool costs a stream: tokens/s of one stream from a server process as
`actserve serve` runs it (jemalloc returning freed pages at once, process_memory.use_returning_memory_pool)
next to one on pyarrow's default pool (mimalloc), the same cache, runs interleaved, medians.

    ./dev python bench/memory_pool.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import pyarrow.flight as flight

from actserve.proto.stream_pb2 import StreamRequest
from actserve.services.serve_options import ServeOptions
from actserve.testing import SyntheticSpec, spawn_server, write_synthetic_cache

SPEC = SyntheticSpec(d_model=768, context_size=128, sequences_per_shard=256, train_shards=12, eval_shards=1,
                     hooks=("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"))
DEFAULT_POOL_SERVER = ("import json, sys; from actserve.services.serve_options import ServeOptions; "
                       "from actserve.services.server import ActivationServer; "
                       "server = ActivationServer(ServeOptions(**json.loads(sys.argv[1]))); "
                       "print(server.location, flush=True); server.serve()")


def tokens_per_second(location: str, seed: int) -> float:
    request = StreamRequest(cache="pool", batch_size=4096, seed=seed, buffer_tokens=100_000)
    start, rows = time.perf_counter(), 0
    for chunk in flight.connect(location).do_get(flight.Ticket(request.SerializeToString())):
        rows += chunk.data.num_rows
    return rows / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    url = tempfile.mkdtemp() + "/pool"
    write_synthetic_cache(url, SPEC)
    options = ServeOptions(caches=(url,), local_cache_gb=0)
    served, served_location = spawn_server(options)
    default = subprocess.Popen([sys.executable, "-c", DEFAULT_POOL_SERVER, json.dumps(asdict(options))],
                               stdout=subprocess.PIPE, text=True)
    default_location = default.stdout.readline().strip()
    runs = {"served (jemalloc, decay 0)": [], "pyarrow default (mimalloc)": []}
    try:
        for seed in range(args.repeat):
            for name, location in zip(runs, (served_location, default_location)):
                runs[name].append(tokens_per_second(location, seed))
    finally:
        served.terminate()
        default.terminate()
    medians = {name: statistics.median(values) for name, values in runs.items()}
    for name, values in runs.items():
        print(f"{name}: median {medians[name] / 1e3:,.0f}k tokens/s, runs {[round(v / 1e3) for v in values]}")
    subject, reference = medians.values()
    print(f"ratio served / default pool: {subject / reference:.2f}")


if __name__ == "__main__":
    main()
