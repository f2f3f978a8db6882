"""What a TIFF says about itself (``tiff_metadata`` -> ``TiffMetadata``): OME-XML (PhysicalSizeZ/Y/X
and their units, channel names and colours, the image name) and ImageJ hyperstacks (``spacing``,
``unit``, the X/Y resolution tags, display ranges, channel labels). Units become NGFF names
("nm" -> "nanometer")."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from .ngff.viewer import ngff_unit


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
