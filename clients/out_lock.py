"""One trainer per output directory: an exclusive, non-blocking flock on `<out>/.lock`, held for
the run (the kernel drops it when the process ends, however it ends). The file names the holder."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

LOCK_NAME = ".lock"


class OutputInUse(ValueError):
    """Another process holds the output directory's lock; the message names it."""


def hold_out_lock(out: Path) -> IO:
    """Take `out`'s lock, or raise OutputInUse at once. Keep the returned file open for the run."""
    path = Path(out) / LOCK_NAME
    f = open(path, "a+")  # noqa: SIM115 - held open for the run by the caller
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise OutputInUse(f"{out} is in use by another trainer ({holder}): give this run its own --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f
