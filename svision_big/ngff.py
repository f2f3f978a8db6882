"""OME-Zarr (NGFF 0.4 / 0.5) reading, writing and coordinate bookkeeping.

Modelled on ome-zarr-py's ``format.py``: every difference between NGFF versions
(zarr v2 vs v3, where the ``ome`` attributes live, how arrays are encoded) is
kept in one :class:`NgffFormat` subclass, so the rest of the package never
branches on a version string.

Coordinate transforms are written by us rather than by ome-zarr-py, because
(see docs/architecture.md) its ``write_multiscale(scale=...)`` writes
translations in the wrong units and ``write_image(compute=False)`` writes
metadata before the data exists.
"""

from __future__ import annotations

import copy
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
import zarr.errors
from zarr.storage import FsspecStore, LocalStore

from .store import is_remote, local_path

__all__ = [
    "NgffError",
    "NgffFormat",
    "FormatV04",
    "FormatV05",
    "format_for",
    "Image",
    "open_image",
    "upsampled_transform",
    "downsampled_transform",
    "multiscales_metadata",
    "open_output_group",
    "store_exists",
    "make_store",
    "remove_store",
    "foreign_file",
    "describe",
    "SUPPORTED_VERSIONS",
]

SUPPORTED_VERSIONS = ("0.4", "0.5")


class NgffError(ValueError):
    """A problem with an OME-Zarr store, worded as one line for the user."""


# --------------------------------------------------------------------------
# Version-specific behaviour
# --------------------------------------------------------------------------


class NgffFormat(ABC):
    """Everything that differs between NGFF versions, in one place."""

    version: str
    zarr_format: int

    @abstractmethod
    def write_ome_attrs(self, group: zarr.Group, ome: dict) -> None:
        """Store the OME dict on ``group``, adding the version marker where the spec wants it.

        Other (non-OME) attributes already on the group are kept, so
        provenance written earlier survives.
        """

    def create_array(
        self,
        group: zarr.Group,
        path: str,
        shape: Sequence[int],
        chunks: Sequence[int],
        dtype: Any,
        dimension_names: Sequence[str],
        shards: Sequence[int] | None = None,
        compression: bool = True,
        fill_value: Any = 0,
        overwrite: bool = False,
    ) -> zarr.Array:
        """Create an image array encoded as this NGFF version requires."""
        return group.create_array(
            path,
            shape=tuple(int(s) for s in shape),
            chunks=tuple(int(c) for c in chunks),
            dtype=np.dtype(dtype),
            fill_value=fill_value,
            overwrite=overwrite,
            **self.array_encoding(dimension_names, shards, compression),
        )

    @abstractmethod
    def array_encoding(self, dimension_names: Sequence[str], shards: Sequence[int] | None, compression: bool) -> dict:
        """The version's ``create_array`` keywords: compressor, chunk keys, shards, dimension names."""

    def multiscale_entry(self, entry: dict) -> dict:
        """Add version-specific keys to one ``multiscales`` entry (default: none)."""
        return entry

    @abstractmethod
    def ome_attrs(self, attrs: dict) -> dict | None:
        """The OME metadata in a group's attributes, where this version stores it (None: absent)."""

    @abstractmethod
    def stored_version(self, ome: dict) -> str | None:
        """The NGFF version the metadata declares (None: undeclared), as this version records it."""

    def reads(self, version: str | None) -> bool:
        """Whether metadata declaring ``version`` is this format's."""
        return version == self.version

    def __repr__(self) -> str:
        return f"{type(self).__name__}(version={self.version!r}, zarr_format={self.zarr_format})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NgffFormat) and other.version == self.version

    def __hash__(self) -> int:
        return hash(self.version)


class FormatV04(NgffFormat):
    """NGFF 0.4: zarr v2, attributes at the group root, nested ``/`` chunk keys."""

    version = "0.4"
    zarr_format = 2

    def multiscale_entry(self, entry: dict) -> dict:
        # 0.4 versions each multiscales entry, not the group.
        return {**entry, "version": self.version}

    def write_ome_attrs(self, group: zarr.Group, ome: dict) -> None:
        ome = copy.deepcopy(dict(ome))
        ome.pop("version", None)
        if "multiscales" in ome:
            ome["multiscales"] = [self.multiscale_entry(m) for m in ome["multiscales"]]
        group.attrs.update(ome)

    def array_encoding(self, dimension_names: Sequence[str], shards: Sequence[int] | None, compression: bool) -> dict:
        # dimension_names cannot be stored in zarr v2; the axes live in .zattrs.
        if shards is not None:
            raise NgffError("sharding needs NGFF 0.5 (zarr v3); NGFF 0.4 cannot shard")
        import numcodecs

        compressor = (
            numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE) if compression else None
        )
        return {"compressors": compressor, "chunk_key_encoding": {"name": "v2", "separator": "/"}}

    def ome_attrs(self, attrs: dict) -> dict | None:
        return attrs  # 0.4 keeps its metadata at the group root

    def stored_version(self, ome: dict) -> str | None:
        ms = ome.get("multiscales")
        if not isinstance(ms, list) or not ms or not isinstance(ms[0], dict):
            return None  # malformed: ``_check_multiscales`` names it
        first = ms[0]
        version = first.get("version")
        axes = first.get("axes")
        # Before 0.4 axes were missing or plain strings and had no units/types.
        if version is None and not (isinstance(axes, list) and axes and isinstance(axes[0], dict)):
            version = "0.3" if axes else "0.1-0.2"
        return version

    def reads(self, version: str | None) -> bool:
        return version in (None, self.version)  # 0.4 writers may leave the entry unversioned


class FormatV05(NgffFormat):
    """NGFF 0.5: zarr v3, attributes under ``ome``, arrays carry ``dimension_names``."""

    version = "0.5"
    zarr_format = 3

    def write_ome_attrs(self, group: zarr.Group, ome: dict) -> None:
        ome = copy.deepcopy(dict(ome))
        # 0.5 versions the whole "ome" block; a per-entry version is not allowed.
        for m in ome.get("multiscales", []):
            m.pop("version", None)
        group.attrs.update({"ome": {"version": self.version, **ome}})

    def array_encoding(self, dimension_names: Sequence[str], shards: Sequence[int] | None, compression: bool) -> dict:
        from zarr.codecs import BloscCodec

        compressors = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle") if compression else None
        return {
            "shards": None if shards is None else tuple(int(s) for s in shards),
            "compressors": compressors,
            "dimension_names": list(dimension_names),
        }

    def ome_attrs(self, attrs: dict) -> dict | None:
        ome = attrs.get("ome")
        return ome if isinstance(ome, dict) else None

    def stored_version(self, ome: dict) -> str | None:
        return str(ome.get("version", "?"))


# The registry: a new NGFF version is one subclass here (and its tests); the command line's choices,
# the error messages and reading all follow it.
_FORMATS: dict[str, NgffFormat] = {f.version: f for f in (FormatV04(), FormatV05())}
SUPPORTED_VERSIONS: tuple[str, ...] = tuple(_FORMATS)
DEFAULT_VERSION = "0.5"  # what new images are written as (zarr v3)


def format_for(version: str) -> NgffFormat:
    """Return the format object for an NGFF version string (one of ``SUPPORTED_VERSIONS``)."""
    try:
        return _FORMATS[str(version)]
    except KeyError:
        raise ValueError(f"unsupported NGFF version '{version}': use {' or '.join(SUPPORTED_VERSIONS)}") from None


# --------------------------------------------------------------------------
# Stores
# --------------------------------------------------------------------------


def make_store(url: str, storage_options: dict | None, read_only: bool):
    """A zarr store for a local path (``LocalStore``) or an fsspec URL (``FsspecStore``)."""
    url = str(url)
    if is_remote(url):
        return FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)
    return LocalStore(local_path(url), read_only=read_only)


def _fs_and_path(url: str, storage_options: dict | None):
    import fsspec.core

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def store_exists(url: str, storage_options: dict | None = None) -> bool:
    """True when anything exists at ``url`` (local path or fsspec URL)."""
    url = str(url)
    if not is_remote(url):
        return os.path.exists(local_path(url))
    fs, path = _fs_and_path(url, storage_options)
    fs.invalidate_cache(path)  # listings cached by an earlier call may be stale
    return bool(fs.exists(path))


_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray", ".zattrs")
# what a zarr store's files are called: metadata, or chunk keys (v3 "c/0/1", v2 "0.1" or "0/1")
_ZARR_FILE = re.compile(r"^(?:zarr\.json|\.zgroup|\.zarray|\.zattrs|\.zmetadata|c|\d+(?:\.\d+)*)$")


def _store_fs(url: str, storage_options: dict | None):
    if is_remote(url):
        return _fs_and_path(url, storage_options)
    import fsspec

    return fsspec.filesystem("file"), local_path(url)


def foreign_file(url: str, storage_options: dict | None = None, allowed=None) -> str | None:
    """The first file under ``url`` (relative path) that no zarr store holds, or None.

    ``allowed(relative_path)`` replaces the generic rule (zarr metadata or chunk-key names), for
    callers that know exactly what they wrote. Lists every file: as costly as deleting them.
    """
    fs, root = _store_fs(str(url), storage_options)
    root = root.rstrip("/")
    ok = allowed or (lambda rel: bool(_ZARR_FILE.match(rel.rsplit("/", 1)[-1])))
    for p in sorted(fs.find(root, withdirs=False)):
        rel = p[len(root) + 1 :] if p.startswith(root + "/") else p
        if not ok(rel):
            return rel
    return None


def remove_store(url: str, storage_options: dict | None = None) -> None:
    """Delete a zarr store at ``url``; refuse anything that is not one, and anything that holds
    files no zarr store has (a ``thesis.docx`` beside ``zarr.json``): then nothing is deleted.

    The check guards against ``--overwrite`` pointed at a home directory or a folder of papers.
    """
    url = str(url)
    fs, path = _store_fs(url, storage_options)
    if not fs.exists(path):
        return
    if not fs.isdir(path) or not any(fs.exists(f"{path.rstrip('/')}/{m}") for m in _ZARR_MARKERS):
        raise NgffError(f"{url} exists and is not a zarr store: refusing to delete it")
    stray = foreign_file(url, storage_options)
    if stray is not None:
        raise NgffError(
            f"{url} holds {stray}, which is not part of a zarr store: refusing to delete it "
            f"(move it elsewhere, or choose another output)"
        )
    fs.rm(path, recursive=True)


def open_output_group(url: str, fmt: NgffFormat, storage_options: dict | None = None, mode: str = "a") -> zarr.Group:
    """Create or open a group for writing.

    ``mode`` is 'a' (open or create), 'r+' (must exist) or 'w-' (must not
    exist). Mode 'w' is only accepted for a store that does not exist yet:
    truncating an existing output would destroy resumable work.
    """
    url = str(url)
    exists = store_exists(url, storage_options)
    if mode == "w":
        if exists:
            raise NgffError(f"refusing to open existing {url} with mode 'w' (it would erase it)")
        mode = "w-"
    if mode not in ("a", "r+", "w-"):
        raise ValueError(f"mode must be 'a', 'r+' or 'w-', not {mode!r}")
    if mode == "w-" and exists:
        raise NgffError(f"{url} already exists")
    if mode == "r+" and not exists:
        raise NgffError(f"{url} does not exist")
    store = make_store(url, storage_options, read_only=False)
    if exists:
        try:
            group = zarr.open_group(store, mode="r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            if mode == "r+":
                raise NgffError(f"{url} is not a zarr group") from None
            # An empty directory / prefix: create the group in it.
            return zarr.open_group(store, mode="a", zarr_format=fmt.zarr_format)
        if group.metadata.zarr_format != fmt.zarr_format:
            raise NgffError(
                f"{url} is a zarr v{group.metadata.zarr_format} group; NGFF {fmt.version} needs zarr v{fmt.zarr_format}"
            )
        return group
    return zarr.open_group(store, mode="w-", zarr_format=fmt.zarr_format)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


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
        from .chunks import read_region

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


def _detect_format(group: zarr.Group, where: str) -> tuple[NgffFormat, dict]:
    """The format whose metadata the group holds, and that metadata: each format of the group's
    zarr format is asked in turn whether it reads the declared version (a new version is one more
    registered class, on either zarr format)."""
    attrs = group.attrs.asdict()
    candidates = [f for f in _FORMATS.values() if f.zarr_format == group.metadata.zarr_format]
    if not candidates:
        raise NgffError(f"no OME-Zarr image at {where}: zarr format {group.metadata.zarr_format} holds no NGFF version")
    ome = candidates[0].ome_attrs(attrs)
    if (ome or {}).get("multiscales") is None:
        if "bioformats2raw.layout" in (ome or {}) or "bioformats2raw.layout" in attrs:
            raise NgffError(
                f"no OME-Zarr image at {where}: a bioformats2raw container; open its image, e.g. {where.rstrip('/')}/0"
            )
        raise NgffError(f"no OME-Zarr image at {where}: no 'multiscales' metadata")
    fmt = next((f for f in candidates if f.reads(f.stored_version(f.ome_attrs(attrs)))), None)
    if fmt is None:  # a foreign version is named before its layout is judged
        raise NgffError(f"no OME-Zarr image at {where}: unsupported NGFF version {candidates[0].stored_version(ome)}")
    ome = fmt.ome_attrs(attrs)
    _check_multiscales(ome["multiscales"], where)
    return fmt, ome


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
        from .convert import is_tiff  # convert imports this module

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
    fmt, ome = _detect_format(group, where)
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
# Coordinate transforms
# --------------------------------------------------------------------------


def _per_axis(factors: int | float | Sequence, n: int) -> list[float]:
    if isinstance(factors, (int, float, np.integer, np.floating)):
        return [float(factors)] * n
    factors = [float(f) for f in factors]
    if len(factors) != n:
        raise ValueError(f"{len(factors)} factors for {n} axes")
    return factors


def upsampled_transform(
    scale: Sequence[float], translation: Sequence[float], factors: int | Sequence[int]
) -> tuple[list[float], list[float]]:
    """Scale/translation of a level upsampled by integer ``factors`` (pixel-centre convention).

    New voxel ``i`` sits at old index ``(i + 0.5)/f - 0.5``, so the image
    extent (and hence its physical centre) is unchanged:
    scale ``s/f``, translation ``t + (s/f - s)/2``. Use ``f=1`` for axes
    that are not upsampled.
    """
    f = _per_axis(factors, len(scale))
    new_scale = [s / fi for s, fi in zip(scale, f)]
    new_trans = [t + (ns - s) / 2 for t, s, ns in zip(translation, scale, new_scale)]
    return new_scale, new_trans


def downsampled_transform(
    scale0: Sequence[float], translation0: Sequence[float], D: int | Sequence[int]
) -> tuple[list[float], list[float]]:
    """Scale/translation of a level block-averaged by cumulative factor ``D`` from level 0.

    A coarse voxel is the mean of ``D`` fine voxels, so its centre is the
    centre of that block: scale ``s0*D``, translation ``t0 + (s0*D - s0)/2``.
    """
    d = _per_axis(D, len(scale0))
    new_scale = [s * di for s, di in zip(scale0, d)]
    new_trans = [t + (ns - s) / 2 for t, s, ns in zip(translation0, scale0, new_scale)]
    return new_scale, new_trans


# --------------------------------------------------------------------------
# Writing metadata
# --------------------------------------------------------------------------


def multiscales_metadata(
    axes: Sequence[dict],
    datasets: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    name: str | None = None,
    version: str = "0.5",
    extra: dict | None = None,
) -> dict:
    """Build the OME dict ``{"multiscales": [...]}`` for one image.

    ``datasets`` is ``(path, scale, translation)`` per level, level 0 first.
    ``extra`` keys (e.g. ``type``, ``metadata``) go into the multiscales
    entry. Pass the result (plus ``omero`` if wanted) to
    ``fmt.write_ome_attrs`` once all data is written.
    """
    fmt = format_for(version)
    axes = [dict(a) for a in axes]
    ndim = len(axes)
    out_datasets = []
    for path, scale, translation in datasets:
        scale = [float(v) for v in scale]
        translation = [float(v) for v in translation]
        if len(scale) != ndim or len(translation) != ndim:
            raise ValueError(f"dataset '{path}': scale/translation length must be {ndim}")
        out_datasets.append(
            {
                "path": str(path),
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": translation},
                ],
            }
        )
    entry: dict[str, Any] = {"axes": axes, "datasets": out_datasets}
    if name is not None:
        entry["name"] = name
    if extra:
        entry.update(copy.deepcopy(extra))
    return {"multiscales": [fmt.multiscale_entry(entry)]}


# --------------------------------------------------------------------------
# Viewer metadata: spec axis names, units, display windows (``omero``), image names
# --------------------------------------------------------------------------

# The NGFF unit names (the spec's list, from UDUNITS-2) for the spellings microscopes write.
_UNIT_ALIASES = {
    "m": "meter",
    "meter": "meter",
    "metre": "meter",
    "cm": "centimeter",
    "mm": "millimeter",
    "um": "micrometer",
    "µm": "micrometer",
    "μm": "micrometer",
    "micron": "micrometer",
    "microns": "micrometer",
    "micrometre": "micrometer",
    "\\u00b5m": "micrometer",
    "nm": "nanometer",
    "nanometre": "nanometer",
    "pm": "picometer",
    "a": "angstrom",
    "å": "angstrom",
    "Å": "angstrom",
    "ångström": "angstrom",
    "km": "kilometer",
    "in": "inch",
    "ft": "foot",
    "s": "second",
    "sec": "second",
    "ms": "millisecond",
    "us": "microsecond",
    "µs": "microsecond",
    "μs": "microsecond",
    "ns": "nanosecond",
    "min": "minute",
    "h": "hour",
    "hr": "hour",
}
NGFF_SPACE_UNITS = frozenset(
    (
        "angstrom",
        "attometer",
        "centimeter",
        "decimeter",
        "exameter",
        "femtometer",
        "foot",
        "gigameter",
        "hectometer",
        "inch",
        "kilometer",
        "megameter",
        "meter",
        "micrometer",
        "mile",
        "millimeter",
        "nanometer",
        "parsec",
        "petameter",
        "picometer",
        "terameter",
        "yard",
        "yoctometer",
        "yottameter",
        "zeptometer",
        "zettameter",
    )
)
NGFF_TIME_UNITS = frozenset(
    (
        "attosecond",
        "centisecond",
        "day",
        "decisecond",
        "exasecond",
        "femtosecond",
        "gigasecond",
        "hectosecond",
        "hour",
        "kilosecond",
        "megasecond",
        "microsecond",
        "millisecond",
        "minute",
        "nanosecond",
        "petasecond",
        "picosecond",
        "second",
        "terasecond",
        "yoctosecond",
        "yottasecond",
        "zeptosecond",
        "zettasecond",
    )
)
_COLORS = ("00FF00", "FF00FF", "00FFFF", "FF0000", "0000FF", "FFFF00", "FFFFFF")
# voxels read to choose a display window: whole chunks spread over the level, never the whole of a big one
WINDOW_VOXELS = 1 << 22


def ngff_unit(unit: str | None) -> str | None:
    """The NGFF name of a unit ("nm" -> "nanometer", "µm" / "micron" -> "micrometer"); a name the
    spec already uses, or one not known here, is returned as given (lower-cased when that is a spec name)."""
    if unit is None:
        return None
    u = str(unit).strip()
    if not u:
        return None
    if u.lower() in NGFF_SPACE_UNITS or u.lower() in NGFF_TIME_UNITS:
        return u.lower()
    return _UNIT_ALIASES.get(u, _UNIT_ALIASES.get(u.lower(), u))


def spec_axes(axes: Sequence[dict]) -> list[dict]:
    """Axes as the spec writes them: lower-case names and types, NGFF unit names
    (iohub's "T C Z Y X" -> "t c z y x", "µm" -> "micrometer")."""
    out = []
    for a in axes:
        a = dict(a)
        a["name"] = str(a["name"]).lower()
        if isinstance(a.get("type"), str):
            a["type"] = a["type"].lower()
        if "unit" in a:
            a["unit"] = ngff_unit(a["unit"])
            if a["unit"] is None:
                del a["unit"]
        out.append(a)
    return out


def scale_label(factors: Sequence[int] | int) -> str:
    """ "x2" for equal factors, "x(4,2,2)" otherwise."""
    f = [int(v) for v in np.atleast_1d(factors)]
    return f"x{f[0]}" if len(set(f)) == 1 else "x(" + ",".join(map(str, f)) + ")"


def enhanced_name(name: str | None, factors: Sequence[int] | int) -> str:
    """The output image's name: the input's with " (svision x2)", so viewers tell the layers apart."""
    return f"{name or 'image'} (svision {scale_label(factors)})"


def _sample(level, max_voxels: int | None = None) -> np.ndarray:
    """The whole level when small, else whole chunks spread evenly over it (chunk reads only);
    at most ``max_voxels`` (default ``WINDOW_VOXELS``) are read."""
    if max_voxels is None:
        max_voxels = WINDOW_VOXELS
    shape = tuple(int(n) for n in level.shape)
    if int(np.prod(shape, dtype=np.int64)) <= max_voxels or not hasattr(level, "chunks"):
        return np.asarray(level[...])
    chunks = tuple(int(c) for c in (getattr(level, "shards", None) or level.chunks))
    if int(np.prod(chunks, dtype=np.int64)) > max_voxels:
        chunks = tuple(int(c) for c in level.chunks)
    grid = [-(-n // c) for n, c in zip(shape, chunks)]
    per = max(1, int(np.prod(chunks, dtype=np.int64)))
    k = max(1, min(int(np.prod(grid)), max_voxels // per))
    picks = np.unique(np.linspace(0, int(np.prod(grid)) - 1, k).round().astype(np.int64))
    parts = []
    for flat in picks:
        idx = np.unravel_index(int(flat), grid)
        sl = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, chunks, shape))
        parts.append(np.asarray(level[sl]).reshape(-1))
    return np.concatenate(parts)


def display_window(data, dtype=None, percentiles: tuple[float, float] = (0.1, 99.9)) -> dict:
    """One channel's ``omero`` window: start/end at robust percentiles of ``data``, min/max the
    range a viewer's slider may cover (the dtype's range for integers, the data's for floats).
    ``data``: an array (a coarse level, or one channel of it)."""
    d = np.asarray(data).reshape(-1)
    dtype = np.dtype(dtype if dtype is not None else d.dtype)
    if d.dtype == bool:  # a mask (a 1-bit TIFF): numpy's percentile cannot subtract booleans
        d = d.astype(np.uint8)
    if np.issubdtype(d.dtype, np.floating):
        d = d[np.isfinite(d)]
    if d.size:
        lo, hi = (float(v) for v in np.percentile(d, list(percentiles)))
        dmin, dmax = float(d.min()), float(d.max())
    else:
        lo = hi = dmin = dmax = 0.0
    if np.issubdtype(dtype, np.integer):
        dmin, dmax = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    if hi <= lo:
        hi = lo + 1.0
    dmin, dmax = min(dmin, lo), max(dmax, hi)
    return {"min": dmin, "max": dmax, "start": lo, "end": hi}


def usable_omero(omero) -> dict | None:
    """An input's ``omero`` block as far as it is well-formed. It holds rendering hints only, which an
    output carries over where it can: a malformed block (not an object, ``channels`` not a list, a
    channel not an object) must not fail a run after its compute, so those parts read as absent."""
    if not isinstance(omero, dict):
        return None
    channels = omero.get("channels")
    kept = [c if isinstance(c, dict) else {} for c in channels] if isinstance(channels, list) else []
    return {**omero, "channels": kept}


def _hint(value, kind, default):
    """``kind(value)`` for a rendering hint carried over from an input, ``default`` where it is malformed."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        return default


def omero_metadata(
    level,
    axis_names: Sequence[str],
    dtype=None,
    version: str = "0.5",
    labels: Sequence[str] | None = None,
    colors: Sequence[str] | None = None,
    name: str | None = None,
    previous: dict | None = None,
    channels: Sequence[int] | None = None,
) -> dict:
    """An ``omero`` block for an image whose coarse level is ``level`` (array or zarr array; big
    levels are sampled by whole chunks): one channel per index along ``c`` (or one), windows from
    the 0.1/99.9 percentiles, ``version`` = the output's NGFF version.

    ``previous``: an input's ``omero`` to carry over (labels, colours, activity, and windows that
    are valid); ``channels`` picks which of its channels the image holds (default: the first ones).
    ``labels`` / ``colors`` override both."""
    names = [str(a).lower() for a in axis_names]
    data = _sample(level) if "c" not in names else None
    dtype = np.dtype(dtype if dtype is not None else level.dtype)
    if "c" in names:
        ca = names.index("c")
        nc = int(level.shape[ca])
        per_channel = []
        for i in range(nc):
            sel = tuple(slice(i, i + 1) if j == ca else slice(None) for j in range(len(names)))
            per_channel.append(_sample(_Sub(level, sel), max(1, WINDOW_VOXELS // max(1, min(nc, 8)))))
    else:
        nc = 1
        per_channel = [data]
    old = (usable_omero(previous) or {}).get("channels") or []
    picks = list(channels) if channels is not None else list(range(nc))
    out = []
    for i, d in enumerate(per_channel):
        src = old[picks[i]] if i < len(picks) and 0 <= picks[i] < len(old) else {}
        win = display_window(d, dtype)
        w_old = src.get("window") or {}
        try:  # an input's own window (a person chose it) stays, if it is a real interval
            if float(w_old["end"]) > float(w_old["start"]):
                win.update(start=float(w_old["start"]), end=float(w_old["end"]))
                win["min"], win["max"] = min(win["min"], win["start"]), max(win["max"], win["end"])
        except (KeyError, TypeError, ValueError):
            pass
        label = (labels[i] if labels is not None and i < len(labels) else None) or src.get("label") or f"ch{i}"
        color = (
            (colors[i] if colors is not None and i < len(colors) else None)
            or src.get("color")
            or ("FFFFFF" if nc == 1 else _COLORS[i % len(_COLORS)])
        )
        out.append(
            {
                "label": str(label),
                "color": str(color).upper().lstrip("#"),
                "active": bool(src.get("active", True)),
                "coefficient": _hint(src.get("coefficient", 1.0), float, 1.0),
                "family": str(src.get("family", "linear")),
                "inverted": bool(src.get("inverted", False)),
                "window": win,
            }
        )
    omero: dict[str, Any] = {
        "version": str(version),
        "channels": out,
        "rdefs": {"model": "greyscale" if nc == 1 else "color"},
    }
    if name is not None:
        omero["name"] = str(name)
    for k in ("id",):
        if previous and k in previous:
            omero[k] = previous[k]
    return omero


class _Sub:
    """A lazily indexed part of an array (one channel), so ``_sample`` reads only what it needs."""

    def __init__(self, arr, sel):
        self.arr = arr
        self.sel = tuple(slice(*s.indices(int(n))[:2]) for s, n in zip(sel, arr.shape))
        self.shape = tuple(s.stop - s.start for s in self.sel)
        self.dtype = arr.dtype
        if hasattr(arr, "chunks"):
            self.chunks = tuple(min(int(c), n) for c, n in zip(arr.chunks, self.shape))

    def __getitem__(self, key):
        if key is Ellipsis:
            key = tuple(slice(None) for _ in self.shape)
        full = tuple(
            slice(s.start + (k.start or 0), s.start + (k.stop if k.stop is not None else n))
            for s, k, n in zip(self.sel, key, self.shape)
        )
        return np.asarray(self.arr[full])


def viewer_metadata(
    ome: dict, image: Image, level, version: str, factors: Sequence[int] | int, channel: int | None = None
) -> dict:
    """Finish an enhanced output's OME dict for viewers: the spec's lower-case axes, the name with
    " (svision x2)", and an ``omero`` block (windows from the output's coarse ``level``; the
    input's labels, colours and windows carried over; ``version`` = the output's ``version``).
    ``channel``: the input channel the output holds, when only one was enhanced."""
    ome = copy.deepcopy(ome)
    entry = ome["multiscales"][0]
    entry["axes"] = spec_axes(entry.get("axes") or image.axes)
    entry["name"] = enhanced_name(image.name, factors)
    names = [a["name"] for a in entry["axes"]]
    ome["omero"] = omero_metadata(
        level,
        names,
        version=version,
        previous=image.omero,
        channels=None if channel is None else [channel],
        name=entry["name"],
    )
    return ome


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
