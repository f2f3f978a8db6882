"""Look at an input and its enhanced output together in napari, each where its metadata puts it.

``napari-ome-zarr`` (0.10) applies only the first coordinate transformation of a dataset, so an
enhanced layer, whose translation is half an input voxel minus half an output voxel, appears
shifted by half an output voxel. Here every transformation is composed (the datasets' scale and
translation, then the multiscale-level ones, as ``ngff.open_image`` reads them), so a bead sits at
the same world position in both layers. Colours, channel names and display windows come from
``omero``.

napari is optional: ``pip install "svision-big[view]"`` (napari with PyQt6) to open a window. Without
Qt, :func:`add_image` still fills a headless ``napari.components.ViewerModel``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .ngff import Image, open_image

__all__ = ["layer_kwargs", "add_image", "view"]


def _colormap(hex_color: str | None, name: str):
    """A linear black-to-``hex_color`` napari colormap."""
    from napari.utils.colormaps import Colormap

    h = (hex_color or "FFFFFF").lstrip("#").upper()
    try:
        rgb = [int(h[i : i + 2], 16) / 255.0 for i in (0, 2, 4)]
    except ValueError:
        rgb = [1.0, 1.0, 1.0]
    return Colormap([[0.0, 0.0, 0.0, 1.0], [*rgb, 1.0]], name=f"{name} #{h}")


def layer_kwargs(image: Image, name: str | None = None) -> tuple[list, dict]:
    """(multiscale data, keyword arguments of ``viewer.add_image``) for an OME-Zarr image.

    The data are the pyramid's levels as dask arrays (nothing is read until napari draws). Scale
    and translate are the level-0 transform with every coordinateTransformation composed; a
    channel axis becomes napari's ``channel_axis`` with the ``omero`` labels, colours and windows.
    """
    import dask.array as da

    levels = [da.from_zarr(image.level(i)) for i in range(image.nlevels)]
    names = image.axis_names
    lower = [n.lower() for n in names]
    cax = lower.index("c") if "c" in lower else None
    keep = [i for i in range(image.ndim) if i != cax]
    scale = [float(image.scales[0][i]) for i in keep]
    translate = [float(image.translations[0][i]) for i in keep]
    units = [image.axes[i].get("unit") for i in keep]
    base = name or image.name or os.path.basename(str(image.url or "image").rstrip("/"))
    channels = list((image.omero or {}).get("channels") or [])
    nch = image.shape[cax] if cax is not None else 1
    labels, colormaps, limits, visible = [], [], [], []
    for i in range(nch):
        ch = channels[i] if i < len(channels) else {}
        label = ch.get("label") or (f"ch{i}" if nch > 1 else "")
        labels.append(f"{base} {label}".strip() if nch > 1 else base)
        colormaps.append(_colormap(ch.get("color") or ("FFFFFF" if nch == 1 else None), labels[-1]))
        w = ch.get("window") or {}
        try:
            lo, hi = float(w["start"]), float(w["end"])
            limits.append([lo, hi] if hi > lo else None)
        except (KeyError, TypeError, ValueError):
            limits.append(None)
        visible.append(bool(ch.get("active", True)))
    kwargs: dict[str, Any] = {
        "multiscale": len(levels) > 1,
        "scale": scale,
        "translate": translate,
        "axis_labels": [names[i] for i in keep],
        "units": [u or "pixel" for u in units],
        "metadata": {"url": image.url, "ngff": image.fmt.version, "omero": image.omero},
    }
    if cax is not None:
        kwargs.update(channel_axis=cax, name=labels, colormap=colormaps, visible=visible, blending="additive")
        if all(lim is not None for lim in limits):
            kwargs["contrast_limits"] = limits
    else:
        kwargs.update(name=labels[0], colormap=colormaps[0], visible=visible[0])
        if limits[0] is not None:
            kwargs["contrast_limits"] = limits[0]
    return (levels if len(levels) > 1 else levels[0]), kwargs


def _supported(viewer_add, kwargs: dict) -> dict:
    """Drop keyword arguments this napari's ``add_image`` does not know (axis_labels, units:
    napari >= 0.6)."""
    import inspect

    try:
        params = inspect.signature(viewer_add).parameters
    except (TypeError, ValueError):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def add_image(viewer, url: str | os.PathLike, storage_options: dict | None = None, name: str | None = None) -> list:
    """Add an OME-Zarr image to ``viewer`` (a ``napari.Viewer`` or a headless ``ViewerModel``) at its
    true scale and translation; returns the layers (one per channel)."""
    image = open_image(url, storage_options)
    data, kwargs = layer_kwargs(image, name)
    kwargs = _supported(viewer.add_image, kwargs)
    try:
        layers = viewer.add_image(data, **kwargs)
    except Exception:  # a unit napari's pint does not know: place the layer without units
        if "units" not in kwargs:
            raise
        kwargs.pop("units")
        layers = viewer.add_image(data, **kwargs)
    return layers if isinstance(layers, list) else [layers]


def view(
    input: str | os.PathLike,
    output: str | os.PathLike,
    storage_options: dict | None = None,
    output_storage_options: dict | None = None,
    viewer=None,
    show: bool = True,
):
    """Open napari with the input and the enhanced output, each at its true scale and translation,
    with the ``omero`` colours and windows. Returns the viewer.

    ``viewer``: an existing viewer or ``ViewerModel`` to fill (then no window is opened or run).
    Otherwise a ``napari.Viewer`` is created (this needs Qt) and, when ``show``, run until closed.
    """
    own = viewer is None
    if own:
        need = 'svision-big view needs napari with a Qt binding: pip install "svision-big[view]"'
        try:
            import napari
        except ImportError:
            raise RuntimeError(need) from None
        try:  # napari imports without Qt; its window does not ("No Qt bindings could be found")
            viewer = napari.Viewer(title=f"svision-big: {os.fspath(input)} | {os.fspath(output)}")
        except ImportError as exc:
            raise RuntimeError(f"{need} ({exc})") from None
    add_image(viewer, input, storage_options)
    out_layers = add_image(
        viewer, output, output_storage_options if output_storage_options is not None else storage_options
    )
    if hasattr(viewer, "layers") and out_layers:
        viewer.layers.selection.active = out_layers[0]
    if own and show:
        import napari

        try:  # napari 0.9 makes its Viewer without Qt and fails here, at its event loop
            napari.run()
        except ImportError as exc:
            raise RuntimeError(f"{need} ({str(exc).strip().splitlines()[0]})") from None
    return viewer


def world_position(layer, index) -> np.ndarray:
    """World coordinates of a (fractional) data index of a napari layer's level 0."""
    return np.asarray(layer.data_to_world(np.asarray(index, dtype=float)), dtype=float)
