"""``train``: a model trained on a sampled region of an OME-Zarr image, found on a coarse level so
the whole volume is never read."""

from __future__ import annotations

import math
import os

import numpy as np

from ..harmcheck import check_choice
from ..model import Model
from ..ngff import Image, NgffError, open_image
from ..noisecheck import denoise_mode
from ..options import DEFAULT_TRAIN_VOXELS, TRAIN_POSITIONAL, TrainOptions, defaults, keywords, signature
from ..plan import on_axes
from ..progress import decision
from ..settings import check_back_projection, parse_factors
from ..train import fit
from .layout import _channel_axis, _outer_selection, stored_order
from .request import _check_nonfinite, _check_training_args

# The smallest volume `fit` trains on: every spatial axis at least 5 voxels (the noise estimate's
# lag-2 second differences need 5).
MIN_TRAIN_EDGE = 5


def _box_size(shape: tuple[int, ...], budget: int) -> list[int]:
    """Shrink the longest axes first until the box holds at most ``budget`` voxels (thin z stays whole)."""
    size = list(shape)
    while math.prod(size) > budget:
        i = int(np.argmax(size))
        size[i] = max(1, int(size[i] * 0.9))
    return size


def training_region(
    image: Image, outer: dict[int, int], budget: int = DEFAULT_TRAIN_VOXELS, coarse_voxels: int = 2_000_000
) -> tuple[tuple[slice, ...], int]:
    """Where to train: a level-0 box of at most ``budget`` voxels centred on the most signal,
    found on a coarse pyramid level so the whole volume is never read. Returns (box, level used)."""
    spatial = image.spatial_axes
    shape0 = [image.shape[a] for a in spatial]
    level = image.nlevels - 1
    for i in range(image.nlevels):
        if math.prod(image.level(i).shape[a] for a in spatial) <= coarse_voxels:
            level = i
            break
    sel = tuple(outer.get(i, slice(None)) for i in range(image.ndim))
    with np.errstate(over="ignore"):  # beyond float32 is Inf, zeroed here: fit refuses such a volume in one line
        coarse = np.nan_to_num(image.read(level, sel).astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    ratio = [s0 / max(1, sc) for s0, sc in zip(shape0, coarse.shape)]
    size = _box_size(tuple(shape0), budget)
    box_c = [max(1, int(round(s / r))) for s, r in zip(size, ratio)]
    lo, hi = np.percentile(coarse, [1.0, 99.9])
    score = ((coarse - lo) / max(hi - lo, 1e-12) > 0.2).astype(np.float32)
    if score.any():
        from scipy import ndimage  # training only: enhance does not pay for the import

        dens = ndimage.uniform_filter(score, size=box_c, mode="constant")
        centre = np.unravel_index(int(np.argmax(dens)), dens.shape)
    else:
        centre = tuple(n // 2 for n in coarse.shape)
    box = []
    for c, r, s, n in zip(centre, ratio, size, shape0):
        start = int(np.clip(round((c + 0.5) * r - s / 2), 0, n - s))
        box.append(slice(start, start + s))
    return tuple(box), level


def train(input: str | os.PathLike, factor, *args, **options) -> Model:
    """Train a model on a sampled region of an OME-Zarr image (one channel, one time point).
    ``nonfinite``: NaN/Inf in the sample stop training, naming how many ("error"), or are replaced
    by the array's fill value ("fill"). ``checkpoint_dir``: where training saves its state every few
    steps and resumes from (``train.fit``). The keywords are those of :class:`options.TrainOptions`."""
    o = keywords("train", TrainOptions, options, args, TRAIN_POSITIONAL, lead=2)
    _check_training_args(o.steps, o.budget, o.seed)
    _check_nonfinite(o.nonfinite)
    denoise_mode(o.denoise)
    check_choice(o.operator, o.ensemble)
    check_back_projection(o.back_projection)
    image = open_image(input, o.storage_options)
    spatial = image.spatial_axes
    if len(spatial) not in (2, 3):
        raise NgffError(f"{input}: needs 2 or 3 spatial axes, found {len(spatial)}")
    if o.channel not in (None, 0) and _channel_axis(image) is None:
        raise NgffError(f"--channel {o.channel}: {input} has no channel axis")
    parse_factors(factor, len(spatial))  # a bad factor fails before any data is read
    _check_trainable(image, o.budget, input)
    outer = _outer_selection(image, o.channel, o.time_index)
    box, level = training_region(image, outer, o.budget)
    sel = on_axes([outer.get(i, slice(None)) for i in range(image.ndim)], spatial, box)
    sample = image.read(0, tuple(sel))
    sample = _finite_sample(sample, image, input, box, o.nonfinite, o.quiet)
    if not o.quiet:
        decision(
            f"training on level-0 region {[(s.start, s.stop) for s in box]} ({sample.size:,} voxels, "
            f"found on level {level}), channel {o.channel}",
            "training region",
            region=[[s.start, s.stop] for s in box],
            voxels=int(sample.size),
            channel=o.channel,
        )
    psf_fwhm = o.psf_fwhm
    model = fit(
        sample,
        factor=stored_order(image, parse_factors(factor, len(spatial))),
        steps=o.steps,
        seed=o.seed,
        quiet=o.quiet,
        psf_fwhm=stored_order(image, psf_fwhm) if isinstance(psf_fwhm, (tuple, list)) else psf_fwhm,
        acquisition=o.acquisition,
        denoise=o.denoise,
        operator=o.operator,
        ensemble=o.ensemble,
        back_projection=o.back_projection,
        checkpoint_dir=o.checkpoint_dir,
        axial=o.axial,
        z_spacing=o.z_spacing if o.z_spacing is not None or o.axial != "lateral" else z_spacing(image, factor),
    )
    model.info["source"] = {
        "url": str(input),
        "channel": o.channel,
        "time": o.time_index,
        "region": [[s.start, s.stop] for s in box],
        "coarse_level": level,
    }
    return model


train.__signature__ = signature(
    ("input", "factor"), {n: defaults(TrainOptions)[n] for n in TRAIN_POSITIONAL}, keyword_only=False
)


def z_spacing(image: Image, factor) -> float | None:
    """The input's z step in lateral voxels, from its level-0 voxel sizes; None (the z factor: the
    output isotropic) where the sizes say the voxels are cubic, which is also what a file without
    sizes is read as."""
    spatial = image.spatial_axes
    if len(spatial) != 3:
        return None
    s = [image.scales[0][a] for a in spatial]
    ratio = s[0] / (0.5 * (s[1] + s[2]))
    return None if abs(ratio - 1.0) < 1e-6 else float(ratio)


def _finite_sample(sample: np.ndarray, image: Image, input: str, box, nonfinite: str, quiet: bool) -> np.ndarray:
    """NaN/Inf in the training sample: training failed after 40-70 s with "min() arg is an empty
    sequence". Say so, and how many, or (``fill``) replace them and say how many."""
    if sample.dtype.kind != "f":
        return sample
    bad = ~np.isfinite(sample)
    n = int(np.count_nonzero(bad))
    if not n:
        return sample
    region = "x".join(f"{s.start}:{s.stop}" for s in box)
    if nonfinite != "fill":
        raise NgffError(
            f"{input}: the training region [{region}] holds {n:,} NaN/Inf voxels of {sample.size:,}: "
            f"svision-big cannot train on them; pass --nonfinite fill to read them as the fill value"
        )
    from ..inputcheck import fill_value

    sample = np.where(bad, fill_value(image.level(0)), sample)
    if not quiet:
        decision(f"training: {n:,} NaN/Inf voxels in the training region read as the fill value", "nonfinite", count=n)
    return sample


def _check_trainable(image: Image, budget: int, input: str) -> None:
    """Refuse, naming the minimum, a volume (or a budget's box) too small to train on: a 3x5x5
    volume was an IndexError inside numpy after reading the data."""
    shape = tuple(image.shape[a] for a in image.spatial_axes)
    if min(shape) < MIN_TRAIN_EDGE:
        raise NgffError(
            f"{input}: a volume of {'x'.join(map(str, shape))} voxels is too small to train on: "
            f"every spatial axis needs at least {MIN_TRAIN_EDGE} voxels"
        )
    box = _box_size(shape, budget)
    if min(box) < MIN_TRAIN_EDGE:
        need = budget
        while min(_box_size(shape, need)) < MIN_TRAIN_EDGE:
            need *= 2
        raise ValueError(
            f"--budget {budget}: a training box of {'x'.join(map(str, box))} voxels is too small "
            f"(every axis needs at least {MIN_TRAIN_EDGE}): use a budget of at least {need}"
        )
