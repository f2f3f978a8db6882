"""TIFF / numpy -> OME-Zarr pyramid (NGFF 0.4 or 0.5).

Data is streamed block by block (a memory map for uncompressed TIFFs,
tifffile's zarr view of the pages otherwise), the pyramid is built from the
stored level 0, and the OME metadata is written last so that an interrupted
conversion never looks like a valid image.

The TIFF's own metadata is kept: OME-XML (PhysicalSizeZ/Y/X and their units, channel names and
colours, the image name) and ImageJ hyperstacks (``spacing``, ``unit``, the X/Y resolution tags,
display ranges). Units become NGFF names ("nm" -> "nanometer"). Explicit arguments override it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import zarr

from .ngff.format import DEFAULT_VERSION, format_for
from .ngff.image import open_image
from .ngff.transforms import multiscales_metadata
from .ngff.viewer import ngff_unit
from .ngff.viewer import omero_metadata as _omero
from .pyramid import build_pyramid, level_chunks, pyramid_datasets, pyramid_factors
from .store import NgffError, is_remote, open_output_group, remove_store, store_exists, without_file_scheme

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
    unit: str | dict,
    ngff: str,
    chunks: int | Sequence[int] | None,
    overwrite: bool,
    name: str | None,
    storage_options: dict | None,
    shards: Sequence[int] | None,
    channels: dict | None = None,
    extra_attrs: dict | None = None,
    warnings: Sequence[str] = (),
) -> str:
    """Common path: store level 0, build the pyramid, then write metadata. ``warnings`` are printed
    once the arguments and the output place have passed their checks (an error stays one line)."""
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
    fmt.check_shards(shards)
    c = _resolve_chunks(chunks, arr.shape, axes)
    c, sh = level_chunks(arr.shape, c, shards)

    _prepare_output(out_url, storage_options, overwrite)
    for warning in warnings:
        print(f"svision-big: warning: {warning}", file=sys.stderr, flush=True)
    group = open_output_group(out_url, fmt, storage_options, mode="w-")
    write = sh if sh is not None else c
    factors = pyramid_factors(arr.shape, spatial)
    # Every chunk is stored, those equal to the fill value too (zarr leaves them out by default; an
    # array takes the setting when it is opened): a chunk missing from an image written here is one
    # that was lost, which enhance warns of and --strict refuses (an all-zero region of a sparse
    # volume was a false "missing chunk").
    with zarr.config.set({"array.write_empty_chunks": True}):
        level0 = fmt.create_array(group, "0", arr.shape, c, arr.dtype, list(axes), shards=sh)
        # Threads: the source (numpy, memmap, open TIFF) lives in this process only.
        da.store(arr.rechunk(write), level0, lock=False, scheduler="threads")
        paths = build_pyramid(group, fmt, list(axes), "0", spatial, factors, c, arr.dtype, method="mean", shards=shards)
    coarsest = group[paths[-1] if paths else "0"]
    if "t" in axes and coarsest.shape[0] > 8:  # display window: a few time points suffice
        coarsest = coarsest.get_orthogonal_selection(np.unique(np.linspace(0, coarsest.shape[0] - 1, 8).astype(int)))
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
    ome["omero"] = omero_metadata(coarsest, axes, arr.dtype, version=fmt.version, name=name, **(channels or {}))
    if extra_attrs:
        group.attrs.update(extra_attrs)
    fmt.write_ome_attrs(group, ome)  # last: the image is only valid once complete
    return out_url


def write_ome_zarr(
    array: np.ndarray,
    out_url: str | os.PathLike,
    axes: str = "zyx",
    voxel_size: Sequence[float] | None = None,
    unit: str = "micrometer",
    ngff: str = DEFAULT_VERSION,
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
        src,
        axes,
        os.fspath(out_url),
        voxel_size,
        unit,
        ngff,
        chunks,
        overwrite,
        name,
        storage_options,
        shards,
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


@dataclass
class TiffMetadata:
    """What a TIFF says about itself. ``sizes`` / ``units``: per spatial axis letter (z, y, x);
    ``channel_names``, ``colors`` (hex RGB) and ``windows`` ((start, end) display ranges): per channel."""

    kind: str | None = None  # "ome", "imagej" or None
    axes: str | None = None  # NGFF letters in the file's dimension order, when the metadata names them
    sizes: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)
    channel_names: list = field(default_factory=list)
    colors: list = field(default_factory=list)
    windows: list = field(default_factory=list)
    name: str | None = None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _ome_color(value: str | None) -> str | None:
    """OME's Color (a signed 32-bit RGBA integer) as hex RGB."""
    if value is None:
        return None
    try:
        v = int(value) & 0xFFFFFFFF
    except ValueError:
        return None
    return f"{(v >> 24) & 255:02X}{(v >> 16) & 255:02X}{(v >> 8) & 255:02X}"


def _ome_metadata(xml: str, series_index: int = 0) -> TiffMetadata:
    meta = TiffMetadata(kind="ome")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return meta
    images = [e for e in root if _local(e.tag) == "Image"]
    if not images:
        return meta
    image = images[min(series_index, len(images) - 1)]
    meta.name = image.get("Name") or None
    pixels = next((e for e in image if _local(e.tag) == "Pixels"), None)
    if pixels is None:
        return meta
    for a in "zyx":
        size = pixels.get(f"PhysicalSize{a.upper()}")
        if size is not None:
            try:
                v = float(size)
            except ValueError:
                continue
            if v > 0:
                meta.sizes[a] = v
                meta.units[a] = ngff_unit(pixels.get(f"PhysicalSize{a.upper()}Unit") or "µm")  # OME's default
    order = pixels.get("DimensionOrder")
    if order and sorted(order.upper()) == sorted("XYZCT"):
        sizes = {a: int(pixels.get(f"Size{a}", "1") or 1) for a in "XYZCT"}
        # DimensionOrder is fastest first: reversed, it is the array order; size-1 axes are squeezed
        meta.axes = "".join(a.lower() for a in reversed(order.upper()) if sizes[a] > 1 or a in "YX")
    for ch in (e for e in pixels if _local(e.tag) == "Channel"):
        meta.channel_names.append(ch.get("Name") or None)
        meta.colors.append(_ome_color(ch.get("Color")))
    return meta


def _imagej_metadata(tf: Any, series: Any) -> TiffMetadata:
    ij = dict(tf.imagej_metadata or {})
    meta = TiffMetadata(kind="imagej")
    unit = ij.get("unit")
    if isinstance(unit, str) and "\\u" in unit:  # ImageJ writes "\u00B5m" for micrometre
        unit = unit.encode().decode("unicode_escape")
    unit = ngff_unit(unit)
    if unit in ("pixel", "pixels"):
        unit = None  # an uncalibrated image: its resolution tags mean nothing
    page = series.pages[0] if series.pages else tf.pages[0]
    for a, tag in (("y", "YResolution"), ("x", "XResolution")):
        t = page.tags.get(tag)
        if t is None or unit is None:
            continue
        try:
            num, den = t.value
            v = float(den) / float(num)  # the tag is pixels per unit
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if v > 0:
            meta.sizes[a] = v
            meta.units[a] = unit
    spacing = ij.get("spacing")
    if spacing is not None and "Z" in series.axes.upper():
        try:
            if float(spacing) > 0:
                meta.sizes["z"] = float(spacing)
                meta.units["z"] = unit or "micrometer"
        except (TypeError, ValueError):
            pass
    ranges = ij.get("Ranges")
    if ranges is not None and len(ranges) >= 2:
        r = [float(v) for v in ranges]
        meta.windows = [(r[i], r[i + 1]) for i in range(0, len(r) - 1, 2)]
    labels = ij.get("Labels")
    nch = int(ij.get("channels") or 1)
    # Labels name the slices of a stack; with one label per channel they name the channels
    if isinstance(labels, (list, tuple)) and nch > 1 and len(labels) == nch:
        meta.channel_names = [str(v) if v else None for v in labels]
    return meta


def tiff_metadata(tf: Any, series_index: int = 0) -> TiffMetadata:
    """Physical sizes, units, channel names and display hints of an open ``tifffile.TiffFile``:
    from the OME-XML when there is one, else from the ImageJ description and resolution tags."""
    if getattr(tf, "is_ome", False) and tf.ome_metadata:
        return _ome_metadata(tf.ome_metadata, series_index)
    if getattr(tf, "is_imagej", False) and tf.imagej_metadata is not None:
        return _imagej_metadata(tf, tf.series[series_index])
    return TiffMetadata()


def convert_tiff(
    tiff_path: str | os.PathLike,
    out_url: str | os.PathLike,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    ngff: str = DEFAULT_VERSION,
    chunks: int | Sequence[int] | None = None,
    overwrite: bool = False,
    axes: str | None = None,
    storage_options: dict | None = None,
    shards: Sequence[int] | None = None,
    name: str | None = None,
    channel_names: Sequence[str] | None = None,
    extra_attrs: dict | None = None,
) -> str:
    """Convert the first series of a TIFF to an OME-Zarr pyramid; returns ``out_url``.

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
        meta = tiff_metadata(tf)
        if axes:
            src_axes = _parse_axes(axes, len(series.shape))
        else:
            try:
                src_axes = _tiff_axes(series)
            except NgffError:
                if meta.axes is None or len(meta.axes) != len(series.shape):
                    raise
                src_axes = _parse_axes(meta.axes, len(series.shape))
        canon = _canonical(src_axes)
        spatial = [a for a in canon if _AXIS_TYPES[a] == "space"]
        warnings = [left] if (left := _left_out(path, tf, series)) else []
        if voxel_size is None:
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
                    f"{path} has no voxel size for {','.join(missing)}: assumed 1 {ngff_unit(unit or 'micrometer')} "
                    f"(give --voxel-size {','.join(spatial).upper()} and --unit)"
                )
            if meta.sizes:
                voxel_size = [meta.sizes.get(a, 1.0) for a in spatial]
        if unit is not None:
            units: str | dict = unit
        elif meta.units:
            default = next(iter(meta.units.values()))
            units = {a: meta.units.get(a, default) for a in spatial}
        else:
            units = "micrometer"
        nch = series.shape[src_axes.index("c")] if "c" in src_axes else 1
        labels = (
            list(channel_names)
            if channel_names is not None
            else (meta.channel_names[:nch] if any(meta.channel_names[:nch]) else None)
        )
        channels = {
            "labels": labels,
            "colors": meta.colors[:nch] if any(meta.colors[:nch]) else None,
            "windows": meta.windows[:nch] if len(meta.windows) >= nch else None,
        }
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
            src_chunks = tuple(n if i >= inplane else write[a] for i, (n, a) in enumerate(zip(series.shape, src_axes)))
            lock = True  # one file handle: serialise reads
        src = da.from_array(source, chunks=src_chunks, lock=lock, asarray=True)
        if name is None:
            name = meta.name or os.path.basename(path).split(".")[0]
        return _write_image(
            src,
            src_axes,
            os.fspath(out_url),
            voxel_size,
            units,
            ngff,
            chunks,
            overwrite,
            name,
            storage_options,
            shards,
            channels=channels,
            extra_attrs=extra_attrs,
            warnings=warnings,
        )


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
                    print(f"{src}: using the OME-Zarr converted earlier, {out}", flush=True)
                return out
        except NgffError:
            pass  # an interrupted conversion: done again
    if not quiet:
        print(f"{src}: a TIFF, converting it to {out}", flush=True)
    convert_tiff(path, out, ngff=ngff, overwrite=True, extra_attrs={SOURCE_KEY: record}, **convert_kwargs)
    return out
