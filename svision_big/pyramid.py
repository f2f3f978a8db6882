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
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import zarr

from .engine import BlockTask, BlockWork, open_array, run_blocks
from .ngff import NgffFormat, downsampled_transform
from .options import keywords
from .plan import on_axes
from .state import DoneRecords
from .values import cast_output

__all__ = [
    "build_pyramid",
    "build_levels",
    "LevelJob",
    "PyramidOptions",
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


@dataclass(frozen=True)
class PyramidOptions:
    """``build_levels``' and ``build_pyramid``'s parameters after the factors, each declared once:
    the first six may also be passed positionally, in this order (``PYRAMID_POSITIONAL``)."""

    chunks: Sequence[int] = field(metadata={"help": "the level chunks (NGFF order), clipped per level (required)"})
    dtype: Any = field(metadata={"help": "the levels' dtype (required)"})
    method: str = field(default="mean", metadata={"help": "the reduction: mean or max"})
    client: Any = field(default=None, metadata={"help": "a Dask client, or None to run in this process"})
    shards: Sequence[int] | None = field(default=None, metadata={"help": "shard shape (NGFF 0.5), clipped per level"})
    compression: bool = field(default=True, metadata={"help": "compress the level chunks"})
    url: str | None = field(default=None, metadata={"help": "where workers open the group's store"})
    storage_options: dict | None = field(default=None, metadata={"help": "fsspec options of the store"})
    done_url: Callable[[int], str] | None = field(
        default=None, metadata={"help": "where a level's done-records go (None: none kept, no resuming)"}
    )
    progress: bool = field(default=False, metadata={"help": "show a progress bar"})
    on_unit: Callable[[int, int], None] | None = field(
        default=None, metadata={"help": "called with (level, index) as each unit is finished"}
    )
    window: int | None = field(default=None, metadata={"help": "tasks in flight per worker (None: the engine's)"})


PYRAMID_POSITIONAL = ("chunks", "dtype", "method", "client", "shards", "compression")


def _pyramid_options(function: str, args: tuple, options: dict) -> PyramidOptions:
    """``args`` (bound to ``PYRAMID_POSITIONAL``) and ``options`` as ``PyramidOptions``, with the
    TypeErrors Python gives ``function`` with those parameters after its six leading ones."""
    missing = [n for n in PYRAMID_POSITIONAL[:2][len(args) :] if n not in options]
    if missing:
        names = " and ".join(repr(n) for n in missing)
        raise TypeError(
            f"{function}() missing {len(missing)} required positional argument{'s' * (len(missing) > 1)}: {names}"
        )
    return keywords(function, PyramidOptions, options, args, PYRAMID_POSITIONAL, lead=6)


@dataclass(frozen=True)
class _Build:
    """One pyramid build: the group, its format, the axis names, level 0's path, the chunks, the
    number of levels, the options (``dtype`` a numpy dtype), the workers' store url, the group's
    path prefix and this build's token."""

    group: zarr.Group
    fmt: NgffFormat
    names: list[str]
    level0_path: str
    chunks: Sequence[int]
    n_levels: int
    options: PyramidOptions
    url: str | None
    prefix: str
    token: str


def _level_target(b: _Build, path: str, shape, c, sh, keep: bool, records: DoneRecords | None):
    """The level's array: the stored one when ``keep`` and its layout matches (None otherwise, then
    a new array replaces it, its records cleared first). Returns (array, whether it was kept)."""
    o, dtype = b.options, b.options.dtype
    # written in this process (no client) through this handle: every chunk stored, as run_unit's
    with zarr.config.set({"array.write_empty_chunks": True}):  # an array takes it when opened
        target = _existing_level(b.group, b.fmt, path, shape, c, sh, dtype) if keep else None
        if target is None:
            keep = False
            if records is not None:
                records.clear()  # before the array: records never outlive the chunks they describe
            target = b.fmt.create_array(
                b.group, path, shape, c, dtype, b.names, shards=sh, compression=o.compression, overwrite=True
            )
    return target, keep


def _build_level(b: _Build, level: int, prev: tuple[str, tuple], f: tuple[int, ...], keep: bool):
    """Level ``level`` reduced by ``f`` (per axis) from ``prev`` (its path and shape); returns (its
    counts, its shape, whether it was kept)."""
    o = b.options
    prev_path, prev_shape = prev
    shape = tuple(n // fi for n, fi in zip(prev_shape, f))
    if any(n == 0 for n in shape):
        raise ValueError(f"level {level} would be empty: {prev_shape} / {f}")
    c, sh = level_chunks(shape, b.chunks, o.shards)
    path = str(level)
    if path == b.level0_path:
        raise ValueError(f"level path {path!r} collides with level 0")
    records = DoneRecords(o.done_url(level), o.storage_options) if o.done_url is not None else None
    target, keep = _level_target(b, path, shape, c, sh, keep, records)
    job = LevelJob(
        url=b.url,
        options=o.storage_options,
        src_path=b.prefix + prev_path,
        dst_path=b.prefix + path,
        shape=shape,
        factors=f,
        unit=sh if sh is not None else c,
        dtype=o.dtype.str,
        method=o.method,
        done_url=records.url if records is not None else None,
        token=b.token,
    )
    unit = "shards" if sh is not None else "chunks"
    arrays = (b.group[prev_path], target) if o.client is None else None
    task = level_task(job, level, b.n_levels, unit, arrays)
    on_unit = None if o.on_unit is None else partial(o.on_unit, level)
    run = run_blocks(task, o.client, o.progress, on_unit, o.window)
    counts = {"level": level, "units": run["total"], "skipped": run["skipped"], "computed": run["computed"]}
    counts.update(seconds=round(run["seconds"], 3), path=path)
    return counts, shape, keep


def build_levels(
    group: zarr.Group,
    fmt: NgffFormat,
    image_axes: Sequence[dict | str],
    level0_path: str,
    spatial_axes: Sequence[int],
    factors_per_level: Sequence[Sequence[int]],
    *args: Any,
    **options: Any,
) -> list[dict]:
    """Write levels 1..n into ``group``, each reduced from the previous stored level, one task per
    write unit; returns one dict per level (path, units, skipped, computed, seconds).

    The rest are ``PyramidOptions``' fields: ``chunks`` and ``dtype`` (required), ``method``
    ("mean"), ``client``, ``shards``, ``compression`` (True), those six also positionally, then
    ``url``, ``storage_options``, ``done_url``, ``progress``, ``on_unit``, ``window``.

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
    o = _pyramid_options("build_levels", args, options)
    if o.method not in METHODS:
        raise ValueError(f"unknown pyramid method {o.method!r}: use one of {', '.join(METHODS)}")
    o = replace(o, dtype=np.dtype(o.dtype))
    names = [a["name"] if isinstance(a, dict) else str(a) for a in image_axes]
    url = _group_url(group) if o.client is not None and o.url is None else o.url
    prefix = f"{group.path}/" if group.path else ""
    b = _Build(group, fmt, names, level0_path, o.chunks, len(factors_per_level), o, url, prefix, uuid.uuid4().hex[:12])
    keep = o.done_url is not None  # a level is kept only when every level before it was (derived data)
    prev = (level0_path, tuple(group[level0_path].shape))
    out: list[dict] = []
    for level, factors in enumerate(factors_per_level, start=1):
        f = _full_factors(factors, len(names), spatial_axes)
        counts, shape, keep = _build_level(b, level, prev, f, keep)
        out.append(counts)
        prev = (counts["path"], shape)
    return out


def build_pyramid(
    group: zarr.Group,
    fmt: NgffFormat,
    image_axes: Sequence[dict | str],
    level0_path: str,
    spatial_axes: Sequence[int],
    factors_per_level: Sequence[Sequence[int]],
    *args: Any,
    **options: Any,
) -> list[str]:
    """:func:`build_levels` (the same options), returning the created paths ("1", "2", ...)."""
    _pyramid_options("build_pyramid", args, options)  # its own name in a TypeError
    levels = build_levels(group, fmt, image_axes, level0_path, spatial_axes, factors_per_level, *args, **options)
    return [q["path"] for q in levels]
