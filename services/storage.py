"""Storage behind a cache URL (any fsspec URL: local path, file://, s3://, ...): opening it,
the ONE atomic write every file of the project goes through, and errors that name the problem.

A file becomes visible in one step, so a reader sees the old file (or none) or the whole new one:
  * on local disk it is written under a unique temporary name in the same directory, fsynced,
    renamed over the target, and the directory is fsynced so the rename survives a power loss;
  * on an object store (which has no rename) it is sent in a single PUT, which the store
    publishes atomically.
"""
from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import fsspec
import pyarrow as pa


class CacheError(Exception):
    """A cache that cannot be used as asked: the message says which cache and why."""


def open_url(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of a cache URL (local path, file://, s3://, ...)."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, root.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


LOCAL_FS = fsspec.filesystem("file")
TEMPORARY_MARK = ".tmp-"  # in the name of a file atomic_write has not renamed into place yet


class Written(NamedTuple):
    """What `atomic_write` wrote: the file's size and, when asked for, its sha256 (hex; else "")."""
    size: int
    sha256: str = ""


def file_sha256(path: str) -> str:
    """sha256 of a local file, hashed from a memory map in one call: hashlib releases the GIL for the
    whole file. A loop of reads and updates takes the GIL back at every chunk, and beside a thread
    that holds it (a GPU model host's forward launching kernels) each take waits up to the 5 ms
    switch interval: a 136 MB shard's hash took 270 ms there, 105 ms from the map (75 / 89 ms alone)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # mmap refuses an empty file
            return hashlib.sha256().hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, write: Callable, checksum: bool = False) -> Written:
    """Create `path` so that readers see either no file (or the old one) or the whole new one, and
    return its size (and its sha256 when `checksum`, of exactly the bytes published: the temporary
    file before the rename, or the buffer sent). `write(target)` writes the content to `target`: a
    local path (a temporary name, fsynced and renamed) or, for object stores, an Arrow buffer then
    sent in one PUT."""
    if is_local(fs):
        directory = os.path.dirname(path) or "."
        tmp = f"{path}{TEMPORARY_MARK}{uuid.uuid4().hex}"  # unique: concurrent writers never share one
        os.makedirs(directory, exist_ok=True)
        try:
            write(tmp)
            # the data is on disk before any manifest can name it; the sha256 reads the page cache
            # while the disk writes (one after the other, they took 0.28 s of a 136 MB shard's 0.40 s)
            with ThreadPoolExecutor(1) as syncing:
                synced = syncing.submit(fsync, tmp)
                written = Written(os.path.getsize(tmp), file_sha256(tmp) if checksum else "")
                synced.result()
            os.replace(tmp, path)
            fsync(directory)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return written
    sink = pa.BufferOutputStream()
    write(sink)
    buffer = sink.getvalue()
    fs.pipe_file(path, buffer.to_pybytes())  # one PUT (or one completed multipart upload): atomic
    return Written(buffer.size, hashlib.sha256(memoryview(buffer)).hexdigest() if checksum else "")


def remove_temporaries(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Delete what atomic_write left half-written under `root` when its process was killed (local
    disk only: object stores never hold a partial object). For a writer resuming its own output."""
    if is_local(fs) and os.path.isdir(root):
        for directory, _, names in os.walk(root):
            for name in names:
                if TEMPORARY_MARK in name:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(directory, name))


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(data: bytes) -> Callable:
    """An `atomic_write` writer for bytes already in memory."""
    def write(target):
        if isinstance(target, str):
            with open(target, "wb") as f:
                f.write(data)
        else:
            target.write(data)
    return write


def write_local_file(path, data: bytes) -> None:
    """`atomic_write` of bytes to a local path (checkpoints, exported SAEs, reports)."""
    atomic_write(LOCAL_FS, os.fspath(path), write_bytes(data))


def check_writable(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    """Fail early, before any work, if the cache location cannot be written."""
    probe = f"{root}/.actserve-probe-{uuid.uuid4().hex}"
    try:
        if is_local(fs):  # object stores have no directories; makedirs there could create a bucket
            fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as e:  # noqa: BLE001 - every backend raises its own types
        raise storage_error(url, "write to cache URL", e) from e


def storage_error(url: str, action: str, error: Exception) -> CacheError:
    """One line saying what went wrong with the storage behind `url`, and what to set."""
    name, text = type(error).__name__, str(error)
    if name == "NoCredentialsError":
        hint = ("no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "attach an instance profile, or pass key/secret in --storage-options")
    elif name in ("EndpointConnectionError", "ConnectTimeoutError") or isinstance(error, ConnectionError):
        hint = "the storage endpoint did not answer: is it running? check endpoint_url in --storage-options"
    elif isinstance(error, PermissionError):
        hint = "access denied: the credentials lack permission on this location"
    elif "bucket does not exist" in text or "NoSuchBucket" in text:
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        hint = f"bucket {bucket!r} does not exist: create it or fix the URL"
    else:
        hint = f"{name}"
    return CacheError(f"cannot {action} {url}: {hint} ({text.splitlines()[0] if text else name})")
