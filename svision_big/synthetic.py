"""Synthetic microscopy volumes with a known ground truth.

Tests, the demo and the benchmarks need volumes whose ideal high-resolution version is
known, without downloading anything. We build a high-resolution *object* (beads and/or
filaments), blur it with a Gaussian PSF at high resolution (that blurred volume is the best
any super-resolution method can hope to recover, i.e. the ground truth), then record it the
way a microscope would: integrate over coarser voxels (block average), add shot noise and
read noise, and quantise.

Everything is n-D (2D and 3D), deterministic for a given seed, and vectorised: only loops
over a small stencil of voxel offsets or over filament steps, never over voxels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .options import keywords

__all__ = [
    "Acquisition",
    "FWHM_PER_SIGMA",
    "beads",
    "filaments",
    "psf_blur",
    "downsample_mean",
    "acquire",
    "make_volume",
]

#: FWHM of a Gaussian divided by its standard deviation, 2 * sqrt(2 ln 2).
FWHM_PER_SIGMA: float = 2.0 * math.sqrt(2.0 * math.log(2.0))

_KINDS = ("beads", "filaments", "mixed")


@dataclass(frozen=True)
class Acquisition:
    """A simulated recording together with the volume it should be restored to.

    ``truth`` and ``observed`` are in the same intensity units (``observed`` block-averaged
    from ``truth`` equals its noise-free expectation), so ``truth`` can be compared directly
    with an upsampled ``observed`` (PSNR, SSIM, bead FWHM).
    """

    truth: np.ndarray  #: float32 high-res ground truth (object blurred by the PSF)
    observed: np.ndarray  #: truth block-averaged by ``factor`` plus noise, in the requested dtype
    factor: tuple[int, ...]  #: integer downsampling factor per axis
    psf_fwhm: tuple[float, ...]  #: PSF FWHM per axis, in high-res voxels
    scale: float = 1.0  #: factor applied to map float intensities to an integer dtype (else 1)


# ----------------------------------------------------------------------------- helpers


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _per_axis(value: float | Sequence[float], ndim: int, name: str) -> tuple:
    """Broadcast a scalar to one value per axis; check a sequence has one per axis."""
    if np.ndim(value) == 0:
        return (value,) * ndim
    value = tuple(value)
    if len(value) != ndim:
        raise ValueError(f"{name} has {len(value)} entries but the volume has {ndim} axes")
    return value


def _splat_spheres(shape: Sequence[int], centres: np.ndarray, radii: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Rasterise anti-aliased solid spheres (max-combined) into a zero volume.

    A voxel (centre at integer coordinates) at distance d from a sphere of radius r gets
    ``value * clip(r + 0.5 - d, 0, 1)``: a one-voxel linear ramp that approximates partial
    volume, so sub-voxel positions and sub-voxel radii are represented. We loop over the
    stencil of integer offsets (vectorised over all spheres) and resolve overlaps with a
    sort, which is exact regardless of numpy's fancy-assignment order.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    out = np.zeros(shape, dtype=np.float32)
    if len(centres) == 0:
        return out
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, ndim)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(centres),))
    values = np.broadcast_to(np.asarray(values, dtype=np.float64), (len(centres),))
    reach = float(radii.max()) + 0.5
    base = np.floor(centres).astype(np.int64)
    k = int(math.ceil(reach))
    lins, vals = [], []
    for off in itertools.product(range(-k, k + 2), repeat=ndim):
        o = np.asarray(off)
        # Smallest possible distance for this offset given frac(centre) in [0, 1).
        lower = np.where(o <= 0, -o, o - 1)
        if np.sqrt((lower.astype(float) ** 2).sum()) >= reach:
            continue
        idx = base + o
        d = np.sqrt(((idx - centres) ** 2).sum(axis=1))
        v = np.clip(radii + 0.5 - d, 0.0, 1.0) * values
        keep = v > 0
        for ax, s in enumerate(shape):
            keep &= (idx[:, ax] >= 0) & (idx[:, ax] < s)
        if keep.any():
            lins.append(np.ravel_multi_index(tuple(idx[keep].T), shape))
            vals.append(v[keep])
    if not lins:
        return out
    lin = np.concatenate(lins)
    val = np.concatenate(vals)
    order = np.lexsort((val, lin))  # by voxel, then by value ascending
    lin, val = lin[order], val[order]
    last = np.ones(len(lin), dtype=bool)
    last[:-1] = lin[1:] != lin[:-1]  # the largest value of each voxel comes last
    out.reshape(-1)[lin[last]] = val[last]
    return out


# ----------------------------------------------------------------------------- objects


def beads(
    shape: Sequence[int],
    n: int = 100,
    radius: tuple[float, float] = (1.0, 2.0),
    rng: np.random.Generator | int | None = None,
    intensity: tuple[float, float] = (0.5, 1.0),
) -> np.ndarray:
    """Sparse solid spheres at random sub-voxel positions (the object, before PSF blur).

    Beads are the standard resolution probe: after blurring, their FWHM measures the PSF.
    Radii and brightnesses are drawn uniformly from ``radius`` and ``intensity``.
    Returns float32 of ``shape`` with values in [0, intensity[1]].
    """
    rng = _rng(rng)
    shape = tuple(int(s) for s in shape)
    centres = rng.uniform(0.0, 1.0, size=(n, len(shape))) * (np.asarray(shape) - 1)
    radii = rng.uniform(radius[0], radius[1], size=n)
    values = rng.uniform(intensity[0], intensity[1], size=n)
    return _splat_spheres(shape, centres, radii, values)


def filaments(
    shape: Sequence[int],
    n: int = 10,
    thickness: float = 1.5,
    rng: np.random.Generator | int | None = None,
    length: float | None = None,
    curvature: float = 0.15,
    intensity: tuple[float, float] = (0.5, 1.0),
) -> np.ndarray:
    """Random smooth curves (neurites, microtubules), rasterised with anti-aliasing.

    Each filament is a random walk with momentum (step 0.5 voxel, direction perturbed by
    ``curvature`` per step, so curves are smooth at the voxel scale), reflected at the
    volume borders, of ``length`` voxels (default 1.5 x the largest axis). It is drawn as a
    tube of diameter ``thickness`` voxels. Returns float32 of ``shape``.
    """
    rng = _rng(rng)
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    step = 0.5
    if length is None:
        length = 1.5 * max(shape)
    n_steps = max(1, int(round(length / step)))
    hi = np.asarray(shape, dtype=np.float64) - 1
    pos = rng.uniform(0.0, 1.0, size=(n, ndim)) * hi
    direction = rng.normal(size=(n, ndim))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-12
    noise = rng.normal(scale=curvature, size=(n_steps, n, ndim))
    points = np.empty((n_steps, n, ndim))
    for t in range(n_steps):  # loop over steps, vectorised over filaments
        points[t] = pos
        direction = direction + noise[t]
        direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-12
        pos = pos + step * direction
        low, high = pos < 0, pos > hi
        pos = np.where(low, -pos, np.where(high, 2 * hi - pos, pos))
        direction = np.where(low | high, -direction, direction)
        pos = np.clip(pos, 0.0, hi)  # only matters for axes of length 1
    values = np.broadcast_to(rng.uniform(intensity[0], intensity[1], size=n), (n_steps, n))
    return _splat_spheres(shape, points.reshape(-1, ndim), np.full(n_steps * n, thickness / 2.0), values.reshape(-1))


# ----------------------------------------------------------------------------- imaging


def psf_blur(volume: np.ndarray, fwhm: float | Sequence[float]) -> np.ndarray:
    """Blur with a separable anisotropic Gaussian PSF given by its FWHM per axis (voxels).

    Microscope PSFs are usually specified by FWHM and are elongated axially; a Gaussian is
    the customary approximation. ``mode='reflect'`` avoids dark borders. FWHM 0 = no blur.
    """
    volume = np.asarray(volume, dtype=np.float32)
    fwhm = _per_axis(fwhm, volume.ndim, "fwhm")
    if any(f < 0 for f in fwhm):
        raise ValueError(f"fwhm must be non-negative, got {fwhm}")
    sigma = [float(f) / FWHM_PER_SIGMA for f in fwhm]
    return ndimage.gaussian_filter(volume, sigma=sigma, mode="reflect").astype(np.float32, copy=False)


def downsample_mean(volume: np.ndarray, factor: int | Sequence[int]) -> np.ndarray:
    """Block-average by an integer factor per axis (a detector integrating over a voxel).

    Pixel-centre aligned: low-res voxel i covers high-res voxels [i*f, (i+1)*f).
    """
    volume = np.asarray(volume)
    factor = tuple(int(f) for f in _per_axis(factor, volume.ndim, "factor"))
    _check_divisible(volume.shape, factor)
    split = []
    for s, f in zip(volume.shape, factor):
        split += [s // f, f]
    axes = tuple(range(1, 2 * volume.ndim, 2))
    return volume.reshape(split).mean(axis=axes, dtype=np.float64).astype(np.float32)


def acquire(
    truth_object: np.ndarray,
    factor: int | Sequence[int],
    psf_fwhm: float | Sequence[float],
    noise: float = 0.0,
    poisson_peak: float | None = None,
    dtype: np.dtype | type = np.float32,
    seed: int | None = 0,
) -> Acquisition:
    """Simulate recording ``truth_object`` at a coarser sampling with a microscope.

    Steps: PSF blur at high resolution (-> ``truth``), block-average by ``factor``, Poisson
    shot noise with ``poisson_peak`` photons at intensity 1 (if given), additive Gaussian
    noise with std ``noise`` x the clean maximum, clip at 0. For an integer ``dtype`` the
    recording is scaled so its maximum sits at 90% of the dtype range (nothing saturates)
    and rounded; ``truth`` gets the same scale (kept in ``Acquisition.scale``) so the two
    stay comparable.
    """
    obj = np.asarray(truth_object, dtype=np.float32)
    factor_t = tuple(int(f) for f in _per_axis(factor, obj.ndim, "factor"))
    fwhm_t = tuple(float(f) for f in _per_axis(psf_fwhm, obj.ndim, "psf_fwhm"))
    _check_divisible(obj.shape, factor_t)
    return _record(psf_blur(obj, fwhm_t), factor_t, fwhm_t, noise, poisson_peak, dtype, seed)


def _check_divisible(shape: tuple[int, ...], factor: tuple[int, ...]) -> None:
    if any(f < 1 for f in factor):
        raise ValueError(f"factor must be >= 1 per axis, got {factor}")
    bad = [f"axis {ax}: {s} % {f} != 0" for ax, (s, f) in enumerate(zip(shape, factor)) if s % f]
    if bad:
        raise ValueError(
            f"truth shape {shape} is not divisible by factor {factor} ({', '.join(bad)}); "
            "every axis length must be a multiple of its factor"
        )


def _record(
    truth: np.ndarray,
    factor: tuple[int, ...],
    psf_fwhm: tuple[float, ...],
    noise: float,
    poisson_peak: float | None,
    dtype: np.dtype | type,
    seed: int | None,
) -> Acquisition:
    """Detector half of :func:`acquire`, starting from the already PSF-blurred truth."""
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if poisson_peak is not None and poisson_peak <= 0:
        raise ValueError(f"poisson_peak must be > 0, got {poisson_peak}")
    rng = np.random.default_rng(seed)
    clean = downsample_mean(truth, factor)
    clean_max = float(clean.max()) if clean.size else 0.0
    obs = clean.astype(np.float64)
    if poisson_peak is not None:
        obs = rng.poisson(np.clip(obs, 0, None) * poisson_peak) / poisson_peak
    if noise > 0:
        obs = obs + rng.normal(scale=noise * clean_max, size=obs.shape)
    obs = np.clip(obs, 0.0, None)

    dtype = np.dtype(dtype)
    scale = 1.0
    if np.issubdtype(dtype, np.integer):
        top = float(np.iinfo(dtype).max)
        obs_max = float(obs.max()) if obs.size else 0.0
        scale = 0.9 * top / obs_max if obs_max > 0 else 1.0
        observed = np.clip(np.rint(obs * scale), 0, top).astype(dtype)
        truth = truth * np.float32(scale)
    else:
        observed = obs.astype(dtype)
    return Acquisition(
        truth=np.asarray(truth, dtype=np.float32),
        observed=observed,
        factor=factor,
        psf_fwhm=psf_fwhm,
        scale=scale,
    )


@dataclass(frozen=True)
class VolumeOptions:
    """``make_volume``'s parameters after ``factor``, each declared once: the first five may also be
    passed positionally, in this order (``VOLUME_POSITIONAL``)."""

    psf_fwhm: float | Sequence[float] | None = field(
        default=None, metadata={"help": "the PSF's FWHM per axis in high-res voxels (default: see make_volume)"}
    )
    noise: float = field(default=0.0, metadata={"help": "Gaussian noise sigma"})
    poisson_peak: float | None = field(default=None, metadata={"help": "photons at intensity 1 (None: no shot noise)"})
    dtype: np.dtype | type = field(default=np.float32, metadata={"help": "the arrays' dtype"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    n: int | None = field(default=None, metadata={"help": "number of beads/filaments (default scales with volume)"})
    intensity: float = field(default=1.0, metadata={"help": "the truth's maximum"})


VOLUME_POSITIONAL = ("psf_fwhm", "noise", "poisson_peak", "dtype", "seed")


def make_volume(
    kind: str = "mixed",
    shape_lr: Sequence[int] = (24, 64, 64),
    factor: int | Sequence[int] = 2,
    *args,
    **options,
) -> Acquisition:
    """One-call synthetic acquisition of a given *observed* (low-res) shape.

    ``kind``: "beads" (sparse spheres, for FWHM), "filaments" (curvilinear structure) or
    "mixed". The object is built at ``shape_lr * factor``. The rest are ``VolumeOptions``' fields
    (``psf_fwhm``, ``noise``, ``poisson_peak``, ``dtype``, ``seed`` also positionally, then ``n``
    and ``intensity`` by name). Default PSF: lateral FWHM
    2 x factor high-res voxels (so the recording is roughly Nyquist-sampled), axial
    (axis 0 of a 3D volume) 2.5 x the lateral, as in a typical two-photon microscope.
    The truth is normalised so its maximum equals ``intensity`` (so ``poisson_peak *
    intensity`` is the brightest voxel's photon count). ``n`` overrides the number of
    beads/filaments (default scales with the volume): a small ``n``, a low ``intensity``
    and ``poisson_peak`` give a sparse, dim, shot-noise-limited bead volume.
    """
    o = keywords("make_volume", VolumeOptions, options, args, VOLUME_POSITIONAL, lead=3)
    psf_fwhm, noise, poisson_peak, dtype, seed, n = o.psf_fwhm, o.noise, o.poisson_peak, o.dtype, o.seed, o.n
    intensity = o.intensity
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    shape_lr = tuple(int(s) for s in shape_lr)
    ndim = len(shape_lr)
    if ndim not in (2, 3):
        raise ValueError(f"shape_lr must be 2D or 3D, got {shape_lr}")
    factor_t = tuple(int(f) for f in _per_axis(factor, ndim, "factor"))
    shape_hr = tuple(s * f for s, f in zip(shape_lr, factor_t))
    if psf_fwhm is None:
        lateral = [2.0 * f for f in factor_t[-2:]]
        psf_fwhm = tuple(lateral) if ndim == 2 else (2.5 * float(np.mean(lateral)), *lateral)

    rng = np.random.default_rng(seed)
    voxels = int(np.prod(shape_hr))
    per = 1500.0 if ndim == 2 else 60000.0  # voxels per filament
    n_fil = n if n is not None else max(2, int(round(voxels / per)))
    n_bead = n if n is not None else max(3, int(round(voxels / 8000.0)))
    obj: np.ndarray
    if kind == "beads":
        obj = beads(shape_hr, n=n_bead, rng=rng)
    elif kind == "filaments":
        obj = filaments(shape_hr, n=n_fil, rng=rng)
    else:
        obj = np.maximum(
            filaments(shape_hr, n=n_fil, rng=rng),
            beads(shape_hr, n=max(1, n_bead // 3), rng=rng),
        )
    fwhm_t = tuple(float(f) for f in _per_axis(psf_fwhm, ndim, "psf_fwhm"))
    truth = psf_blur(obj, fwhm_t)
    peak = float(truth.max())
    if peak > 0:  # brightest structure at ``intensity`` after blur, whatever the PSF
        truth *= np.float32(intensity / peak)
    noise_seed = int(rng.integers(0, 2**31 - 1))
    return _record(truth, factor_t, fwhm_t, noise, poisson_peak, dtype, noise_seed)
