"""The whole path on object storage: build to s3:// on a local S3-protocol server (moto, 127.0.0.1),
serve it through the node-local shard cache, train against the server, evaluate from s3://."""
from __future__ import annotations

from actserve.services.build import build_cache
from actserve.services.build_options import BuildOptions


def test_build_serve_train_eval_on_s3(tiny_model, corpus, ray_session, s3_options, tmp_path):
    from actserve.clients.eval_options import EvalOptions
    from actserve.clients.evaluator import evaluate
    from actserve.clients.stream import ActivationStream
    from actserve.clients.train_options import TrainOptions
    from actserve.clients.trainer import train_from_server
    from actserve.services.serve_options import ServeOptions
    from actserve.testing import spawn_server

    url = "s3://actserve-test/pipeline"
    hook = "blocks.1.hook_resid_pre"
    manifest = build_cache(BuildOptions(model=str(tiny_model), dataset=str(corpus), hooks=hook, out=url, tokens=16384,
                                        eval_tokens=2048, context_size=64, shard_mb=0.1, storage_options=s3_options),
                           progress=False)
    proc, server = spawn_server(ServeOptions(caches=(url,), storage_options=s3_options,
                                             local_cache_dir=str(tmp_path / "shards"), local_cache_gb=1.0))
    try:
        (sae_dir,) = train_from_server(TrainOptions(hook=hook, out=str(tmp_path / "sae"), tokens=32768, batch_size=512,
                                                    expansions=(2,), lr_warmup_steps=4, log_every=8), server, url,
                                       progress=False)
        stats = ActivationStream(server, cache=url).server_stats()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # two epochs were streamed, yet each train shard crossed the network once
    assert stats.shard_fetches == len(manifest.train.shards) and stats.shard_cache_hits >= len(manifest.train.shards)
    (result,) = evaluate(EvalOptions(saes=(str(sae_dir),), cache=url, storage_options=s3_options,
                                     out=str(tmp_path / "eval")), progress=False)
    assert result["positions"] > 0 and 0 < result["explained_variance"] <= 1 and result["ce_recovered"] > 0
