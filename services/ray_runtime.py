"""The one way every part of actserve joins Ray: the cluster at `address` or $RAY_ADDRESS, else
a local Ray with this machine's CPUs and no dashboard."""
from __future__ import annotations

import os

import ray


def ensure_ray(address: str | None = None) -> None:
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        kwargs = {} if address else {"num_cpus": os.cpu_count(), "include_dashboard": False}
        ray.init(address=address, log_to_driver=False, **kwargs)
