"""Coordinate transforms of the levels an image gains (upsampled) or is built from (downsampled),
and the ``multiscales`` metadata that records them.

Written here rather than by ome-zarr-py (see docs/architecture.md): its ``write_multiscale(scale=...)``
writes translations in the wrong units and ``write_image(compute=False)`` writes metadata before the
data exists.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from .format import DEFAULT_VERSION, format_for

__all__ = ["upsampled_transform", "downsampled_transform", "multiscales_metadata"]


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


def multiscales_metadata(
    axes: Sequence[dict],
    datasets: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    name: str | None = None,
    version: str = DEFAULT_VERSION,
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
