"""NGFF versions: one class per version, and the registry that reading, writing and the command line
follow (modelled on ome-zarr-py's ``format.py``).

Every difference between NGFF versions (zarr v2 vs v3, where the ``ome`` attributes live, how arrays
are encoded, how a stored image declares its version) is kept in one :class:`NgffFormat` subclass, so
the rest of the package never branches on a version string. A new version is one subclass registered
in ``_FORMATS``, and its tests.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from ..store import NgffError

__all__ = [
    "NgffFormat",
    "ArrayCreation",
    "FormatV04",
    "FormatV05",
    "format_for",
    "detect_format",
    "SUPPORTED_VERSIONS",
    "DEFAULT_VERSION",
]


@dataclass(frozen=True)
class ArrayCreation:
    """``NgffFormat.create_array``'s parameters after the dimension names, each declared once."""

    shards: Sequence[int] | None = field(default=None, metadata={"help": "shard shape (NGFF 0.5 only)"})
    compression: bool = field(default=True, metadata={"help": "compress the chunks"})
    fill_value: Any = field(default=0, metadata={"help": "the value of chunks never written"})
    overwrite: bool = field(default=False, metadata={"help": "replace an array already at the path"})


ARRAY_POSITIONAL = ("shards", "compression", "fill_value", "overwrite")


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
        *args: Any,
        **options: Any,
    ) -> zarr.Array:
        """Create an image array encoded as this NGFF version requires. The rest are
        ``ArrayCreation``'s fields, positionally in its order too: ``shards`` (None), ``compression``
        (True), ``fill_value`` (0), ``overwrite`` (False)."""
        from ..options import keywords  # options imports this module

        o = keywords("create_array", ArrayCreation, options, args, ARRAY_POSITIONAL, lead=7)
        return group.create_array(
            path,
            shape=tuple(int(s) for s in shape),
            chunks=tuple(int(c) for c in chunks),
            dtype=np.dtype(dtype),
            fill_value=o.fill_value,
            overwrite=o.overwrite,
            **self.array_encoding(dimension_names, o.shards, o.compression),
        )

    @abstractmethod
    def array_encoding(self, dimension_names: Sequence[str], shards: Sequence[int] | None, compression: bool) -> dict:
        """The version's ``create_array`` keywords: compressor, chunk keys, shards, dimension names."""

    def check_shards(self, shards: Sequence[int] | None) -> None:
        """Refuse ``shards`` where this version cannot store sharded arrays (default: it can)."""
        return None

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

    def matches(self, attrs: dict, zarr_format: int) -> bool:
        """Whether a zarr group of ``zarr_format`` with the attributes ``attrs`` holds this format's
        metadata: the format detects itself (where it keeps the metadata, which versions it reads)."""
        if zarr_format != self.zarr_format:
            return False
        ome = self.ome_attrs(attrs)
        return ome is not None and self.reads(self.stored_version(ome))

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
        self.check_shards(shards)
        import numcodecs

        compressor = (
            numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE) if compression else None
        )
        return {"compressors": compressor, "chunk_key_encoding": {"name": "v2", "separator": "/"}}

    def check_shards(self, shards: Sequence[int] | None) -> None:
        if shards is not None:
            raise NgffError("sharding needs NGFF 0.5 (zarr v3); NGFF 0.4 cannot shard")

    def ome_attrs(self, attrs: dict) -> dict | None:
        return attrs  # 0.4 keeps its metadata at the group root

    def stored_version(self, ome: dict) -> str | None:
        ms = ome.get("multiscales")
        if not isinstance(ms, list) or not ms or not isinstance(ms[0], dict):
            return None  # malformed: reading (``image._check_multiscales``) names it
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


def detect_format(attrs: dict, zarr_format: int, where: str) -> tuple[NgffFormat, dict]:
    """The format whose metadata a zarr group (of ``zarr_format``, attributes ``attrs``) holds, and
    that metadata: each registered format is asked in turn whether it ``matches`` (a new version is
    one more registered class, on either zarr format). ``where`` names the group in errors."""
    candidates = [f for f in _FORMATS.values() if f.zarr_format == zarr_format]
    if not candidates:
        raise NgffError(f"no OME-Zarr image at {where}: zarr format {zarr_format} holds no NGFF version")
    ome = candidates[0].ome_attrs(attrs)
    if (ome or {}).get("multiscales") is None:
        if "bioformats2raw.layout" in (ome or {}) or "bioformats2raw.layout" in attrs:
            raise NgffError(
                f"no OME-Zarr image at {where}: a bioformats2raw container; open its image, e.g. {where.rstrip('/')}/0"
            )
        raise NgffError(f"no OME-Zarr image at {where}: no 'multiscales' metadata")
    fmt = next((f for f in candidates if f.matches(attrs, zarr_format)), None)
    if fmt is None:  # a foreign version is named before its layout is judged
        raise NgffError(f"no OME-Zarr image at {where}: unsupported NGFF version {candidates[0].stored_version(ome)}")
    return fmt, fmt.ome_attrs(attrs)
