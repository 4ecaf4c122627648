"""What `actserve serve` takes (ServeOptions), validated here and trusted below, and the rule for
which binds need a bearer token."""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field


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
    """Everything `actserve serve` takes; validated here, trusted below."""
    caches: tuple[str, ...]            # "URL" or "name=URL"
    host: str = "127.0.0.1"
    port: int = 0                      # 0: any free port; with servers=K, ports port..port+K-1
    servers: int = 1                   # server processes (Ray actors when > 1)
    token_env: str = "ACTSERVE_TOKEN"  # environment variable holding the bearer token
    insecure: bool = False             # allow a non-loopback bind without a token
    tls_cert: str = ""                 # PEM files; both or neither
    tls_key: str = ""
    storage_options: dict = field(default_factory=dict)
    local_cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "actserve", "shards")
    local_cache_gb: float = 20.0       # 0: read remote shards directly, no node-local copy
    max_batch_size: int = 65536        # tokens
    # Default shuffle buffer: 5 x 16,384 x 128 tokens, so batches of up to 16,384 tokens at context
    # 128 hold >= 0.9 of a global shuffle's distinct sequences (proto/stream.proto); a request
    # leaving buffer_tokens 0 gets this, lowered to what --stream-memory-gb allows for its columns.
    buffer_tokens: int = 5 * 16384 * 128
    max_buffer_tokens: int = 1 << 30
    peers: tuple[str, ...] = ()        # more grpc:// locations serving the same caches
    # Resource bounds (defaults fit a 24 GB machine next to its page cache and other work):
    memory_budget_gb: float = 8.0      # memory all streams reserve together, above the process's baseline
    stream_memory_gb: float = 1.0      # memory one stream reserves (stream_plan.StreamMemory)
    max_streams: int = 64              # concurrent streams
    stream_idle_timeout: float = 300.0 # seconds a stream may wait for its client to read
    expose_urls: bool = False          # list-caches and errors show the caches' storage URLs
    debug: bool = False                # errors sent to clients keep their full text
    ray_address: str | None = None

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
