"""What `actserve serve` takes (ServeOptions), validated here and trusted below, and the rule for
which binds need a bearer token."""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from actserve.services.options import option, required


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: localhost and all of 127.0.0.0/8 and ::1.

    127.0.0.2 and the rest of 127/8 count as loopback: Linux routes them to `lo`, so nothing off the
    machine can connect. A wildcard (0.0.0.0, ::) or any other address or name needs a token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_cache_spec(spec: str) -> tuple[str, str]:
    """`name=URL` or `URL` (named by its last path component) -> (name, URL)."""
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)=(.+)", spec)
    if match:
        return match.group(1), match.group(2)
    url = spec.rstrip("/")
    return url.rsplit("/", 1)[-1] or url, url


@dataclass(frozen=True)
class ServeOptions:
    """Everything `actserve serve` takes, one flag per field; validated here, trusted below."""
    caches: tuple[str, ...] = required(
        "cache to serve (repeatable); named by NAME or the URL's last path component",
        flag="cache", repeat=True, metavar="[NAME=]URL")
    host: str = option("127.0.0.1", "address to bind; anything but loopback needs a token")
    port: int = option(0, "port (0: any free one); with --servers K, ports PORT..PORT+K-1")
    servers: int = option(1, "server processes (Ray actors when > 1), listed as replicas")
    token_env: str = option("ACTSERVE_TOKEN", "environment variable holding the bearer token")
    insecure: bool = option(False, "allow a non-loopback bind without a token")
    tls_cert: str = option("", "PEM certificate: serve grpc+tls:// (with --tls-key)")
    tls_key: str = option("", "PEM private key of --tls-cert")
    storage_options: dict = option({}, "JSON of fsspec options for the cache URLs")
    local_cache_dir: str = option(os.path.join(os.path.expanduser("~"), ".cache", "actserve", "shards"),
                                  "node-local copy of remote (s3://) shards, shared by the servers of this node")
    local_cache_gb: float = option(20.0, "size bound of --local-cache-dir (LRU eviction); 0 reads remote shards directly")
    max_batch_size: int = option(65536, "largest batch_size accepted, tokens")
    # 5 x 16,384 x 128 tokens: batches of up to 16,384 tokens at context 128 hold >= 0.9 of a
    # global shuffle's distinct sequences (proto/stream.proto)
    buffer_tokens: int = option(5 * 16384 * 128,
                                "default shuffle buffer, tokens (>= 5 x batch x context for 0.9 of a global shuffle's "
                                "distinct sequences per batch); a request leaving buffer_tokens 0 gets this, lowered "
                                "to what --stream-memory-gb allows for its columns")
    max_buffer_tokens: int = option(1 << 30, "largest buffer_tokens a request may ask for")
    peers: tuple[str, ...] = option((), "grpc:// location of another server of the same caches, listed as a "
                                        "replica (repeatable)", flag="peer", repeat=True, metavar="LOCATION")
    # Resource bounds (defaults fit a 24 GB machine next to its page cache and other work):
    memory_budget_gb: float = option(8.0, "memory all streams together may hold (buffers, reads, batches in flight; "
                                          "not the process's baseline nor the page cache); a stream beyond it is "
                                          "refused (RESOURCE_EXHAUSTED)")
    stream_memory_gb: float = option(1.0, "memory one stream may hold (two buffer slices, the shard read, two "
                                          "batches: stream_plan.StreamMemory); a request needing more is refused")
    max_streams: int = option(64, "concurrent streams allowed")
    stream_idle_timeout: float = option(300.0, "seconds a stream may wait for its client to read before the "
                                               "server ends it")
    expose_urls: bool = option(False, "show the caches' storage URLs to clients (list-caches, errors)")
    debug: bool = option(False, "send clients errors' full text (else one line of at most 1000 characters)")
    ray_address: str | None = option(None, "Ray cluster for --servers > 1 (default: $RAY_ADDRESS, else local)")

    def __post_init__(self):
        names = [parse_cache_spec(c)[0] for c in self.caches]
        checks = [
            (bool(self.caches), "give at least one --cache URL"),
            (len(set(names)) == len(names), f"two caches share a name in {list(self.caches)}: use name=URL"),
            (0 <= self.port <= 65535 - self.servers + 1, f"--port must be in 0..65535, got {self.port}"),
            (self.servers >= 1, f"--servers must be >= 1, got {self.servers}"),
            (bool(self.tls_cert) == bool(self.tls_key), "--tls-cert and --tls-key go together"),
            (self.local_cache_gb >= 0, f"--local-cache-gb must be >= 0, got {self.local_cache_gb}"),
            (self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size}"),
            (self.memory_budget_gb > 0, f"--memory-budget-gb must be > 0, got {self.memory_budget_gb}"),
            (0 < self.stream_memory_gb <= self.memory_budget_gb,
             f"--stream-memory-gb must be in (0, --memory-budget-gb {self.memory_budget_gb}], got {self.stream_memory_gb}"),
            (self.max_streams >= 1, f"--max-streams must be >= 1, got {self.max_streams}"),
            (self.stream_idle_timeout > 0, f"--stream-idle-timeout must be > 0, got {self.stream_idle_timeout}"),
            (1 <= self.buffer_tokens <= self.max_buffer_tokens,
             f"--buffer-tokens must be in 1..--max-buffer-tokens {self.max_buffer_tokens}, got {self.buffer_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for path in (self.tls_cert, self.tls_key):
            if path and not os.path.isfile(path):
                raise ValueError(f"TLS file {path} does not exist")

    @property
    def scheme(self) -> str:
        return "grpc+tls" if self.tls_cert else "grpc"

    def token(self) -> str | None:
        """The bearer token from the environment; a non-loopback bind without one is refused."""
        token = os.environ.get(self.token_env) or None
        if token is None and not is_loopback(self.host) and not self.insecure:
            raise ValueError(
                f"binding {self.host} (not a loopback address) needs a bearer token: set ${self.token_env} "
                "(clients send it as `authorization: Bearer <token>`), or pass --insecure"
            )
        return token
