"""Multiscale pyramid built chunk by chunk from a stored level 0.

Each level is computed from the previous *stored* level with dask, so the
pyramid always agrees with what is on disk (never with some other in-memory
copy), memory per task depends only on the chunk size, and every task writes
whole chunks (or whole shards) of its target: no two tasks touch the same
chunk, which zarr v3 sharding requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import zarr

from .ngff import NgffFormat, downsampled_transform
from .plan import on_axes
from .values import cast_output

__all__ = [
    "build_pyramid",
    "pyramid_factors",
    "cumulative_factors",
    "pyramid_datasets",
    "level_chunks",
    "METHODS",
]

METHODS = ("mean", "max")


def _per_spatial(value: int | Sequence[int], shape: Sequence[int], spatial_axes: Sequence[int]) -> list[int]:
    """An int, a per-spatial-axis tuple, or a full-ndim tuple -> per spatial axis."""
    if isinstance(value, (int, np.integer)):
        return [int(value)] * len(spatial_axes)
    value = [int(v) for v in value]
    if len(value) == len(spatial_axes):
        return value
    if len(value) == len(shape):
        return [value[a] for a in spatial_axes]
    raise ValueError(f"expected {len(spatial_axes)} (spatial) or {len(shape)} (all axes) values, got {len(value)}")


def pyramid_factors(
    shape: Sequence[int],
    spatial_axes: Sequence[int],
    min_shape: int | Sequence[int] = 64,
    until_shape: Sequence[int] | None = None,
) -> list[tuple[int, ...]]:
    """Per-level downsampling factors (relative to the previous level), one value per spatial axis.

    An axis is halved while it is larger than both its ``min_shape`` and its
    ``until_shape`` (e.g. the input's coarsest level, so an upscaled output's
    pyramid reaches at least as coarse as its input's). A thin axis (often
    z) thus stops halving earlier than the others. ``min_shape`` and
    ``until_shape`` are an int or a tuple over the spatial axes or over all axes.
    """
    sizes = [int(shape[a]) for a in spatial_axes]
    mins = _per_spatial(min_shape, shape, spatial_axes)
    if any(m < 1 for m in mins):
        raise ValueError("min_shape must be >= 1")
    thresholds = mins
    if until_shape is not None:
        untils = _per_spatial(until_shape, shape, spatial_axes)
        thresholds = [max(1, min(m, u)) for m, u in zip(mins, untils)]
    factors: list[tuple[int, ...]] = []
    while True:
        f = tuple(2 if s > th else 1 for s, th in zip(sizes, thresholds))
        if all(x == 1 for x in f):
            return factors
        factors.append(f)
        sizes = [s // x for s, x in zip(sizes, f)]


def _full_factors(factors: Sequence[int], ndim: int, spatial_axes: Sequence[int]) -> tuple[int, ...]:
    """Factors given per spatial axis (or already per axis) -> one per axis."""
    factors = [int(f) for f in factors]
    if len(factors) == ndim:
        full = factors
    elif len(factors) == len(spatial_axes):
        full = on_axes([1] * ndim, spatial_axes, factors)
    else:
        raise ValueError(f"{len(factors)} factors for {ndim} axes ({len(spatial_axes)} spatial)")
    if any(f < 1 for f in full) or any(full[a] != 1 for a in range(ndim) if a not in spatial_axes):
        raise ValueError(f"bad factors {tuple(full)}: >= 1, and 1 on non-spatial axes")
    return tuple(full)


def cumulative_factors(
    factors_per_level: Sequence[Sequence[int]], ndim: int, spatial_axes: Sequence[int]
) -> list[tuple[int, ...]]:
    """Cumulative factor from level 0 for levels 1..n, one value per axis."""
    out, d = [], [1] * ndim
    for f in factors_per_level:
        d = [a * b for a, b in zip(d, _full_factors(f, ndim, spatial_axes))]
        out.append(tuple(d))
    return out


def pyramid_datasets(
    scale0: Sequence[float],
    translation0: Sequence[float],
    spatial_axes: Sequence[int],
    factors_per_level: Sequence[Sequence[int]],
    paths: Sequence[str] | None = None,
    level0_path: str = "0",
) -> list[tuple[str, list[float], list[float]]]:
    """``(path, scale, translation)`` for level 0 and each built level, ready for
    :func:`svision_big.ngff.multiscales_metadata`."""
    ndim = len(scale0)
    if paths is None:
        paths = [str(i) for i in range(1, len(factors_per_level) + 1)]
    out = [(level0_path, [float(s) for s in scale0], [float(t) for t in translation0])]
    for path, d in zip(paths, cumulative_factors(factors_per_level, ndim, spatial_axes)):
        s, t = downsampled_transform(scale0, translation0, d)
        out.append((path, s, t))
    return out


def level_chunks(
    shape: Sequence[int], chunks: Sequence[int], shards: Sequence[int] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Clip chunks (and shards) to a level's shape, keeping shards a multiple of chunks."""
    c = tuple(max(1, min(int(ci), int(n))) for ci, n in zip(chunks, shape))
    if shards is None:
        return c, None
    for s, ci in zip(shards, chunks):
        if int(s) % int(ci):
            raise ValueError(f"shards {tuple(shards)} must be a multiple of chunks {tuple(chunks)}")
    sh = tuple(
        min(int(s), -(-max(int(n), 1) // cc) * cc) if cc == int(ci) else cc
        for s, ci, cc, n in zip(shards, chunks, c, shape)
    )
    return c, sh


def _cast(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A reduced block in the level's dtype: the output's casting rule, and a mask's mean
    thresholded at one half."""
    if dtype == np.bool_:
        return block >= 0.5
    return cast_output(block, dtype)


def build_pyramid(
    group: zarr.Group,
    fmt: NgffFormat,
    image_axes: Sequence[dict | str],
    level0_path: str,
    spatial_axes: Sequence[int],
    factors_per_level: Sequence[Sequence[int]],
    chunks: Sequence[int],
    dtype: Any,
    method: str = "mean",
    client: Any = None,
    shards: Sequence[int] | None = None,
    compression: bool = True,
) -> list[str]:
    """Write levels 1..n into ``group``, each block-reduced from the previous stored level.

    ``factors_per_level`` holds per-level factors (per spatial axis, or per
    axis), e.g. from :func:`pyramid_factors`. Odd sizes are floored (the
    excess voxel is dropped), which keeps :func:`downsampled_transform`'s
    block-centre translation exact. Integer data is rounded and clipped.
    Existing arrays at the level paths are replaced: levels are derived data.
    Returns the created paths ("1", "2", ...). Metadata is left to the caller,
    who writes it last.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pyramid method {method!r}: use one of {', '.join(METHODS)}")
    dtype = np.dtype(dtype)
    names = [a["name"] if isinstance(a, dict) else str(a) for a in image_axes]
    ndim = len(names)
    reduction = np.mean if method == "mean" else np.max
    paths: list[str] = []
    prev = group[level0_path]
    for level, factors in enumerate(factors_per_level, start=1):
        f = _full_factors(factors, ndim, spatial_axes)
        shape = tuple(n // fi for n, fi in zip(prev.shape, f))
        if any(n == 0 for n in shape):
            raise ValueError(f"level {level} would be empty: {tuple(prev.shape)} / {f}")
        c, sh = level_chunks(shape, chunks, shards)
        path = str(level)
        if path == level0_path:
            raise ValueError(f"level path {path!r} collides with level 0")
        target = fmt.create_array(
            group, path, shape, c, dtype, names, shards=sh, compression=compression, overwrite=True
        )
        write = sh if sh is not None else c
        # One source block per target write unit: each task reads write*f voxels
        # and produces exactly one whole chunk/shard of the target.
        src = da.from_zarr(prev, chunks=tuple(w * fi for w, fi in zip(write, f)))
        src = src[tuple(slice(0, n * fi) for n, fi in zip(shape, f))]
        axes = {i: fi for i, fi in enumerate(f) if fi > 1}
        kwargs = {"dtype": np.float64} if method == "mean" else {}
        red = da.coarsen(reduction, src, axes, trim_excess=True, **kwargs)
        out = red.map_blocks(_cast, dtype, dtype=dtype).rechunk(write)
        stored = da.store(out, target, lock=False, compute=False)
        if client is not None:
            client.compute(stored).result()
        else:
            stored.compute()
        paths.append(path)
        prev = target
    return paths
