"""What a cache may contain and how damage is found: shard checksums (whole file and per data
page) checked by the stream, by the evaluator's shard reads and by `actserve cache verify`; shard
paths kept inside the cache root; manifest bytes that do not depend on build history."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import pyarrow.flight as flight
import pytest

from actserve.cli import main as cli_main
from actserve.clients.eval_options import EvalOptions
from actserve.clients.evaluator import cached_sequences
from actserve.proto.stream_pb2 import HealthResult, StreamRequest
from actserve.services.manifest import manifest_to_json, read_manifest, write_manifest
from actserve.services.shard_cache import ShardCache
from actserve.services.storage import CacheError, file_sha256, open_url
from actserve.services.verify import verify_cache
from actserve.testing import SyntheticSpec, flip_byte, write_synthetic_cache
from streamkit import cycle_collector_off, read_table, running_server, server_stats, wait_until

SPEC = SyntheticSpec(train_shards=2, eval_shards=1)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("integrity") / "tiny")
    return url, write_synthetic_cache(url, SPEC)


@pytest.fixture
def cache(pristine, tmp_path):
    """A fresh copy of the cache, the test's to damage."""
    url = str(tmp_path / "tiny")
    shutil.copytree(pristine[0], url)
    return url, read_manifest(url)


def test_shards_record_their_sha256(pristine):
    url, manifest = pristine
    assert all(len(s.sha256) == 64 for s in [*manifest.train.shards, *manifest.eval.shards])
    assert verify_cache(url) == []


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    """Shards are hashed from a memory map in one call (an empty file cannot be mapped)."""
    for data in (b"", b"shard", os.urandom(3 << 20)):
        path = tmp_path / "file"
        path.write_bytes(data)
        assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


def test_flipped_byte_in_train_shard_fails_the_stream(cache, caplog):
    url, manifest = cache
    bad = manifest.train.shards[1]
    flip_byte(url, bad)
    # not logged here: pytest keeps each log record, and the failure's record keeps its traceback
    caplog.set_level(logging.ERROR, logger="actserve.services.server")
    with cycle_collector_off(), running_server([url]) as server:
        ticket = StreamRequest(cache="tiny", batch_size=64).SerializeToString()
        with pytest.raises(flight.FlightServerError, match=bad.path):
            read_table(server.location, ticket)
        # and its memory is given back at once: the error's traceback holds no buffer in a cycle
        wait_until(lambda: server_stats(server.location).memory_held_bytes == 0, what="its blocks freed")


def test_a_manifest_that_misstates_the_row_layout_fails_the_stream_naming_the_shard(tmp_path):
    """Shards written in sequence order (one 1,600-row row group) under a manifest edited to say
    position-major (600-row row groups): the stream fails with one error naming the shard and the
    two layouts, and the server goes on serving."""
    url = str(tmp_path / "tiny")
    spec = SyntheticSpec(d_model=768, sequences_per_shard=200, train_shards=1, eval_shards=0, position_major=False)
    manifest = write_synthetic_cache(url, spec)
    manifest.config.position_major = True
    write_manifest(*open_url(url), manifest)
    with running_server([url]) as server:
        location = f"grpc://127.0.0.1:{server.port}"
        with pytest.raises(flight.FlightServerError,
                           match=f"shard {manifest.train.shards[0].path} has row groups of \\[1600\\] rows, "
                                 "the cache's layout is \\[600, 600, 400\\]"):
            read_table(location, StreamRequest(cache="tiny", batch_size=64).SerializeToString())
        health = next(flight.connect(location).do_action(flight.Action("health", b""))).body.to_pybytes()
        assert HealthResult.FromString(health).status == "ok"


def test_flipped_byte_in_eval_shard_fails_eval(cache, tmp_path):
    url, manifest = cache
    bad = manifest.eval.shards[0]
    flip_byte(url, bad)
    opts = EvalOptions(saes=("unused",), cache=url, out=str(tmp_path / "report"))
    with pytest.raises(CacheError, match=f"shard {bad.path} is corrupt"):
        list(cached_sequences(opts, manifest, list(SPEC.hooks)))


def test_cache_verify_names_every_damaged_shard(cache, capsys):
    url, manifest = cache
    assert cli_main(["cache", "verify", url]) == 0
    assert "verified" in capsys.readouterr().out
    flip_byte(url, manifest.train.shards[0])
    flip_byte(url, manifest.eval.shards[0])
    assert cli_main(["cache", "verify", url]) == 2
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert "train/shard-00000.parquet is corrupt: sha256" in out[0]
    assert "eval/shard-00000.parquet is corrupt: sha256" in out[1]


def test_page_checksums_catch_damage_without_a_recorded_sha256(cache):
    """A manifest from before shard sha256s were recorded: the data pages' CRCs still fail the read."""
    url, manifest = cache
    for shard in manifest.train.shards:
        shard.sha256 = ""
    fs, root = open_url(url)
    write_manifest(fs, root, manifest)
    flip_byte(url, manifest.train.shards[0])
    (problem,) = verify_cache(url)
    assert "train/shard-00000.parquet is corrupt" in problem and "checksum" in problem


def test_cache_info_says_not_verified(pristine, capsys):
    assert cli_main(["cache", "info", pristine[0]]) == 0
    assert "complete (not verified: run actserve cache verify)" in capsys.readouterr().out


@pytest.mark.parametrize("path", ["../other/train/shard-00000.parquet", "/etc/passwd", "train/../../x.parquet",
                                  "./train/shard-00000.parquet", ""])
def test_shard_paths_outside_the_root_are_refused(cache, path, capsys):
    url, manifest = cache
    manifest.train.shards[0].path = path
    fs, root = open_url(url)
    write_manifest(fs, root, manifest)
    with pytest.raises(CacheError, match="shard path .* is not a normalised relative path inside the cache root"):
        read_manifest(url)
    assert cli_main(["cache", "info", url]) == 2
    assert repr(path) in capsys.readouterr().err


def test_shard_cache_keeps_entries_inside_its_directory(pristine, tmp_path):
    url, manifest = pristine
    shard = type(manifest.train.shards[0])()
    shard.CopyFrom(manifest.train.shards[0])
    fs, root = open_url(url)
    cache = ShardCache(str(tmp_path / "local"), 10**9)
    assert cache.read(fs, root, shard, ["token"]).num_rows == shard.num_rows
    shard.path = "../../" + shard.path  # a Shard that did not come through read_manifest
    with pytest.raises(CacheError, match="would leave the local shard cache"):
        cache.read(fs, root, shard, ["token"])


def test_manifest_bytes_do_not_depend_on_stats_insertion_order(pristine):
    _, manifest = pristine
    reordered = type(manifest)()
    reordered.CopyFrom(manifest)
    reordered.ClearField("stats")
    for hook in reversed(list(manifest.stats)):
        reordered.stats[hook].CopyFrom(manifest.stats[hook])
    assert manifest_to_json(reordered) == manifest_to_json(manifest)
    assert list(json.loads(manifest_to_json(reordered))["stats"]) == sorted(manifest.stats)


def test_cli_turns_os_errors_into_one_line(tmp_path, capsys, monkeypatch):
    import errno
    import os

    from actserve.services import verify

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))

    monkeypatch.setattr(verify, "verify_cache", disk_full)
    assert cli_main(["cache", "verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"actserve: error: no space left on the device: {tmp_path / 'x'}\n"
