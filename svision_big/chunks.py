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
    return [key for _, key in absent_chunks(arr, sel)]


def absent_chunks(arr, sel: tuple) -> list[tuple[tuple[int, ...], str]]:
    """(coords, key) of the stored chunks ``sel`` touches that do not exist."""
    from zarr.core.sync import sync

    store, prefix = arr.store_path.store, arr.store_path.path
    pairs = list(chunk_coords(arr, sel))
    found = sync(_exist_all(store, [f"{prefix}/{k}" if prefix else k for _, k in pairs]))
    return [p for p, ok in zip(pairs, found) if not ok]


def chunk_region(arr, coords: tuple[int, ...]) -> tuple[slice, ...]:
    """The voxels of the stored chunk (shard, where sharded) at ``coords``."""
    md = arr.metadata
    grid = md.chunk_grid.chunk_shape if getattr(md, "zarr_format", 3) == 3 else md.chunks
    return tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, grid, arr.shape))


def empty_on_coarser_levels(region: tuple[slice, ...], levels: list, fill) -> bool | None:
    """Whether an absent level-0 chunk (``region``) was empty, read from the pyramid above it.

    zarr leaves out chunks equal to the fill value unless told otherwise, so an absent chunk is
    either empty or lost; nothing in the format tells the two apart. The levels above it do: each of
    ``levels`` is (array, per-axis ratio of level 0's shape to its own). The first level whose chunks
    over the region's centre are stored decides: all fill value there, the chunk was empty (True);
    anything else, it held data that is gone (False). The whole region is read: a smoothing pyramid
    spreads a neighbour's data into it, which errs toward a warning, never toward silence (its
    middle half alone let a chunk whose data sat at its edge go lost without a word). Absent on every level above too,
    in a pyramid whose coarsest level stores chunks elsewhere, is empty as well (zarr left the region
    out everywhere); None where there is no level above, or the coarsest stores nothing (a copy
    that stopped before it: nothing can be told)."""
    for arr, ratio in levels:
        box = tuple(
            slice(int(s.start // r), min(n, max(int(s.start // r) + 1, -int(-s.stop // r))))
            for s, r, n in zip(region, ratio, arr.shape)
        )
        if absent_chunks(arr, box):
            continue  # absent there too: look further up
        return _all_fill(np.asarray(arr[box]), fill)
    if levels and levels[-1][0].nchunks_initialized > 0:
        return True
    return None


def _all_fill(v: np.ndarray, fill) -> bool:
    fill = 0 if fill is None else fill
    if isinstance(fill, (float, np.floating)) and np.isnan(fill):
        return bool(np.all(np.isnan(v)))
    return bool(np.all(v == fill))


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
