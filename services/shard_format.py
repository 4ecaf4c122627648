"""The shard format: one Parquet file per shard, one row per token, uncompressed.

Columns: `sequence` (int64), `position` (int32), `token` (int32), and one `fixed_size_binary(d_model x
bytes)` column per hook whose field metadata holds `dtype` and `d_model` (a fixed-size binary column
reads 4-6x faster than `list<float16>`).

Rows are position-major in caches whose config says so (manifest.proto): row p * N + s of a shard
of N sequences is position p of sequence s, so a row group holds a few positions of every sequence
of the shard, about POSITION_MAJOR_GROUP_BYTES (`shard_group_rows`); `in_sequence_order` gives a
reader the sequence order back. In caches built before, rows are in sequence order and a row group
holds whole sequences, about ROW_GROUP_BYTES.
"""
from __future__ import annotations

import contextlib

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from actserve.proto.manifest_pb2 import BuildConfig, Shard
from actserve.services.build_options import SHARD_DTYPES
from actserve.services.storage import CacheError, Written, atomic_write, is_local

META_COLUMNS = ("sequence", "position", "token")
# the torch dtype activations decode to (and so the bytes per value)
DTYPES = {name: getattr(torch, name) for name in SHARD_DTYPES}
ROW_GROUP_BYTES = 16 << 20  # one row group per ~16 MiB: a good size for one ranged GET
# A shuffle buffer holds, of each sequence it draws, the rows a row group holds of it (shuffle.py):
# smaller row groups mix more sequences per byte of buffer. 2 MiB makes that 2 rows in GPT-2 small's
# 12-hook layout (56 sequences a shard); a remote shard is fetched whole (shard_cache.py) anyway.
POSITION_MAJOR_GROUP_BYTES = 2 << 20


def bytes_per_value(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def hook_field(hook: str, d_model: int, dtype: str) -> pa.Field:
    width = d_model * bytes_per_value(dtype)
    return pa.field(hook, pa.binary(width), nullable=False,
                    metadata={"dtype": dtype, "d_model": str(d_model)})


def shard_schema(hooks: list[str], d_model: int, dtype: str) -> pa.Schema:
    return pa.schema(
        [pa.field("sequence", pa.int64(), nullable=False),
         pa.field("position", pa.int32(), nullable=False),
         pa.field("token", pa.int32(), nullable=False)]
        + [hook_field(h, d_model, dtype) for h in hooks]
    )


def encode_activations(values: torch.Tensor) -> pa.FixedSizeBinaryArray:
    """[rows, d_model] CPU tensor -> fixed_size_binary column over the same bytes (no copy)."""
    values = values.contiguous()
    raw = values.view(torch.uint8).numpy()  # works for bfloat16 too, which numpy lacks
    width = raw.shape[1]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(raw), [None, pa.py_buffer(raw)])


def decode_activations(column: pa.Array | pa.ChunkedArray, dtype: str, d_model: int) -> torch.Tensor:
    """fixed_size_binary column -> [rows, d_model] tensor of `dtype`, viewing Arrow's buffer."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    width = d_model * bytes_per_value(dtype)
    data = column.buffers()[1]
    start = column.offset * width
    view = memoryview(data)[start:start + len(column) * width]
    if len(view) == 0:
        return torch.empty((0, d_model), dtype=DTYPES[dtype])
    return torch.frombuffer(view, dtype=DTYPES[dtype]).view(len(column), d_model)


def in_row_order(values: torch.Tensor, num_sequences: int, position_major: bool) -> torch.Tensor:
    """[num_sequences * context_size, d] rows in sequence order -> the shard's row order (a copy
    when position_major: row p * N + s is position p of sequence s)."""
    if not position_major:
        return values
    return values.view(num_sequences, -1, values.shape[1]).transpose(0, 1).reshape(-1, values.shape[1])


def sequence_order_rows(num_sequences: int, context_size: int) -> np.ndarray:
    """For each row in sequence order (s * context_size + p), the row of the same token in a
    position-major shard (p * num_sequences + s)."""
    return (np.arange(num_sequences)[:, None] + np.arange(context_size)[None, :] * num_sequences).ravel()


def in_sequence_order(table: pa.Table, context_size: int, position_major: bool) -> pa.Table:
    """A whole shard's rows in sequence order (as read: already so unless position_major)."""
    if not position_major:
        return table
    return table.take(sequence_order_rows(table.num_rows // context_size, context_size))


def rows_per_row_group(row_bytes: int, context_size: int) -> int:
    """Whole sequences per row group, about ROW_GROUP_BYTES each (shards in sequence order)."""
    sequences = max(1, ROW_GROUP_BYTES // (row_bytes * context_size))
    return sequences * context_size


def shard_group_rows(config: BuildConfig, d_model: int) -> int:
    """Rows per row group of the cache's shards: position-major, whole positions of a full shard's
    sequences, about POSITION_MAJOR_GROUP_BYTES; in sequence order, whole sequences."""
    row_bytes = shard_row_bytes(len(config.hooks), d_model, config.dtype)
    if not config.position_major:
        return rows_per_row_group(row_bytes, config.context_size)
    sequences = config.sequences_per_shard
    positions = min(config.context_size, max(1, POSITION_MAJOR_GROUP_BYTES // (sequences * row_bytes)))
    return positions * sequences


def shard_row_bytes(num_hooks: int, d_model: int, dtype: str) -> int:
    """Bytes of one row of a shard: every hook's vector and the 16 bytes of the meta columns."""
    return num_hooks * d_model * bytes_per_value(dtype) + 16


def shard_groups(num_rows: int, group_rows: int) -> list[int]:
    """Rows of each row group of a shard of num_rows rows, as write_shard lays them out."""
    return [min(group_rows, num_rows - start) for start in range(0, num_rows, group_rows)]


def write_shard(
    fs: fsspec.AbstractFileSystem,
    path: str,
    tokens: np.ndarray,
    first_sequence: int,
    activations: dict[str, torch.Tensor],
    hooks: list[str],
    dtype: str,
    group_rows: int,
    position_major: bool,
) -> Written:
    """Write one shard atomically: tokens [n_seq, ctx] in sequence order, activations {hook:
    [n_seq*ctx, d_model]} already in the shard's row order (position-major if asked). The model
    host puts them in that order as it copies them off the device, other callers with
    `in_row_order`: reordering here would be one more pass over the shard's bytes. Row groups of
    group_rows rows (`shard_group_rows`). Returns its size in bytes and sha256, for the manifest.
    Not committed until a manifest lists it."""
    n_seq, ctx = tokens.shape
    d_model = activations[hooks[0]].shape[1]
    schema = shard_schema(hooks, d_model, dtype)
    sequences = np.arange(first_sequence, first_sequence + n_seq, dtype=np.int64)
    positions = np.arange(ctx, dtype=np.int32)
    if position_major:  # row p * N + s: position p of sequence s
        sequence, position, token = np.tile(sequences, ctx), np.repeat(positions, n_seq), tokens.T
    else:
        sequence, position, token = np.repeat(sequences, ctx), np.tile(positions, n_seq), tokens
    columns = [pa.array(sequence), pa.array(position), pa.array(token.reshape(-1).astype(np.int32, copy=False))]
    columns += [encode_activations(activations[h]) for h in hooks]
    table = pa.Table.from_arrays(columns, schema=schema)
    # Uncompressed, no dictionary, statistics only on the small columns: FIELD-NOTES measured zstd
    # saving 6% on float16 activations at 2-3x the read cost, and min/max of raw vectors is noise.
    # Every data page carries a CRC32 that read_shard verifies, so a flipped byte fails the read.
    return atomic_write(fs, path, lambda target: pq.write_table(
        table, target, row_group_size=group_rows, compression="none",
        use_dictionary=False, write_statistics=list(META_COLUMNS), write_page_checksum=True), checksum=True)


def shard_path(split: str, index: int) -> str:
    return f"{split}/shard-{index:05d}.parquet"


@contextlib.contextmanager
def shard_errors(shard: Shard, failure: str):
    """Any error inside becomes one CacheError naming the shard: missing, or `failure` (what went
    wrong, e.g. "is corrupt") with the cause. Storage backends and pyarrow raise many types."""
    try:
        yield
    except CacheError:
        raise
    except FileNotFoundError as e:
        raise CacheError(f"shard {shard.path} is missing from the cache") from e
    except Exception as e:  # noqa: BLE001 - see above
        raise CacheError(f"shard {shard.path} {failure}: {type(e).__name__}: {e}") from e


def check_size(fs: fsspec.AbstractFileSystem, path: str, shard: Shard) -> None:
    size = fs.size(path)
    if size != shard.num_bytes:
        raise CacheError(f"shard {shard.path} is corrupt: {size} bytes on storage, manifest says {shard.num_bytes}")


def check_row_groups(metadata: pq.FileMetaData, shard: Shard, group_rows: int) -> list[int]:
    """The rows of each row group, as `shard_groups` lays them out, or CacheError."""
    layout = shard_groups(shard.num_rows, group_rows)
    found = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    if found != layout:
        raise CacheError(f"shard {shard.path} has row groups of {found} rows, the cache's layout is {layout}")
    return layout


def read_shard(
    fs: fsspec.AbstractFileSystem,
    root: str,
    shard: Shard,
    columns: list[str] | None = None,
    row_groups: list[int] | None = None,
    group_rows: int = 0,
) -> pa.Table:
    """Read one committed shard, checking it against the manifest; CacheError names a bad shard.

    With `row_groups` (and the cache's rows per row group, `group_rows`), only those row groups,
    in that order: the file's row groups must be laid out as `shard_groups` says."""
    path = f"{root}/{shard.path}"
    with shard_errors(shard, "is corrupt"):
        check_size(fs, path, shard)
        with contextlib.ExitStack() as stack:
            if is_local(fs):  # pyarrow reads a memory map itself: no Python file object taking the GIL per read
                source, options = path, dict(memory_map=True)
            else:
                source, options = stack.enter_context(fs.open(path, "rb", block_size=ROW_GROUP_BYTES)), dict(pre_buffer=True)
            if row_groups is None:
                table = pq.read_table(source, columns=columns, page_checksum_verification=True, **options)
                expected = shard.num_rows
            else:
                file = pq.ParquetFile(source, page_checksum_verification=True, **options)
                layout = check_row_groups(file.metadata, shard, group_rows)
                table = file.read_row_groups(row_groups, columns=columns)
                expected = sum(layout[g] for g in row_groups)
    if table.num_rows != expected:
        raise CacheError(
            f"shard {shard.path} is corrupt: {table.num_rows} rows, manifest says {expected}"
        )
    return table
