"""Multiscale pyramid built write unit by write unit from a stored level 0.

Each level is computed from the previous *stored* level, so the pyramid always agrees with what
is on disk. A level is a block task of the block engine (``engine``), as a pass of level 0 is:
one task per write unit of the level (a chunk, or a shard when sharded), computed from its index,
submitted windowed (a few tasks per worker in flight), so the scheduler holds a few tasks however
large the level is; each task reads the matching region of the previous level, reduces it and
writes exactly its unit (no two tasks touch one chunk or shard, which zarr v3 sharding requires),
then leaves a done-record when the caller keeps them: a killed pyramid resumes where it stopped.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import zarr

from .engine import BlockTask, BlockWork, open_array, run_blocks
from .ngff import NgffFormat, downsampled_transform
from .plan import on_axes
from .state import DoneRecords
from .values import cast_output

__all__ = [
    "build_pyramid",
    "build_levels",
    "LevelJob",
    "reduce_block",
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


def reduce_block(block: np.ndarray, factors: Sequence[int], method: str, dtype: Any) -> np.ndarray:
    """One write unit of a level from its source region (a whole number of cells per axis): the
    mean in float64 (or the max) of each cell of ``factors`` voxels, then the level's cast. The
    same arithmetic, in the same order, as dask's ``coarsen`` on the same block."""
    shape = tuple(x for n, f in zip(block.shape, factors) for x in (n // f, f))
    cells = block.reshape(shape)
    axes = tuple(range(1, 2 * block.ndim, 2))
    red = np.mean(cells, axis=axes, dtype=np.float64) if method == "mean" else np.max(cells, axis=axes)
    return _cast(red, np.dtype(dtype))


@dataclass(frozen=True)
class LevelJob:
    """Everything a task of one pyramid level needs besides its unit index: where the previous
    stored level and this level are, their shapes, the factors and the reduction. No data; a
    unit's regions are computed from its index (units in C order over the level's unit grid)."""

    url: str | None  # the group's store, for workers (None: in-process, arrays passed directly)
    options: dict | None
    src_path: str
    dst_path: str
    shape: tuple[int, ...]  # this level's shape
    factors: tuple[int, ...]  # per axis, relative to the previous level
    unit: tuple[int, ...]  # the write unit: the level's chunk, or its shard
    dtype: str
    method: str
    done_url: str | None  # where the units' done-records go (None: none kept)
    token: str  # this build's id: a worker's cache of open arrays never serves a recreated array

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-n // u) for n, u in zip(self.shape, self.unit))

    def __len__(self) -> int:
        return math.prod(self.grid)

    def regions(self, index: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """(the unit in this level, the region of the previous level it is reduced from)."""
        if not 0 <= index < len(self):
            raise IndexError(f"unit {index} of a level of {len(self)} units")
        coords = np.unravel_index(index, self.grid)
        dst = tuple(slice(int(c) * u, min((int(c) + 1) * u, n)) for c, u, n in zip(coords, self.unit, self.shape))
        return dst, tuple(slice(d.start * f, d.stop * f) for d, f in zip(dst, self.factors))


def write_unit(src, dst, job: LevelJob, index: int) -> int:
    """Reduce one unit from the stored previous level ``src`` into ``dst``; returns its voxels."""
    out_sel, in_sel = job.regions(index)
    y = reduce_block(np.asarray(src[in_sel]), job.factors, job.method, job.dtype)
    dst[out_sel] = y
    return int(y.size)


def run_unit(job: LevelJob, index: int) -> tuple[int, None]:
    """The level task's process on a worker: open both levels (once per process) and write the
    unit; returns (its voxels, no note). The engine records it done."""
    src = open_array(job.url, job.src_path, job.options, writable=False, run=job.token)
    dst = open_array(job.url, job.dst_path, job.options, writable=True, run=job.token, image=True)
    return write_unit(src, dst, job, index), None


def level_task(job: LevelJob, level: int, n_levels: int, unit: str, arrays: tuple | None = None) -> BlockTask:
    """Level ``level`` of ``n_levels`` as a block task for the engine (``unit``: "chunks" or
    "shards"). ``arrays``: the (previous level, this level) handles to write through in this
    process (no cluster)."""
    if arrays is None:
        process: Callable[..., tuple[int, None]] = run_unit
    else:

        def process(job: LevelJob, index: int) -> tuple[int, None]:
            return write_unit(arrays[0], arrays[1], job, index), None

    return BlockTask(
        work=BlockWork(process, job, job.done_url, job.options),
        blocks=len(job),
        label=f"pyramid level {level}/{n_levels}",
        key=f"svb-pyramid-{job.token}-l{level}",
        unit=unit,
        rate_scale=math.prod(job.unit),
        rate_unit="level voxels/s (approx)",
        place=f"pyramid level {level}: ",
    )


def _group_url(group: zarr.Group) -> str:
    """Where a group lives, for workers to open it: only a local store says so by itself."""
    from zarr.storage import LocalStore

    if isinstance(group.store, LocalStore):
        return str(group.store.root)
    raise ValueError("build_pyramid on a cluster needs url= (where workers open the group's store)")


def _existing_level(group: zarr.Group, fmt: NgffFormat, path: str, shape, chunks, shards, dtype) -> Any:
    """The level array already stored at ``path`` when it has exactly this layout, else None."""
    try:
        arr = group[path]
    except (KeyError, FileNotFoundError, ValueError):
        return None
    if not isinstance(arr, zarr.Array):
        return None
    same = (
        arr.metadata.zarr_format == fmt.zarr_format
        and tuple(arr.shape) == tuple(shape)
        and tuple(arr.chunks) == tuple(chunks)
        and (tuple(arr.shards) if arr.shards else None) == (tuple(shards) if shards else None)
        and arr.dtype == np.dtype(dtype)
    )
    return arr if same else None


def build_levels(
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
    *,
    url: str | None = None,
    storage_options: dict | None = None,
    done_url: Callable[[int], str] | None = None,
    progress: bool = False,
    on_unit: Callable[[int, int], None] | None = None,
    window: int | None = None,
) -> list[dict]:
    """Write levels 1..n into ``group``, each reduced from the previous stored level, one task per
    write unit; returns one dict per level (path, units, skipped, computed, seconds).

    ``factors_per_level`` holds per-level factors (per spatial axis, or per axis), e.g. from
    :func:`pyramid_factors`. Odd sizes are floored (the excess voxel is dropped), which keeps
    :func:`downsampled_transform`'s block-centre translation exact. Integer data is rounded and
    clipped. ``client``: a Dask client (tasks windowed on its workers, which open the group at
    ``url``, with ``storage_options``), or None to run in this process.

    ``done_url(level)``: where that level's done-records go. With it the pyramid resumes: an
    existing level array of the same layout is kept (its chunks are work done) and units already
    recorded are not recomputed. Without it, existing arrays at the level paths are replaced
    (levels are derived data) and every unit is computed. Metadata is left to the caller, who
    writes it last. ``on_unit(level, index)`` is called as each unit is finished.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pyramid method {method!r}: use one of {', '.join(METHODS)}")
    dtype = np.dtype(dtype)
    names = [a["name"] if isinstance(a, dict) else str(a) for a in image_axes]
    ndim = len(names)
    if client is not None and url is None:
        url = _group_url(group)
    prefix = f"{group.path}/" if group.path else ""
    token = uuid.uuid4().hex[:12]
    keep = done_url is not None  # a level is kept only when every level before it was (derived data)
    prev_path, prev_shape = level0_path, tuple(group[level0_path].shape)
    out: list[dict] = []
    for level, factors in enumerate(factors_per_level, start=1):
        f = _full_factors(factors, ndim, spatial_axes)
        shape = tuple(n // fi for n, fi in zip(prev_shape, f))
        if any(n == 0 for n in shape):
            raise ValueError(f"level {level} would be empty: {prev_shape} / {f}")
        c, sh = level_chunks(shape, chunks, shards)
        path = str(level)
        if path == level0_path:
            raise ValueError(f"level path {path!r} collides with level 0")
        records = DoneRecords(done_url(level), storage_options) if done_url is not None else None
        # written in this process (no client) through this handle: every chunk stored, as run_unit's
        with zarr.config.set({"array.write_empty_chunks": True}):  # an array takes it when opened
            target = _existing_level(group, fmt, path, shape, c, sh, dtype) if keep else None
            if target is None:
                keep = False
                if records is not None:
                    records.clear()  # before the array: records never outlive the chunks they describe
                target = fmt.create_array(
                    group, path, shape, c, dtype, names, shards=sh, compression=compression, overwrite=True
                )
        job = LevelJob(
            url=url,
            options=storage_options,
            src_path=prefix + prev_path,
            dst_path=prefix + path,
            shape=shape,
            factors=f,
            unit=sh if sh is not None else c,
            dtype=dtype.str,
            method=method,
            done_url=records.url if records is not None else None,
            token=token,
        )
        unit = "shards" if sh is not None else "chunks"
        arrays = (group[prev_path], target) if client is None else None
        task = level_task(job, level, len(factors_per_level), unit, arrays)
        run = run_blocks(task, client, progress, None if on_unit is None else partial(on_unit, level), window)
        out.append({"level": level, "units": run["total"], "skipped": run["skipped"], "computed": run["computed"]})
        out[-1].update(seconds=round(run["seconds"], 3), path=path)
        prev_path, prev_shape = path, shape
    return out


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
    **kwargs,
) -> list[str]:
    """:func:`build_levels`, returning the created paths ("1", "2", ...)."""
    levels = build_levels(
        group,
        fmt,
        image_axes,
        level0_path,
        spatial_axes,
        factors_per_level,
        chunks,
        dtype,
        method,
        client,
        shards,
        compression,
        **kwargs,
    )
    return [q["path"] for q in levels]
