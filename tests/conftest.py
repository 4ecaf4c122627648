"""Shared real parts for the tests: a tiny trained model, a local corpus, one local Ray, and an
S3-protocol server (moto's, on 127.0.0.1, as s3fs's own tests do)."""
from __future__ import annotations

import os
import socket

import pytest

# No hub is reachable: make every Hugging Face code path fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEST_MODEL = dict(seed=0, n_layers=2, d_model=64, n_heads=4, n_ctx=64, vocab_size=512, max_steps=150)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny SAEs: intra-op threads only add overhead, and OpenMP's spin-waiting
    collapses (10x slower here) when another process shares the two cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from actserve.offline.corpus import write_stdlib_corpus

    path = tmp_path_factory.mktemp("corpus") / "stdlib.jsonl"
    write_stdlib_corpus(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, corpus):
    """A 2-layer GPT-2-architecture model directory, trained briefly on the corpus."""
    from actserve.offline.tiny_model import make_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(out, corpus_path=corpus, **TEST_MODEL)
    return out


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol endpoint on loopback, with a bucket `actserve-test`."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("actserve-test")
    yield endpoint
    server.stop()


@pytest.fixture
def s3_options(s3_endpoint):
    """fsspec storage options pointing s3:// at the test endpoint."""
    return {"client_kwargs": {"endpoint_url": s3_endpoint}, "key": "testing", "secret": "testing"}


TINY_CACHE = dict(hooks="blocks.0.hook_resid_pre,blocks.1.hook_resid_pre", tokens=196_608, eval_tokens=16_384,
                  context_size=64, shard_mb=2.0, batch_sequences=32)


@pytest.fixture(scope="session")
def tiny_cache(tiny_model, corpus, ray_session, tmp_path_factory):
    """A cache of both residual-stream hooks of the tiny model, with train and eval splits."""
    from actserve.services.build import build_cache
    from actserve.services.build_options import BuildOptions

    out = tmp_path_factory.mktemp("tiny-cache") / "tiny"
    manifest = build_cache(BuildOptions(model=str(tiny_model), dataset=str(corpus), out=str(out), **TINY_CACHE),
                           progress=False)
    return str(out), manifest


@pytest.fixture(scope="session")
def tiny_server(tiny_cache):
    """A real `actserve serve` process on 127.0.0.1 serving tiny_cache (named "tiny")."""
    from actserve.services.serve_options import ServeOptions
    from actserve.testing import spawn_server

    proc, location = spawn_server(ServeOptions(caches=(tiny_cache[0],)))
    yield location
    proc.terminate()
    proc.wait(timeout=30)
