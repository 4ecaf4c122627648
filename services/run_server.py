"""Running the activation server: in this process (`serve`), or as several Ray actors, each a
FlightServer on its own port, listing each other as replicas (`start_actors`)."""
from __future__ import annotations

import signal
import sys
import threading
import time

import ray

from actserve.services.process_memory import use_returning_memory_pool
from actserve.services.ray_runtime import ensure_ray
from actserve.services.serve_options import ServeOptions, parse_cache_spec
from actserve.services.server import ActivationServer


# CPUs a server actor reserves in Ray's scheduler: none. Its threads spend their time in Arrow's
# C++ code (page copies, CRC32, Flight writes) with the GIL released, a few percent of a core per
# demo-sized trainer. Reserving one left half of a 2-core machine idle: the demo's sweep ran its
# trainers one at a time (475 s for six) instead of two at a time.
SERVER_ACTOR_CPUS = 0


class ServerActor:
    """An ActivationServer inside a Ray actor (`ray.remote(ServerActor)`), serving on a thread."""

    def __init__(self, options: ServeOptions, port: int, token: str | None):
        use_returning_memory_pool()
        self.server = ActivationServer(options, port, token)
        threading.Thread(target=self.server.serve, daemon=True, name="actserve-flight").start()

    def location(self) -> str:
        return self.server.location

    def set_locations(self, locations: list[str]) -> None:
        self.server.locations = list(locations)


def start_actors(options: ServeOptions, token: str | None) -> list:
    """options.servers ServerActors on Ray, each listing all of them as replicas."""
    ensure_ray(options.ray_address)
    actor_class = ray.remote(num_cpus=SERVER_ACTOR_CPUS)(ServerActor)
    ports = [options.port + i if options.port else 0 for i in range(options.servers)]
    actors = [actor_class.remote(options, port, token) for port in ports]
    locations = ray.get([a.location.remote() for a in actors]) + list(options.peers)
    ray.get([a.set_locations.remote(locations) for a in actors])
    return actors


def serve(options: ServeOptions) -> None:
    """Serve until interrupted, printing each grpc:// location on its own line of stdout."""
    token = options.token()
    names = ", ".join(f"{n}={u}" for n, u in map(parse_cache_spec, options.caches))
    if options.servers == 1:
        use_returning_memory_pool()
        server = ActivationServer(options, token=token)
        print(server.location, flush=True)
        print(f"actserve: serving {names} at {server.location}{' (token required)' if token else ''}; "
              "Ctrl-C stops", file=sys.stderr, flush=True)
        try:
            server.serve()  # returns on SIGINT / SIGTERM
        finally:
            server.shutdown()
        return
    actors = start_actors(options, token)
    for location in ray.get([a.location.remote() for a in actors]):
        print(location, flush=True)
    print(f"actserve: {len(actors)} servers serving {names}; Ctrl-C stops", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for actor in actors:
            ray.kill(actor)
