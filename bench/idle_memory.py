"""What touching freshly allocated memory costs after it sat freed for a while, next to the same
allocation touched again at once (the reference, same run).

On a VM that reports free pages to its host (virtio-balloon free page reporting), memory freed
and left idle for a few seconds goes back to the host; touching it again faults every page in
from the host. A stream's 400 MB buffers (4 GPT-2-width hooks) freed between two streams pay that
at the next stream's start: bench/stream.py's interleaved `read_from` runs.

    python bench/idle_memory.py [--mb 400] [--idle 1 3 6]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

PAGE = 4096


def touch_seconds(nbytes: int) -> float:
    """Seconds to allocate nbytes and write one byte of each page."""
    start = time.perf_counter()
    buffer = np.empty(nbytes, np.uint8)
    buffer[::PAGE] = 1
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=400, help="size of each allocation (a 4-hook stream's buffer: 400)")
    parser.add_argument("--idle", type=float, nargs="+", default=[1, 3, 6], help="seconds the freed memory sits idle")
    args = parser.parse_args()
    if args.mb <= 0 or min(args.idle) < 0:
        parser.error(f"--mb must be positive and --idle seconds not negative (got --mb {args.mb}, --idle {args.idle})")
    nbytes = args.mb * 2**20
    touch_seconds(nbytes)  # the process's first allocation
    for idle in args.idle:
        touch_seconds(nbytes)
        at_once = touch_seconds(nbytes)  # freed and allocated again at once
        time.sleep(idle)
        after = touch_seconds(nbytes)
        print(f"touch {args.mb} MB after {idle:g} s idle: {after:.3f} s | allocated again at once: {at_once:.3f} s | "
              f"ratio {after / at_once:.1f}")


if __name__ == "__main__":
    main()
