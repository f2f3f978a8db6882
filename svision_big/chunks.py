"""Which stored chunks a region touches, which of them exist, and which cannot be decoded.

zarr reads an absent chunk as the fill value and reports a damaged one as its codec's error
("error during blosc decompression: -1"), naming neither the array nor the chunk. Every read of
an input goes through here, so a damaged or absent chunk is named wherever it is met: in a
block (``execute``) or in the checks before any compute (``pipeline``).
"""

from __future__ import annotations

import itertools
from types import EllipsisType

import numpy as np

from .ngff import NgffError


def chunk_coords(arr, sel: tuple):
    """The stored chunks (shards, where sharded) a selection touches: (coords, key) pairs."""
    md = arr.metadata
    grid = md.chunk_grid.chunk_shape if getattr(md, "zarr_format", 3) == 3 else md.chunks
    ranges = []
    for s, c, n in zip(sel, grid, arr.shape):
        if isinstance(s, slice):
            lo, hi, _ = s.indices(n)
            ranges.append(range(lo // c, max(lo, hi - 1) // c + 1))
        else:
            ranges.append(range(int(s) // c, int(s) // c + 1))
    for coords in itertools.product(*ranges):
        yield coords, md.encode_chunk_key(coords)


def bad_chunk(arr, sel: tuple) -> str | None:
    """The key of the first chunk in ``sel`` that fails to read on its own (the error path only)."""
    md = arr.metadata
    grid = md.chunk_grid.chunk_shape if getattr(md, "zarr_format", 3) == 3 else md.chunks
    for coords, key in chunk_coords(arr, sel):
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, grid, arr.shape))
        try:
            arr[region]
        except Exception:  # noqa: BLE001
            return key
    return None


def missing_chunks(arr, sel: tuple) -> list[str]:
    """Keys of the stored chunks ``sel`` touches that do not exist (zarr reads them as the fill value)."""
    from zarr.core.sync import sync

    store, prefix = arr.store_path.store, arr.store_path.path
    keys = [key for _, key in chunk_coords(arr, sel)]
    found = sync(_exist_all(store, [f"{prefix}/{k}" if prefix else k for k in keys]))
    return [k for k, ok in zip(keys, found) if not ok]


async def _exist_all(store, keys: list[str]) -> list[bool]:
    import asyncio

    return list(await asyncio.gather(*(store.exists(k) for k in keys)))


def read_region(arr, sel: tuple | EllipsisType, where: str) -> np.ndarray:
    """``arr[sel]`` as an array; a chunk that cannot be decoded stops with one line naming
    ``where`` and the chunk (the checks before compute met it as "error during blosc
    decompression: -1", nothing else)."""
    try:
        return np.asarray(arr[sel])
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - every store and codec has its own errors
        full = sel if isinstance(sel, tuple) else tuple(slice(None) for _ in arr.shape)
        key = bad_chunk(arr, full)
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        what = f"chunk {key}" if key else "a chunk"
        raise NgffError(f"{where}: {what} cannot be read ({cause}): repair or replace it, then re-run") from None
