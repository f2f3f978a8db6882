"""TIFF / numpy -> OME-Zarr pyramid (NGFF 0.4 or 0.5).

Data is streamed block by block (a memory map for uncompressed TIFFs,
tifffile's zarr view of the pages otherwise), the pyramid is built from the
stored level 0, and the OME metadata is written last so that an interrupted
conversion never looks like a valid image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np

from .ngff import (
    NgffError,
    format_for,
    multiscales_metadata,
    open_output_group,
    remove_store,
    store_exists,
)
from .pyramid import build_pyramid, level_chunks, pyramid_datasets, pyramid_factors

__all__ = ["convert_tiff", "write_ome_zarr", "default_chunks", "axes_metadata", "omero_metadata"]

CANONICAL_AXES = "tczyx"
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
# tifffile's axis letters that have an unambiguous NGFF meaning (S = samples, e.g. RGB).
_TIFF_AXES = {"T": "t", "C": "c", "Z": "z", "Y": "y", "X": "x", "S": "c"}
_INFERRED_AXES = {2: "yx", 3: "zyx", 4: "czyx", 5: "tczyx"}
_COLORS = ("00FF00", "FF00FF", "00FFFF", "FF0000", "0000FF", "FFFF00", "FFFFFF")


def _parse_axes(axes: str, ndim: int) -> str:
    """Validate an axes string (any order of t, c, z, y, x) for an ``ndim`` array."""
    axes = axes.lower()
    if len(axes) != ndim:
        raise ValueError(f"axes '{axes}' has {len(axes)} letters for a {ndim}D image")
    if len(set(axes)) != len(axes) or not set(axes) <= set(CANONICAL_AXES):
        raise ValueError(f"axes '{axes}' must be distinct letters from '{CANONICAL_AXES}'")
    if "y" not in axes or "x" not in axes:
        raise ValueError(f"axes '{axes}' must include y and x")
    return axes


def _canonical(axes: str) -> str:
    """NGFF order: time, channel, then space (z, y, x)."""
    return "".join(a for a in CANONICAL_AXES if a in axes)


def axes_metadata(axes: str, unit: str | None = "micrometer") -> list[dict]:
    """NGFF ``axes`` entries for canonical axis letters; spatial axes get ``unit``."""
    out = []
    for a in axes:
        entry = {"name": a, "type": _AXIS_TYPES[a]}
        if entry["type"] == "space" and unit:
            entry["unit"] = unit
        out.append(entry)
    return out


def default_chunks(shape: Sequence[int], axes: str) -> tuple[int, ...]:
    """About 4 Mi voxels per chunk: 64x256x256 in 3D, 1024x1024 in 2D, 1 along t/c."""
    spatial = [a for a in axes if _AXIS_TYPES[a] == "space"]
    per_axis = {"z": 64, "y": 256, "x": 256} if len(spatial) == 3 else {"z": 1024, "y": 1024, "x": 1024}
    return tuple(
        max(1, min(n, per_axis[a] if _AXIS_TYPES[a] == "space" else 1)) for n, a in zip(shape, axes)
    )


def _resolve_chunks(chunks: int | Sequence[int] | None, shape: Sequence[int], axes: str) -> tuple[int, ...]:
    if chunks is None:
        return default_chunks(shape, axes)
    if isinstance(chunks, (int, np.integer)):
        chunks = [int(chunks) if _AXIS_TYPES[a] == "space" else 1 for a in axes]
    chunks = [int(c) for c in chunks]
    spatial = [i for i, a in enumerate(axes) if _AXIS_TYPES[a] == "space"]
    if len(chunks) == len(spatial) and len(spatial) != len(axes):
        full = [1] * len(axes)
        for i, c in zip(spatial, chunks):
            full[i] = c
        chunks = full
    if len(chunks) != len(axes) or any(c < 1 for c in chunks):
        raise ValueError(f"chunks {tuple(chunks)} do not fit axes '{axes}'")
    return tuple(min(c, n) for c, n in zip(chunks, shape))


def omero_metadata(data: np.ndarray, axes: str, dtype: np.dtype) -> dict:
    """``omero`` rendering hints, one channel per ``c``; window from the 0.1/99.9 percentiles.

    ``data`` should be a small (coarse) level: the window is a global display
    range, not worth reading level 0 for.
    """
    dtype = np.dtype(dtype)
    data = np.asarray(data)
    if "c" in axes:
        c = axes.index("c")
        per_channel = [np.take(data, i, axis=c) for i in range(data.shape[c])]
    else:
        per_channel = [data]
    channels = []
    for i, d in enumerate(per_channel):
        d = d[np.isfinite(d)] if np.issubdtype(d.dtype, np.floating) else d.ravel()
        if d.size:
            lo, hi = (float(v) for v in np.percentile(d, [0.1, 99.9]))
            dmin, dmax = float(d.min()), float(d.max())
        else:
            lo = hi = dmin = dmax = 0.0
        if np.issubdtype(dtype, np.integer):
            dmin, dmax = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
        if hi <= lo:
            hi = lo + 1.0
        channels.append(
            {
                "label": f"ch{i}",
                "color": "FFFFFF" if len(per_channel) == 1 else _COLORS[i % len(_COLORS)],
                "active": True,
                "coefficient": 1.0,
                "family": "linear",
                "inverted": False,
                "window": {"min": dmin, "max": dmax, "start": lo, "end": hi},
            }
        )
    return {
        "channels": channels,
        "rdefs": {"model": "greyscale" if len(channels) == 1 else "color"},
    }


def _prepare_output(out_url: str, storage_options: dict | None, overwrite: bool) -> None:
    if store_exists(out_url, storage_options):
        if not overwrite:
            raise NgffError(f"{out_url} already exists: pass --overwrite to replace it")
        remove_store(out_url, storage_options)


def _write_image(
    src: da.Array,
    src_axes: str,
    out_url: str,
    voxel_size: Sequence[float] | None,
    unit: str,
    ngff: str,
    chunks: int | Sequence[int] | None,
    overwrite: bool,
    name: str | None,
    storage_options: dict | None,
    shards: Sequence[int] | None,
) -> str:
    """Common path: store level 0, build the pyramid, then write metadata."""
    out_url = os.fspath(out_url)
    fmt = format_for(ngff)
    axes = _canonical(src_axes)
    arr = da.transpose(src, [src_axes.index(a) for a in axes])
    spatial = [i for i, a in enumerate(axes) if _AXIS_TYPES[a] == "space"]
    if voxel_size is None:
        voxel_size = [1.0] * len(spatial)
    voxel_size = [float(v) for v in np.atleast_1d(voxel_size)]
    if len(voxel_size) != len(spatial) or any(not v > 0 for v in voxel_size):
        raise ValueError(
            f"voxel_size needs {len(spatial)} positive values (order "
            f"{''.join(axes[i] for i in spatial)}), got {tuple(voxel_size)}"
        )
    if shards is not None and fmt.zarr_format == 2:
        raise NgffError("sharding needs NGFF 0.5 (zarr v3); NGFF 0.4 cannot shard")
    c = _resolve_chunks(chunks, arr.shape, axes)
    c, sh = level_chunks(arr.shape, c, shards)

    _prepare_output(out_url, storage_options, overwrite)
    group = open_output_group(out_url, fmt, storage_options, mode="w-")
    level0 = fmt.create_array(group, "0", arr.shape, c, arr.dtype, list(axes), shards=sh)
    write = sh if sh is not None else c
    # Threads: the source (numpy, memmap, open TIFF) lives in this process only.
    da.store(arr.rechunk(write), level0, lock=False, scheduler="threads")

    factors = pyramid_factors(arr.shape, spatial)
    paths = build_pyramid(
        group, fmt, list(axes), "0", spatial, factors, c, arr.dtype, method="mean", shards=shards
    )
    coarsest = group[paths[-1] if paths else "0"]
    if "t" in axes and coarsest.shape[0] > 8:  # display window: a few time points suffice
        coarsest = coarsest.get_orthogonal_selection(
            np.unique(np.linspace(0, coarsest.shape[0] - 1, 8).astype(int))
        )
    else:
        coarsest = coarsest[...]

    scale0 = [1.0] * len(axes)
    for i, v in zip(spatial, voxel_size):
        scale0[i] = v
    datasets = pyramid_datasets(scale0, [0.0] * len(axes), spatial, factors, paths)
    ome = multiscales_metadata(
        axes_metadata(axes, unit),
        datasets,
        name=name,
        version=fmt.version,
        extra={"type": "mean", "metadata": {"method": "block mean", "software": "svision_big"}},
    )
    ome["omero"] = omero_metadata(coarsest, axes, arr.dtype)
    fmt.write_ome_attrs(group, ome)  # last: the image is only valid once complete
    return out_url


def write_ome_zarr(
    array: np.ndarray,
    out_url: str | os.PathLike,
    axes: str = "zyx",
    voxel_size: Sequence[float] | None = None,
    unit: str = "micrometer",
    ngff: str = "0.5",
    chunks: int | Sequence[int] | None = None,
    overwrite: bool = False,
    name: str | None = None,
    storage_options: dict | None = None,
    shards: Sequence[int] | None = None,
) -> str:
    """Write an in-memory array as an OME-Zarr pyramid; returns ``out_url``.

    ``axes`` names the array's dimensions in its own order (any order of
    t, c, z, y, x); data is stored in NGFF order (t, c, z, y, x).
    ``voxel_size`` is per spatial axis in z, y, x order (default 1.0);
    ``chunks`` (and ``shards``, NGFF 0.5 only) are in NGFF order.
    """
    array = np.asarray(array)
    axes = _parse_axes(axes, array.ndim)
    src = da.from_array(array, chunks=array.shape if array.size else -1)
    return _write_image(
        src, axes, os.fspath(out_url), voxel_size, unit, ngff, chunks, overwrite, name,
        storage_options, shards,
    )


def _tiff_axes(series: Any) -> str:
    """NGFF letters for a tifffile series, falling back to inference by ndim."""
    letters = series.axes.upper()
    if all(a in _TIFF_AXES for a in letters):
        axes = "".join(_TIFF_AXES[a] for a in letters)
        if len(set(axes)) == len(axes):
            return axes
    ndim = len(series.shape)
    if ndim not in _INFERRED_AXES:
        raise NgffError(
            f"cannot interpret TIFF axes '{series.axes}' (shape {tuple(series.shape)}): pass --axes"
        )
    return _INFERRED_AXES[ndim]


def convert_tiff(
    tiff_path: str | os.PathLike,
    out_url: str | os.PathLike,
    voxel_size: Sequence[float] | None = None,
    unit: str = "micrometer",
    ngff: str = "0.5",
    chunks: int | Sequence[int] | None = None,
    overwrite: bool = False,
    axes: str | None = None,
    storage_options: dict | None = None,
    shards: Sequence[int] | None = None,
    name: str | None = None,
) -> str:
    """Convert the first series of a TIFF to an OME-Zarr pyramid; returns ``out_url``.

    Axes come from tifffile's series axes (T, C, Z, Y, X; S samples become
    channels), else from the number of dimensions (yx, zyx, czyx, tczyx);
    ``axes`` overrides both, in the TIFF's dimension order. The TIFF is
    never loaded whole: uncompressed data is memory-mapped, compressed data is
    read in slabs of whole planes through tifffile's zarr interface.
    """
    import tifffile
    import zarr

    path = os.fspath(tiff_path)
    if not os.path.isfile(path):
        raise NgffError(f"{path} does not exist" if not os.path.exists(path) else f"{path} is not a file")
    format_for(ngff)  # fail fast on a bad version, before touching anything
    try:
        tf = tifffile.TiffFile(path)
    except Exception as e:  # tifffile raises several types for non-TIFF input
        raise NgffError(f"{path} is not a readable TIFF file: {e}") from None
    with tf:
        if not tf.series:
            raise NgffError(f"{path} has no image series")
        series = tf.series[0]
        src_axes = _parse_axes(axes, len(series.shape)) if axes else _tiff_axes(series)
        canon = _canonical(src_axes)
        canon_shape = tuple(series.shape[src_axes.index(a)] for a in canon)
        c = _resolve_chunks(chunks, canon_shape, canon)
        write = dict(zip(canon, level_chunks(canon_shape, c, shards)[1] or c))
        if series.dataoffset is not None:
            # Contiguous and uncompressed: any block can be read directly.
            source = tifffile.memmap(path, mode="r", series=0)
            src_chunks = tuple(write[a] for a in src_axes)
            lock = False
        else:
            # Pages are decoded whole: take whole planes, a write-chunk deep.
            source = zarr.open(series.aszarr(), mode="r")
            inplane = src_axes.index("y")  # y, x and samples live inside a page
            src_chunks = tuple(
                n if i >= inplane else write[a] for i, (n, a) in enumerate(zip(series.shape, src_axes))
            )
            lock = True  # one file handle: serialise reads
        src = da.from_array(source, chunks=src_chunks, lock=lock, asarray=True)
        if name is None:
            name = os.path.basename(path).split(".")[0]
        return _write_image(
            src, src_axes, os.fspath(out_url), voxel_size, unit, ngff, chunks, overwrite, name,
            storage_options, shards,
        )
