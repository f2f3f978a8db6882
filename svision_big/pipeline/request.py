"""One enhance request, checked once and resolved into the frozen ``EnhanceRun`` its steps read.

Every check that needs no write runs here, before the output is locked or touched: the settings
(``_check_request``, also before ``run`` trains), the model(s) against the image, the layout,
the output's format and dtype, the input's range and finiteness, the output store. ``resolve``
returns the run: input, output, settings, image, models, outer axes, layout, background
decision, fingerprint and provenance, and the output's state.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .. import background as bgd
from ..model import Model, load_model
from ..ngff import Image, NgffError, format_for, open_image
from ..operator import precision_dtype, resolve_precision
from ..options import EnhanceSettings
from ..state import OutputState
from ..store import same_or_nested
from .cluster import _check_device, _default_device
from .identity import _identity
from .layout import Layout, Outer, _outer_layout, layout


@dataclass(frozen=True)
class EnhanceRun:
    """One ``enhance``, resolved once (``resolve``): everything its steps read."""

    input: str
    output: str
    settings: EnhanceSettings  # checked: the output's storage options, the threshold and the precision resolved
    image: Image
    models: list[Model]
    outer: Outer
    lay: Layout  # with the output's format and dtype
    skip: Any  # ``--skip-background``'s decision (background.decide), or None
    fp: str  # the fingerprint
    provenance: dict
    state: OutputState


def resolve(input: str, output: str, model, settings: EnhanceSettings) -> EnhanceRun:
    """The checked, resolved run; nothing is written."""
    s = _check_request(input, output, settings)
    image = open_image(input, s.storage_options)
    models = _models_for(image, model, input)
    outer = _outer_layout(image, s.channel, len(models), input)
    lay = _output_format(image, input, output, layout(image, models, outer, s.block, s.shards, s.force), s)
    skip = _background(image, models, outer, lay, s)
    fp, provenance = _identity(input, image, models, lay, s, skip)
    state = OutputState(output, s.output_storage_options)
    return EnhanceRun(input, output, s, image, models, outer, lay, skip, fp, provenance, state)


def _as_model(m: Model | str | os.PathLike) -> Model:
    if isinstance(m, Model):
        return m
    path = os.fspath(m)
    if "://" not in path and os.path.isdir(path):  # open() would print a raw errno
        raise ValueError(f"model file {path} is a directory, not an svision-big model file")
    if "://" not in path and os.path.exists(path) and not os.access(path, os.R_OK):
        raise ValueError(f"model file {path} cannot be read (permission denied)")
    return load_model(path)


def _check_workers(workers: int | None) -> None:
    """A LocalCluster of -1 workers hung (killed at 300 s); 0 silently meant one per core."""
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        raise ValueError(f"--workers {workers}: need at least 1 worker")


def _check_training_args(steps: int | None, budget: int, seed: int = 0) -> None:
    """Before any data is read: a budget of 0 voxels never stopped shrinking the training box."""
    if not 0 <= seed < 2**63:  # `--seed 10**21` was "Overflow when unpacking long long" from torch
        raise ValueError(f"--seed {seed}: use a whole number from 0 to 2^63 - 1")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps {steps}: need at least 1 training step")
    if budget < 1:
        raise ValueError(f"--budget {budget}: need a positive number of voxels to train on")


def _output_dtype(dtype: str | None, image_dtype) -> str:
    """The output's dtype name; `--dtype bogus` was a TypeError from numpy."""
    try:
        dt = np.dtype(dtype) if dtype is not None else np.dtype(image_dtype)
    except TypeError:
        raise ValueError(f"--dtype {dtype}: not a data type (e.g. uint8, uint16, float32)") from None
    if dt.kind not in "uif":
        if dtype is None:
            raise ValueError(f"the input's dtype is {dt.name}: pass --dtype with an integer or floating-point type")
        raise ValueError(f"--dtype {dtype}: the output needs an integer or floating-point type, not {dt.name}")
    return dt.name


F32_MAX = float(np.finfo(np.float32).max)


def _coarse_peak(image: Image, max_voxels: int = 2**24) -> tuple[int, float] | None:
    """(level, largest finite magnitude) of the coarsest level, or None where it is too large to read."""
    level = image.nlevels - 1
    arr = image.level(level)
    if math.prod(arr.shape) > max_voxels:
        return None
    a = np.abs(image.read(level).astype(np.float64))
    a = a[np.isfinite(a)]
    return level, float(a.max()) if a.size else 0.0


def _check_range(image: Image, input: str, dtype: str) -> None:
    """Values the float32 working precision or a float output type cannot hold are refused before
    anything is written (a float64 input near 1e300 came out all NaN/Inf; --dtype float16 on int32
    data wrote 99.98% Inf)."""
    got = _coarse_peak(image) if np.dtype(image.dtype).itemsize >= 4 or np.dtype(dtype).kind == "f" else None
    if got is None:
        return
    level, peak = got
    if peak > F32_MAX:
        raise NgffError(
            f"{input}: values up to {peak:.3g} on level {level} exceed float32's range ({F32_MAX:.3g}), the "
            f"working precision: rescale the input"
        )
    out = np.dtype(dtype)
    if out.kind == "f" and peak > float(np.finfo(out).max):
        raise ValueError(
            f"--dtype {out.name} holds values up to {float(np.finfo(out).max):.6g}, but {input} reaches "
            f"{peak:.6g} (level {level}): choose float32 or an integer type"
        )


def _check_nonfinite(mode: str) -> None:
    from ..inputcheck import NONFINITE

    if mode not in NONFINITE:
        raise ValueError(f"--nonfinite {mode}: use one of {', '.join(NONFINITE)}")


def _check_coarse_finite(image: Image, input: str, max_voxels: int = 2**24) -> None:
    """NaN/Inf in a float input, found on its coarsest level (a mean pyramid carries them up)
    before anything is written; the blocks check every voxel they read as well."""
    if np.dtype(image.dtype).kind != "f":
        return
    level = image.nlevels - 1
    arr = image.level(level)
    if math.prod(arr.shape) > max_voxels:
        return
    n = int(np.count_nonzero(~np.isfinite(image.read(level))))
    if n:
        raise NgffError(
            f"{input}: {n:,} NaN/Inf voxels on level {level} of {math.prod(arr.shape):,}: a network "
            f"spreads them over the output; pass --nonfinite fill to read them as the fill value"
        )


def _output_options(input: str, output: str, storage_options: dict | None, output_storage_options: dict | None):
    """The output's fsspec options: its own, else the input's when both live on the same kind of
    remote store (so an S3 output inherits --storage-options)."""
    if output_storage_options is not None:
        return output_storage_options
    proto = lambda u: u.split("://", 1)[0] if "://" in u and not u.startswith("file://") else None  # noqa: E731
    return storage_options if proto(output) is not None and proto(output) == proto(input) else None


def _check_reachable(url: str, options: dict | None, what: str) -> None:
    """A remote store that cannot be reached fails here, as one line, before any training or write
    (not as a botocore traceback after training)."""
    if "://" not in url or url.startswith("file://"):
        return  # a local folder is made as needed
    import fsspec.core

    try:
        fs, path = fsspec.core.url_to_fs(url, **(options or {}))
        if not fs.exists(path):
            bucket = path.strip("/").split("/", 1)[0]
            if bucket and bucket != path.strip("/") and not fs.exists(bucket):
                raise NgffError(f"the {what} {url}: {bucket} does not exist on that store")
    except NgffError:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp, gcsfs ... each have their own
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NgffError(
            f"cannot reach the {what} store {url}: {cause} (check --{'output-' if what == 'output' else ''}"
            f"storage-options)"
        ) from None


def _check_request(input: str, output: str, s: EnhanceSettings) -> EnhanceSettings:
    """What can be checked before the input is opened (and, in ``run``, before training); returns the
    settings with the output's storage options resolved."""
    _check_workers(s.workers)
    _check_nonfinite(s.nonfinite)
    s = replace(s, skip_background=bgd.parse_threshold(s.skip_background))  # a bad threshold fails first
    s = replace(s, output_storage_options=_output_options(input, output, s.storage_options, s.output_storage_options))
    if s.client is None and s.scheduler in (None, "sync"):
        _check_device(s.device)  # a remote cluster's workers are asked once it is open
    device = s.device or _default_device()
    s = replace(s, precision=resolve_precision(s.precision, device))  # "auto": what this machine runs fastest
    precision_dtype(s.precision, device)  # a bad name fails before anything is opened
    if same_or_nested(input, output):
        raise NgffError(f"the output {output} must not be the input or lie inside it (or contain it)")
    return s


def _check_models_outside(model, output: str) -> None:
    """Replacing the output must not delete the model file this run reads (``--model OUT/x.svb``)."""
    for m in model if isinstance(model, (list, tuple)) else [model]:
        if isinstance(m, (str, os.PathLike)) and same_or_nested(os.fspath(m), output):
            raise NgffError(
                f"the model {os.fspath(m)} lies inside the output {output}, which --overwrite would delete: "
                f"move the model out of it first"
            )


def _models_for(image: Image, model, input: str) -> list[Model]:
    """The model(s), loaded, and checked against each other and the image."""
    models = [_as_model(m) for m in (model if isinstance(model, (list, tuple)) else [model])]
    factors = models[0].factors
    if any(m.factors != factors for m in models):
        raise ValueError("all per-channel models must share the same factors")
    if len(image.spatial_axes) != len(factors):
        raise NgffError(f"the model is {len(factors)}D but {input} has {len(image.spatial_axes)} spatial axes")
    if any(m.norm.ceiling is not None for m in models):
        got = _coarse_peak(image)
        models = [_own_ceiling(m, None if got is None else got[1], input) for m in models]
    return models


def _own_ceiling(model: Model, peak: float | None, input: str) -> Model:
    """A saturation ceiling belongs to the data the model was trained on, not to the model: where the
    input being enhanced goes above it (its coarsest level's peak), the ceiling is not this input's
    and is dropped, with a note (a channel saturating at 4095 clipped 99.3% of another channel; a
    model trained on a uint8 export clipped 97.8% of uint16 data to 255). The model's hash, and so the
    fingerprint, changes with it."""
    c = model.norm.ceiling
    if c is None or peak is None or peak <= c:
        return model
    print(
        f"svision-big: note: the model's saturation ceiling {c:g} is not {input}'s (it reaches {peak:g}): not applied",
        file=sys.stderr,
        flush=True,
    )
    return Model(
        stages=model.stages,
        norm=replace(model.norm, ceiling=None),
        factors=model.factors,
        final=model.final,
        final_bp_iters=model.final_bp_iters,
        info={**model.info, "ceiling_dropped": c},
    )


def _output_format(image: Image, input: str, output: str, lay: Layout, s: EnhanceSettings) -> Layout:
    """The layout with the output's NGFF format and dtype, once every check that needs no write passed."""
    fmt = format_for(s.ngff or image.fmt.version)
    dtype = _output_dtype(s.dtype, image.dtype)
    fmt.check_shards(s.shards or None)
    if s.nonfinite == "error":
        _check_coarse_finite(image, input)  # most NaN/Inf inputs fail here, before anything is written
    _check_range(image, input, dtype)
    _check_reachable(output, s.output_storage_options, "output")
    return replace(lay, fmt=fmt, dtype=dtype)


def _background(image: Image, models: list[Model], outer: Outer, lay: Layout, s: EnhanceSettings):
    """``--skip-background``: which blocks of every pass are written without the network (None: off)."""
    if s.skip_background is None:
        return None
    return bgd.decide(image, s.skip_background, models, outer, lay.passes, lay.plans)
