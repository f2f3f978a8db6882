"""The end of a run: the pyramid from the stored level 0, then the OME metadata (last), the
provenance marked complete and the run's state removed."""

from __future__ import annotations

import time

from .. import __version__
from ..ngff import multiscales_metadata, upsampled_transform, viewer_metadata
from ..plan import on_axes
from ..pyramid import build_levels, pyramid_datasets, pyramid_factors
from .layout import _axis_names


def _already_complete(r) -> dict:
    return {
        "output": r.output,
        "state": "already complete",
        "fingerprint": r.fp,
        "blocks": len(r.lay.plans[-1]),
        "computed": 0,
    }


def _finish_output(r, group, provenance: dict, stats: dict, cl) -> dict:
    """The pyramid from the stored level 0, the state removed, the output marked complete (last)."""
    t0 = time.perf_counter()
    group.attrs["svision_big"] = {**provenance, "state": "building pyramid"}
    levels, built = _finish(r, group, cl)
    stats["pyramid_seconds"] = round(time.perf_counter() - t0, 3)
    stats["pyramid"] = built
    r.state.remove(r.state.work_dir(r.fp))
    group.attrs["svision_big"] = {**provenance, "state": "complete", "levels": levels}
    r.state.clean(keep_models=True)  # `run` keeps its models in the output itself
    lay = r.lay
    stats.update(output=r.output, fingerprint=r.fp, halo=list(lay.plans[-1].halo), block=list(lay.block), levels=levels)
    return stats


def _finish(r, group, client) -> tuple[list[str], list[dict]]:
    """Pyramid from the stored level 0 (resumable level by level and unit by unit with its
    done-records: see :func:`pyramid.build_levels`), then the OME metadata (last), with a display
    window for viewers taken from the coarsest level written. Returns the level paths and each
    built level's counts."""
    image, lay, s = r.image, r.lay, r.settings
    factors = r.models[0].factors
    spatial = image.spatial_axes
    coarsest = image.level(image.nlevels - 1).shape
    pf = pyramid_factors(tuple(lay.shape), spatial, min_shape=64, until_shape=tuple(coarsest))
    built = build_levels(
        group,
        lay.fmt,
        _axis_names(image),
        "0",
        spatial,
        pf,
        lay.chunks,
        lay.dtype,
        client=client,
        shards=lay.shards,
        compression=s.compression,
        url=r.output,
        storage_options=s.output_storage_options,
        done_url=lambda level: r.state.level_done_url(r.fp, level),
        progress=s.progress,
    )
    paths = [q["path"] for q in built]
    full = on_axes([1] * image.ndim, spatial, factors)
    s0, t0 = upsampled_transform(image.scales[0], image.translations[0], full)
    datasets = pyramid_datasets(s0, t0, spatial, pf, paths)
    ome = multiscales_metadata(
        image.axes,
        datasets,
        name=image.name,
        version=lay.fmt.version,
        extra={
            "type": "mean",
            "metadata": {"method": "svision_big enhance, block-mean pyramid", "version": __version__},
        },
    )
    ome = viewer_metadata(ome, image, group[paths[-1] if paths else "0"], lay.fmt.version, factors, s.channel)
    lay.fmt.write_ome_attrs(group, ome)
    return ["0", *paths], built
