"""actserve: compute transformer activations once, cache them as Parquet on any fsspec URL, and
stream them shuffled over Arrow Flight to many SAE trainers and evaluators.

The installed package maps the repository's folders, lowest layer first (each imports only the
ones before it):

    actserve.proto     proto/      the wire and manifest messages (generated at install)
    actserve.sae       sae/        SAE architectures, trainer, metrics, SAELens files (imports nothing of ours)
    actserve.services  services/   cache format and storage; model hosts and the cache builder; the server
    actserve.offline   offline/    the offline corpus and tiny model (data preparation)
    actserve.clients   clients/    the stream client; trainer, evaluator and sweep applications
    actserve           actserve/   the command line, the demo, and `actserve.testing`
"""
from importlib.metadata import version

__version__ = version("actserve")
