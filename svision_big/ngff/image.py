"""Reading an OME-Zarr image: open a store read-only, find its NGFF format, check and parse its
``multiscales`` (axes, datasets, coordinate transformations) into an :class:`Image`; and ``describe``,
the summary ``svision-big info`` prints. Every problem is one line (:class:`NgffError`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
import zarr.errors

from ..store import NgffError, is_remote, make_store, store_exists
from .format import NgffFormat, detect_format
from .viewer import usable_omero

__all__ = ["Image", "open_image", "describe"]


@dataclass(frozen=True, eq=False)
class Image:
    """Metadata of one multiscale image (the first ``multiscales`` entry), read-only view.

    ``scales`` / ``translations`` already include any multiscale-level
    ``coordinateTransformations``, so level ``i`` maps index ``k`` to the
    physical coordinate ``translations[i] + scales[i] * k`` directly.
    """

    group: zarr.Group
    fmt: NgffFormat
    axes: list[dict]
    paths: list[str]
    scales: list[list[float]]
    translations: list[list[float]]
    omero: dict | None
    name: str | None
    attrs: dict
    url: str | None = field(default=None)

    @property
    def axis_names(self) -> list[str]:
        return [a["name"] for a in self.axes]

    @property
    def spatial_axes(self) -> list[int]:
        return [i for i, a in enumerate(self.axes) if a.get("type") == "space"]

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def nlevels(self) -> int:
        return len(self.paths)

    def level(self, i: int) -> zarr.Array:
        try:
            node = self.group[self.paths[i]]
        except KeyError:
            raise NgffError(f"dataset '{self.paths[i]}' of {self._where} does not exist") from None
        if not isinstance(node, zarr.Array):
            raise NgffError(f"dataset '{self.paths[i]}' of {self._where} is not an array")
        return node

    def read(self, i: int, sel=...) -> np.ndarray:
        """Level ``i``'s voxels in ``sel``; a chunk that cannot be decoded is one line naming the
        level and the chunk (``chunks.read_region``)."""
        from ..chunks import read_region

        return read_region(self.level(i), sel, f"{self._where}/{self.paths[i]}")

    @property
    def _where(self) -> str:
        return self.url or str(self.group.store)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.level(0).shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.level(0).dtype)

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.level(0).chunks)

    @property
    def shards(self) -> tuple[int, ...] | None:
        shards = self.level(0).shards
        return None if shards is None else tuple(shards)


def _transforms(transforms: list[dict] | None, ndim: int, where: str) -> tuple[list[float], list[float]]:
    scale = [1.0] * ndim
    translation = [0.0] * ndim
    seen: set[str] = set()
    for t in transforms or []:
        kind = t.get("type")
        if kind in seen and kind in ("scale", "translation"):
            raise NgffError(f"{where}: two '{kind}' transformations (NGFF allows one of each)")
        seen.add(kind)
        if kind == "identity":
            continue
        if kind not in ("scale", "translation"):
            raise NgffError(f"{where}: unsupported coordinate transformation '{kind}'")
        if kind not in t:
            raise NgffError(f"{where}: {kind} given by 'path' is not supported")
        values = t[kind]
        if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise NgffError(f"{where}: {kind} {values!r} is not a list of numbers")
        values = [float(v) for v in values]
        if len(values) != ndim:
            raise NgffError(f"{where}: {kind} has {len(values)} values for {ndim} axes")
        if not all(math.isfinite(v) for v in values) or kind == "scale" and not all(v > 0 for v in values):
            what = "positive, finite numbers" if kind == "scale" else "finite numbers"
            raise NgffError(f"{where}: {kind} {values} must hold {what} (a voxel size of 0, < 0, NaN or Inf)")
        if kind == "scale":
            scale = values
        else:
            translation = values
    return scale, translation


def _check_multiscales(multiscales, where: str) -> None:
    """A list of image descriptions (objects), the first with a list of datasets (objects with a
    path): a dict there was "KeyError: 0", an empty list "IndexError: list index out of range", a
    dict of datasets "AttributeError: 'str' object has no attribute 'get'"."""
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        got = f"a {type(multiscales).__name__}" if multiscales else f"an empty {type(multiscales).__name__}"
        raise NgffError(f"no OME-Zarr image at {where}: 'multiscales' must be a list of objects, not {got}")
    datasets = multiscales[0].get("datasets")
    if not isinstance(datasets, list) or not all(isinstance(d, dict) and "path" in d for d in datasets):
        what = f"a {type(datasets).__name__}" if not isinstance(datasets, list) else "a list with other entries"
        raise NgffError(f"no OME-Zarr image at {where}: 'datasets' must be a list of objects with a 'path', not {what}")


def _open_group_readonly(url: str, storage_options: dict | None) -> zarr.Group:
    url = str(url)
    remote = is_remote(url)
    # Remote: open first and ask about existence only on failure, since a
    # "directory" on HTTP or S3 is not an object fsspec can always see.
    if not remote and not store_exists(url):
        raise NgffError(f"{url} does not exist")
    store = make_store(url, storage_options, read_only=True)
    try:
        node = zarr.open(store, mode="r")
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        if remote and not store_exists(url, storage_options):
            raise NgffError(f"{url} does not exist") from None
        from ..convert import is_tiff  # convert imports this module

        if is_tiff(url):
            raise NgffError(
                f"{url} is a TIFF, not an OME-Zarr image: convert it first (svision-big convert {url} OUT.ome.zarr)"
            ) from None
        raise NgffError(f"no OME-Zarr image at {url}: not a zarr group") from None
    if not isinstance(node, zarr.Group):
        raise NgffError(f"no OME-Zarr image at {url}: a zarr array, not a group")
    return node


def open_image(url_or_group: str | os.PathLike | zarr.Group, storage_options: dict | None = None) -> Image:
    """Open an OME-Zarr image (NGFF 0.4 or 0.5) read-only and parse its metadata.

    Accepts a local path, ``file://`` / ``s3://`` (any fsspec URL, with
    ``storage_options``) or an already open ``zarr.Group``. Every problem is
    reported as a one-line :class:`NgffError`.
    """
    if isinstance(url_or_group, zarr.Group):
        group, url = url_or_group, None
        where = str(group.store)
    else:
        url = os.fspath(url_or_group)
        group = _open_group_readonly(url, storage_options)
        where = url
    fmt, ome = detect_format(group.attrs.asdict(), group.metadata.zarr_format, where)
    _check_multiscales(ome["multiscales"], where)
    multiscale = ome["multiscales"][0]
    axes = multiscale.get("axes")
    if not isinstance(axes, list) or not all(isinstance(a, dict) and "name" in a for a in axes):
        raise NgffError(f"no OME-Zarr image at {where}: 'axes' missing or malformed")
    axes = [dict(a) for a in axes]
    names = [a["name"] for a in axes]
    if len(set(names)) != len(names):
        raise NgffError(f"{where}: axis names {names} repeat one")
    for a in axes:
        if "unit" in a and not isinstance(a["unit"], str):
            raise NgffError(f"{where}: axis '{a['name']}' has the unit {a['unit']!r}, not a unit name")
    ndim = len(axes)
    datasets = multiscale.get("datasets") or []
    if not datasets:
        raise NgffError(f"no OME-Zarr image at {where}: 'multiscales' has no datasets")
    gscale, gtrans = _transforms(multiscale.get("coordinateTransformations"), ndim, where)
    paths, scales, translations = [], [], []
    for ds in datasets:
        s, t = _transforms(ds.get("coordinateTransformations"), ndim, f"{where}/{ds.get('path')}")
        paths.append(str(ds["path"]))
        # Dataset transforms apply first, then the multiscale-level ones.
        scales.append([gs * v for gs, v in zip(gscale, s)])
        translations.append([gs * v + gt for gs, v, gt in zip(gscale, t, gtrans)])
    image = Image(
        group=group,
        fmt=fmt,
        axes=axes,
        paths=paths,
        scales=scales,
        translations=translations,
        omero=usable_omero(ome.get("omero")),
        name=multiscale.get("name"),
        attrs=ome,
        url=url,
    )
    try:
        level0 = image.level(0)
    except KeyError:
        raise NgffError(f"no OME-Zarr image at {where}: dataset '{paths[0]}' is missing") from None
    if level0.ndim != ndim:
        raise NgffError(f"no OME-Zarr image at {where}: {ndim} axes but level 0 has {level0.ndim} dimensions")
    return image


# --------------------------------------------------------------------------
# Human-readable summary
# --------------------------------------------------------------------------


def _fmt_list(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) else "?"


def describe(url_or_group: str | os.PathLike | zarr.Group, storage_options: dict | None = None) -> str:
    """Human-readable summary of an OME-Zarr image (for ``svision-big info``)."""
    img = open_image(url_or_group, storage_options)
    lines = [f"OME-Zarr image: {img._where}"]
    lines.append(f"  NGFF version: {img.fmt.version} (zarr v{img.fmt.zarr_format})")
    if img.name is not None:
        lines.append(f"  name: {img.name}")
    axes = []
    for a in img.axes:
        extra = ", ".join(str(x) for x in (a.get("type"), a.get("unit")) if x)
        axes.append(f"{a['name']} ({extra})" if extra else a["name"])
    lines.append("  axes: " + ", ".join(axes))
    lines.append(f"  levels: {img.nlevels}")
    for i, path in enumerate(img.paths):
        try:
            arr = img.level(i)
        except (KeyError, NgffError):
            lines.append(f"    {path}: MISSING")
            continue
        shards = "-" if arr.shards is None else str(tuple(arr.shards))
        lines.append(
            f"    {path}: shape {tuple(arr.shape)}  chunks {tuple(arr.chunks)}  shards {shards}  "
            f"dtype {np.dtype(arr.dtype)}  scale {_fmt_list(img.scales[i])}  "
            f"translation {_fmt_list(img.translations[i])}"
        )
    channels = (img.omero or {}).get("channels") or []
    if channels:
        lines.append("  omero channels:")
        for i, ch in enumerate(channels):
            w = ch.get("window") or {}
            lines.append(
                f"    {i}: {ch.get('label', '')}  color {ch.get('color', '?')}  "
                f"window {_num(w.get('start'))}..{_num(w.get('end'))} "
                f"(range {_num(w.get('min'))}..{_num(w.get('max'))})"
            )
    return "\n".join(lines)
