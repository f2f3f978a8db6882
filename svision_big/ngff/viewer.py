"""What viewers read besides the pixels: the spec's axis names and unit names, display windows and
channel colours (the ``omero`` block), and the enhanced image's name."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from .format import DEFAULT_VERSION

if TYPE_CHECKING:
    from .image import Image

__all__ = [
    "ngff_unit",
    "spec_axes",
    "scale_label",
    "enhanced_name",
    "display_window",
    "usable_omero",
    "omero_metadata",
    "viewer_metadata",
    "NGFF_SPACE_UNITS",
    "NGFF_TIME_UNITS",
    "WINDOW_VOXELS",
]

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


@dataclass(frozen=True)
class OmeroOptions:
    """``omero_metadata``'s parameters after the axis names, each declared once (positionally in this
    order too)."""

    dtype: Any = field(default=None, metadata={"help": "the image's dtype (default: the level's)"})
    version: str = field(default=DEFAULT_VERSION, metadata={"help": "the output's NGFF version"})
    labels: Sequence[str] | None = field(default=None, metadata={"help": "channel labels"})
    colors: Sequence[str] | None = field(default=None, metadata={"help": "channel colours"})
    name: str | None = field(default=None, metadata={"help": "the image's name"})
    previous: dict | None = field(default=None, metadata={"help": "an input's omero block to carry over"})
    channels: Sequence[int] | None = field(default=None, metadata={"help": "which of its channels the image holds"})


OMERO_POSITIONAL = tuple(f.name for f in fields(OmeroOptions))


def omero_metadata(level, axis_names: Sequence[str], *args, **options) -> dict:
    """An ``omero`` block for an image whose coarse level is ``level`` (array or zarr array; big
    levels are sampled by whole chunks): one channel per index along ``c`` (or one), windows from
    the 0.1/99.9 percentiles, ``version`` = the output's NGFF version. The rest are
    ``OmeroOptions``' fields (``dtype``, ``version``, ``labels``, ``colors``, ``name``,
    ``previous``, ``channels``).

    ``previous``: an input's ``omero`` to carry over (labels, colours, activity, and windows that
    are valid); ``channels`` picks which of its channels the image holds (default: the first ones).
    ``labels`` / ``colors`` override both."""
    from ..options import keywords  # options imports this package

    o = keywords("omero_metadata", OmeroOptions, options, args, OMERO_POSITIONAL, lead=2)
    dtype, version, labels, colors, name, previous, channels = (getattr(o, f) for f in OMERO_POSITIONAL)
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
