"""TIFF / numpy -> OME-Zarr pyramid (NGFF 0.4 or 0.5).

Data is streamed block by block (a memory map for uncompressed TIFFs,
tifffile's zarr view of the pages otherwise), the pyramid is built from the
stored level 0, and the OME metadata is written last so that an interrupted
conversion never looks like a valid image.

The TIFF's own metadata is kept: OME-XML (PhysicalSizeZ/Y/X and their units, channel names and
colours, the image name) and ImageJ hyperstacks (``spacing``, ``unit``, the X/Y resolution tags,
display ranges), read by ``tiffmeta``. Units become NGFF names ("nm" -> "nanometer"). Explicit arguments
override it. The options of ``write_ome_zarr`` and ``convert_tiff`` are declared once, in ``ImageOptions``
(``ArrayOptions``, ``TiffOptions``).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import dask.array as da
import numpy as np
import zarr

from .ngff.format import DEFAULT_VERSION, format_for
from .ngff.image import open_image
from .ngff.transforms import multiscales_metadata
from .ngff.viewer import ngff_unit
from .ngff.viewer import omero_metadata as _omero
from .options import keywords
from .progress import decision
from .pyramid import build_pyramid, level_chunks, pyramid_datasets, pyramid_factors
from .store import NgffError, is_remote, open_output_group, remove_store, store_exists, without_file_scheme
from .tiffmeta import TiffMetadata, tiff_metadata

__all__ = [
    "convert_tiff",
    "write_ome_zarr",
    "default_chunks",
    "axes_metadata",
    "omero_metadata",
    "tiff_metadata",
    "TiffMetadata",
    "is_tiff",
    "as_ome_zarr",
    "ImageOptions",
    "ArrayOptions",
    "TiffOptions",
]

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


def axes_metadata(axes: str, unit: str | dict | None = "micrometer") -> list[dict]:
    """NGFF ``axes`` entries for canonical axis letters; spatial axes get ``unit`` (one name, or
    a dict axis letter -> unit), in its NGFF spelling."""
    out = []
    for a in axes:
        entry = {"name": a, "type": _AXIS_TYPES[a]}
        u = unit.get(a) if isinstance(unit, dict) else unit
        if entry["type"] == "space" and u:
            entry["unit"] = ngff_unit(u)
        out.append(entry)
    return out


def default_chunks(shape: Sequence[int], axes: str) -> tuple[int, ...]:
    """About 4 Mi voxels per chunk: 64x256x256 in 3D, 1024x1024 in 2D, 1 along t/c."""
    spatial = [a for a in axes if _AXIS_TYPES[a] == "space"]
    per_axis = {"z": 64, "y": 256, "x": 256} if len(spatial) == 3 else {"z": 1024, "y": 1024, "x": 1024}
    return tuple(max(1, min(n, per_axis[a] if _AXIS_TYPES[a] == "space" else 1)) for n, a in zip(shape, axes))


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


def omero_metadata(
    data: np.ndarray,
    axes: str,
    dtype: np.dtype,
    version: str = DEFAULT_VERSION,
    labels: Sequence[str] | None = None,
    colors: Sequence[str] | None = None,
    windows: Sequence[tuple[float, float]] | None = None,
    name: str | None = None,
) -> dict:
    """``omero`` rendering hints, one channel per ``c``; window from the 0.1/99.9 percentiles
    (``windows``, e.g. an ImageJ file's display ranges, replace them).

    ``data`` should be a small (coarse) level: the window is a global display
    range, not worth reading level 0 for.
    """
    previous = None
    if windows:
        previous = {"channels": [{"window": {"start": float(lo), "end": float(hi)}} for lo, hi in windows]}
    return _omero(data, list(axes), dtype, version=version, labels=labels, colors=colors, previous=previous, name=name)


@dataclass(frozen=True)
class ImageOptions:
    """How ``write_ome_zarr`` and ``convert_tiff`` store an image, each option declared once (their own
    options, ``ArrayOptions`` and ``TiffOptions``, add the axes, the unit and what a TIFF brings)."""

    voxel_size: Sequence[float] | None = field(
        default=None,
        metadata={"help": "physical voxel size per spatial axis, in z, y, x order (default 1.0; a TIFF: the file's)"},
    )
    ngff: str = field(default=DEFAULT_VERSION, metadata={"help": "the NGFF version to write"})
    chunks: int | Sequence[int] | None = field(
        default=None, metadata={"help": "chunk shape in NGFF order, or one edge for every spatial axis"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing zarr store at the output"})
    name: str | None = field(default=None, metadata={"help": "the image's name (a TIFF: the file's, else its stem)"})
    storage_options: dict | None = field(default=None, metadata={"help": "fsspec options of the output"})
    shards: Sequence[int] | None = field(default=None, metadata={"help": "shard shape in NGFF order (NGFF 0.5 only)"})


@dataclass(frozen=True)
class ArrayOptions(ImageOptions):
    """``write_ome_zarr``'s options: ``ImageOptions`` and these."""

    axes: str = field(default="zyx", metadata={"help": "the array's dimensions in its own order (t, c, z, y, x)"})
    unit: str = field(default="micrometer", metadata={"help": "the unit of the spatial axes"})


@dataclass(frozen=True)
class TiffOptions(ImageOptions):
    """``convert_tiff``'s options: ``ImageOptions`` and these."""

    unit: str | None = field(default=None, metadata={"help": "the unit of every spatial axis (default: the file's)"})
    axes: str | None = field(default=None, metadata={"help": "the TIFF's axes in its dimension order"})
    channel_names: Sequence[str] | None = field(default=None, metadata={"help": "names of the channels"})
    extra_attrs: dict | None = field(default=None, metadata={"help": "attributes added to the image group"})


def _options(kind: type, options: dict, function: str):
    """``options`` as ``kind``, or the TypeError Python gives for an unknown keyword."""
    return keywords(function, kind, options)


@dataclass(frozen=True)
class _Described:
    """What the written image says beyond its ``ImageOptions``: the units (one name, or per spatial
    axis letter), channel hints for ``omero`` (labels, colors, windows), extra group attributes, and
    the warnings to print once the arguments and the output place have passed their checks."""

    unit: str | dict
    channels: dict | None = None
    extra_attrs: dict | None = None
    warnings: Sequence[str] = ()


def _prepare_output(out_url: str, storage_options: dict | None, overwrite: bool) -> None:
    if store_exists(out_url, storage_options):
        if not overwrite:
            raise NgffError(f"{out_url} already exists: pass --overwrite to replace it")
        remove_store(out_url, storage_options)


def _spatial(axes: str) -> list[int]:
    return [i for i, a in enumerate(axes) if _AXIS_TYPES[a] == "space"]


def _voxel_sizes(voxel_size: Sequence[float] | None, axes: str) -> list[float]:
    """One positive size per spatial axis (default 1.0)."""
    spatial = _spatial(axes)
    if voxel_size is None:
        voxel_size = [1.0] * len(spatial)
    voxel_size = [float(v) for v in np.atleast_1d(voxel_size)]
    if len(voxel_size) != len(spatial) or any(not v > 0 for v in voxel_size):
        raise ValueError(
            f"voxel_size needs {len(spatial)} positive values (order "
            f"{''.join(axes[i] for i in spatial)}), got {tuple(voxel_size)}"
        )
    return voxel_size


def _write_image(src: da.Array, src_axes: str, out_url: str, opts: ImageOptions, described: _Described) -> str:
    """Common path: store level 0, build the pyramid, then write metadata. ``described.warnings`` are
    printed once the arguments and the output place have passed their checks (an error stays one line)."""
    out_url = os.fspath(out_url)
    fmt = format_for(opts.ngff)
    axes = _canonical(src_axes)
    arr = da.transpose(src, [src_axes.index(a) for a in axes])
    spatial = _spatial(axes)
    voxel_size = _voxel_sizes(opts.voxel_size, axes)
    fmt.check_shards(opts.shards)
    c = _resolve_chunks(opts.chunks, arr.shape, axes)
    layout = level_chunks(arr.shape, c, opts.shards)

    _prepare_output(out_url, opts.storage_options, opts.overwrite)
    for warning in described.warnings:
        print(f"svision-big: warning: {warning}", file=sys.stderr, flush=True)
    group = open_output_group(out_url, fmt, opts.storage_options, mode="w-")
    factors = pyramid_factors(arr.shape, spatial)
    paths = _store_levels(group, fmt, arr, axes, factors, layout, opts.shards)
    coarsest = _display_sample(group, paths, axes)

    scale0 = [1.0] * len(axes)
    for i, v in zip(spatial, voxel_size):
        scale0[i] = v
    datasets = pyramid_datasets(scale0, [0.0] * len(axes), spatial, factors, paths)
    ome = multiscales_metadata(
        axes_metadata(axes, described.unit),
        datasets,
        name=opts.name,
        version=fmt.version,
        extra={"type": "mean", "metadata": {"method": "block mean", "software": "svision_big"}},
    )
    ome["omero"] = omero_metadata(
        coarsest, axes, arr.dtype, version=fmt.version, name=opts.name, **(described.channels or {})
    )
    if described.extra_attrs:
        group.attrs.update(described.extra_attrs)
    fmt.write_ome_attrs(group, ome)  # last: the image is only valid once complete
    return out_url


def _store_levels(group, fmt, arr: da.Array, axes: str, factors, layout, shards) -> list[str]:
    """Level 0 from ``arr``, then the pyramid from it; returns the pyramid's level paths.
    ``layout``: level 0's (chunks, shards)."""
    c, sh = layout
    write = sh if sh is not None else c
    # Every chunk is stored, those equal to the fill value too (zarr leaves them out by default; an
    # array takes the setting when it is opened): a chunk missing from an image written here is one
    # that was lost, which enhance warns of and --strict refuses (an all-zero region of a sparse
    # volume was a false "missing chunk").
    with zarr.config.set({"array.write_empty_chunks": True}):
        level0 = fmt.create_array(group, "0", arr.shape, c, arr.dtype, list(axes), shards=sh)
        # Threads: the source (numpy, memmap, open TIFF) lives in this process only.
        da.store(arr.rechunk(write), level0, lock=False, scheduler="threads")
        return build_pyramid(
            group, fmt, list(axes), "0", _spatial(axes), factors, c, arr.dtype, method="mean", shards=shards
        )


def _display_sample(group, paths: list[str], axes: str) -> np.ndarray:
    """The coarsest level (a few time points of it), for the display window."""
    coarsest = group[paths[-1] if paths else "0"]
    if "t" in axes and coarsest.shape[0] > 8:  # display window: a few time points suffice
        return coarsest.get_orthogonal_selection(np.unique(np.linspace(0, coarsest.shape[0] - 1, 8).astype(int)))
    return coarsest[...]


def write_ome_zarr(array: np.ndarray, out_url: str | os.PathLike, **options: Any) -> str:
    """Write an in-memory array as an OME-Zarr pyramid; returns ``out_url``.

    The options are ``ArrayOptions``' fields (``ImageOptions``' and two more): ``axes`` ("zyx"),
    ``voxel_size``, ``unit`` ("micrometer"), ``ngff``, ``chunks``, ``overwrite``, ``name``,
    ``storage_options``, ``shards``.
    ``axes`` names the array's dimensions in its own order (any order of
    t, c, z, y, x); data is stored in NGFF order (t, c, z, y, x).
    ``voxel_size`` is per spatial axis in z, y, x order (default 1.0);
    ``chunks`` (and ``shards``, NGFF 0.5 only) are in NGFF order.
    """
    opts = _options(ArrayOptions, options, "write_ome_zarr")
    array = np.asarray(array)
    axes = _parse_axes(opts.axes, array.ndim)
    src = da.from_array(array, chunks=array.shape if array.size else -1)
    return _write_image(src, axes, os.fspath(out_url), opts, _Described(opts.unit))


def _tiff_axes(series: Any) -> str:
    """NGFF letters for a tifffile series, falling back to inference by ndim."""
    letters = series.axes.upper()
    if all(a in _TIFF_AXES for a in letters):
        axes = "".join(_TIFF_AXES[a] for a in letters)
        if len(set(axes)) == len(axes):
            return axes
    ndim = len(series.shape)
    if ndim not in _INFERRED_AXES:
        raise NgffError(f"cannot interpret TIFF axes '{series.axes}' (shape {tuple(series.shape)}): pass --axes")
    return _INFERRED_AXES[ndim]


def _left_out(path: str, tf: Any, series: Any) -> str | None:
    """What a conversion of ``series`` (the first) leaves out of the file, in words: other series
    (another position, a thumbnail), pages in none of its levels. None when it is the whole file."""
    pages = len(tf.pages)
    used = {p.index for level in (getattr(series, "levels", None) or [series]) for p in level.pages if p is not None}
    used = len([i for i in used if isinstance(i, int)]) or 1
    if len(tf.series) <= 1 and used >= pages:
        return None
    return (
        f"{path} holds {len(tf.series)} image series in {pages} pages: only the first, shape "
        f"{tuple(series.shape)} in {used} page{'s' if used > 1 else ''}, is converted"
    )


def convert_tiff(tiff_path: str | os.PathLike, out_url: str | os.PathLike, **options: Any) -> str:
    """Convert the first series of a TIFF to an OME-Zarr pyramid; returns ``out_url``.

    The options are ``TiffOptions``' fields (``ImageOptions``' and four more): ``voxel_size``,
    ``unit``, ``ngff``, ``chunks``, ``overwrite``, ``axes``, ``storage_options``, ``shards``,
    ``name``, ``channel_names``, ``extra_attrs``.

    Axes come from tifffile's series axes (T, C, Z, Y, X; S samples become
    channels), else from the OME DimensionOrder, else from the number of dimensions (yx, zyx,
    czyx, tczyx); ``axes`` overrides them all, in the TIFF's dimension order.

    Voxel sizes and units come from the file (OME-XML PhysicalSize*, ImageJ spacing and
    resolution), each axis keeping its unit in NGFF spelling ("nm" -> "nanometer"). A file without
    any is 1.0 micrometer (or ``unit``) per axis, with a warning on stderr naming the axes; a file
    with some but not all (a missing ImageJ z spacing) is refused. ``voxel_size`` (z, y, x) and
    ``unit`` override the file. Other series and pages the first series leaves out are named in a
    warning.
    Channel names (OME Channel Name) and colours, and ImageJ display ranges, go into ``omero``.

    The TIFF is never loaded whole: uncompressed data is memory-mapped, compressed data is
    read in slabs of whole planes through tifffile's zarr interface.
    """
    import tifffile

    opts = _options(TiffOptions, options, "convert_tiff")
    path = os.fspath(tiff_path)
    with _open_tiff(tifffile, path, opts.ngff) as tf:
        if not tf.series:
            raise NgffError(f"{path} has no image series")
        series = tf.series[0]
        meta = tiff_metadata(tf)
        src_axes = _source_axes(series, meta, opts.axes)
        spatial = [a for a in _canonical(src_axes) if _AXIS_TYPES[a] == "space"]
        warnings = [left] if (left := _left_out(path, tf, series)) else []
        voxel_size = _tiff_voxel_size(path, meta, spatial, opts, warnings)
        described = _Described(
            unit=_tiff_units(meta, spatial, opts.unit),
            channels=_channel_hints(series, src_axes, meta, opts.channel_names),
            extra_attrs=opts.extra_attrs,
            warnings=warnings,
        )
        src = _tiff_source(tifffile, path, series, src_axes, opts)
        name = opts.name if opts.name is not None else (meta.name or os.path.basename(path).split(".")[0])
        return _write_image(
            src, src_axes, os.fspath(out_url), replace(opts, voxel_size=voxel_size, name=name), described
        )


def _open_tiff(tifffile, path: str, ngff: str):
    """The open ``tifffile.TiffFile`` at ``path``; one-line errors for a missing file, a bad NGFF
    version (before touching anything) and a file that is no TIFF."""
    if not os.path.isfile(path):
        raise NgffError(f"{path} does not exist" if not os.path.exists(path) else f"{path} is not a file")
    format_for(ngff)  # fail fast on a bad version, before touching anything
    try:
        return tifffile.TiffFile(path)
    except Exception as e:  # tifffile raises several types for non-TIFF input
        raise NgffError(f"{path} is not a readable TIFF file: {e}") from None


def _source_axes(series: Any, meta: TiffMetadata, axes: str | None) -> str:
    """The TIFF's axes in its dimension order: ``axes``, else tifffile's, else the OME DimensionOrder's."""
    if axes:
        return _parse_axes(axes, len(series.shape))
    try:
        return _tiff_axes(series)
    except NgffError:
        if meta.axes is None or len(meta.axes) != len(series.shape):
            raise
        return _parse_axes(meta.axes, len(series.shape))


def _tiff_voxel_size(
    path: str, meta: TiffMetadata, spatial: list[str], opts: TiffOptions, warnings: list[str]
) -> Sequence[float] | None:
    """``opts.voxel_size``, else the file's; a file with sizes for some spatial axes but not all is
    refused, one with none gets a warning (appended to ``warnings``) and None (1 per axis)."""
    if opts.voxel_size is not None:
        return opts.voxel_size
    missing = [a for a in spatial if a not in meta.sizes]
    given = [a for a in spatial if a in meta.sizes]
    if missing and given:  # a missing z became 1 of the lateral unit (1 nm): no size is better than a guess
        raise NgffError(
            f"{path} gives voxel sizes for {','.join(given)} ({', '.join(str(meta.sizes[a]) for a in given)} "
            f"{meta.units.get(given[0])}) but not for {','.join(missing)}: pass --voxel-size "
            f"{','.join(spatial).upper()}"
        )
    if missing:  # it was 1 micrometer per axis, without a word
        warnings.append(
            f"{path} has no voxel size for {','.join(missing)}: assumed 1 {ngff_unit(opts.unit or 'micrometer')} "
            f"(give --voxel-size {','.join(spatial).upper()} and --unit)"
        )
    if meta.sizes:
        return [meta.sizes.get(a, 1.0) for a in spatial]
    return None


def _tiff_units(meta: TiffMetadata, spatial: list[str], unit: str | None) -> str | dict:
    """``unit``, else the file's per spatial axis (an axis it leaves out takes its first), else micrometer."""
    if unit is not None:
        return unit
    if meta.units:
        default = next(iter(meta.units.values()))
        return {a: meta.units.get(a, default) for a in spatial}
    return "micrometer"


def _channel_hints(series: Any, src_axes: str, meta: TiffMetadata, channel_names: Sequence[str] | None) -> dict:
    """``omero``'s labels (``channel_names``, else the file's), colours and display windows, where the
    file has them for every channel."""
    nch = series.shape[src_axes.index("c")] if "c" in src_axes else 1
    labels = (
        list(channel_names)
        if channel_names is not None
        else (meta.channel_names[:nch] if any(meta.channel_names[:nch]) else None)
    )
    return {
        "labels": labels,
        "colors": meta.colors[:nch] if any(meta.colors[:nch]) else None,
        "windows": meta.windows[:nch] if len(meta.windows) >= nch else None,
    }


def _tiff_source(tifffile, path: str, series: Any, src_axes: str, opts: TiffOptions) -> da.Array:
    """The first series as a dask array, in blocks the output's writes can take whole."""
    canon = _canonical(src_axes)
    canon_shape = tuple(series.shape[src_axes.index(a)] for a in canon)
    c = _resolve_chunks(opts.chunks, canon_shape, canon)
    write = dict(zip(canon, level_chunks(canon_shape, c, opts.shards)[1] or c))
    if series.dataoffset is not None:
        # Contiguous and uncompressed: any block can be read directly.
        source = tifffile.memmap(path, mode="r", series=0)
        src_chunks = tuple(write[a] for a in src_axes)
        lock = False
    else:
        # Pages are decoded whole: take whole planes, a write-chunk deep.
        source = zarr.open(series.aszarr(), mode="r")
        inplane = src_axes.index("y")  # y, x and samples live inside a page
        src_chunks = tuple(n if i >= inplane else write[a] for i, (n, a) in enumerate(zip(series.shape, src_axes)))
        lock = True  # one file handle: serialise reads
    return da.from_array(source, chunks=src_chunks, lock=lock, asarray=True)


# --------------------------------------------------------------------------
# TIFF input for run / train
# --------------------------------------------------------------------------

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
SOURCE_KEY = "svision_big_source"


def is_tiff(path: str | os.PathLike) -> bool:
    """True for a local file that starts like a TIFF (classic or BigTIFF, either byte order)."""
    p = os.fspath(path)
    if is_remote(p):
        return False
    p = without_file_scheme(p)
    if not os.path.isfile(p):
        return False
    with open(p, "rb") as f:
        return f.read(4) in _TIFF_MAGIC


def as_ome_zarr(
    input: str | os.PathLike,
    near: str | os.PathLike | None = None,
    ngff: str = DEFAULT_VERSION,
    quiet: bool = False,
    **convert_kwargs,
) -> str:
    """``input`` itself, or, when it is a TIFF (OME-TIFF, ImageJ or plain), an OME-Zarr converted
    from it with its metadata, which ``run`` / ``train`` / ``enhance`` then read.

    The copy lies next to ``near`` (the output) when that is a local path, else in the temporary
    folder, and is named after the TIFF and a digest of its absolute path, size and modification
    time: a second run (or a resumed one) on the same TIFF finds and reuses it instead of converting
    again. ``convert_kwargs`` go to :func:`convert_tiff` (``voxel_size``, ``unit``, ``axes``, ...)."""
    src = os.fspath(input)
    if not is_tiff(src):
        return src
    path = os.path.abspath(without_file_scheme(src))
    st = os.stat(path)
    record = {
        "tiff": path,
        "size": int(st.st_size),
        "mtime_ns": int(st.st_mtime_ns),
        "ngff": str(ngff),
        "options": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in sorted(convert_kwargs.items())},
    }
    digest = hashlib.sha1(repr(sorted(record.items())).encode()).hexdigest()[:10]
    near = None if near is None else os.fspath(near)
    if near and not is_remote(near):
        folder = os.path.dirname(os.path.abspath(without_file_scheme(near)))
    else:
        folder = os.path.join(tempfile.gettempdir(), "svision_big")
    os.makedirs(folder, exist_ok=True)
    stem = os.path.basename(path).split(".")[0] or "image"
    out = os.path.join(folder, f"{stem}.{digest}.ome.zarr")
    if store_exists(out):
        try:
            img = open_image(out)
            if img.group.attrs.get(SOURCE_KEY) == record:
                if not quiet:
                    decision(f"{src}: using the OME-Zarr converted earlier, {out}", "convert", output=out)
                return out
        except NgffError:
            pass  # an interrupted conversion: done again
    if not quiet:
        decision(f"{src}: a TIFF, converting it to {out}", "convert", output=out)
    convert_tiff(path, out, ngff=ngff, overwrite=True, extra_attrs={SOURCE_KEY: record}, **convert_kwargs)
    return out
