"""Global intensity statistics of the input, measured once on the training sample.

The normalisation (robust percentiles), the clamp floor of non-negative data, the ceiling of a
clipped detector, and the level from which a voxel counts as signal for training-pair sampling.
"""

from __future__ import annotations

import numpy as np

from .operator import Normalisation

SATURATED_FRACTION = 1e-4  # voxels at the maximum, as a fraction, that mark it as a detector's ceiling


def saturation(flat: np.ndarray) -> float | None:
    """The input's ceiling, if it has one: its maximum, when at least 16 voxels and
    ``SATURATED_FRACTION`` of them sit exactly there (a clipped detector, a full 8-bit range).
    Unclipped data reach their maximum at a handful of voxels."""
    top = float(flat.max())
    count = int(np.count_nonzero(flat == top))
    return top if count >= max(16, SATURATED_FRACTION * flat.size) else None


def measure_normalisation(sample: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.99) -> Normalisation:
    """Robust global percentiles of the training sample; the clamp floor is 0 for non-negative
    data, the ceiling the saturation value if the data have one."""
    flat = np.asarray(sample).ravel()
    if flat.size > 4_000_000:
        flat = flat[np.random.default_rng(0).choice(flat.size, 4_000_000, replace=False)]
    flat = flat.astype(np.float64)
    lo, hi = np.percentile(flat, [lo_pct, hi_pct])
    if hi - lo <= 0:
        hi = float(flat.max())
        lo = float(flat.min())
    if hi - lo <= 0:
        raise ValueError("the volume is constant: there is nothing to learn from it")
    return Normalisation(lo=float(lo), hi=float(hi), floor=non_negative_floor(flat), ceiling=saturation(flat))


NEGATIVE_EXCURSION = 0.1  # deepest negatives, as a fraction of the top, that still read as excursions around zero


def non_negative_floor(flat: np.ndarray) -> float | None:
    """0 when the data are a non-negative quantity (photon counts), else None (no floor).

    Data that never go below 0 are. So are data whose median is at least 0 and whose negatives
    (their 0.01th percentile) stay within ``NEGATIVE_EXCURSION`` of the top: resampling lobes (an
    antialiased cubic downscale undershoots next to every bright object) and zero-mean read noise
    around an offset-subtracted background. Measured: the cubic-acquired clean beads had 6.5% of
    their voxels below 0 (deepest -5% of the top), and leaving the output unclamped there cost
    0.12 dB against cubic clamped at 0. Background-subtracted data that are mostly negative, or
    signed data (phase, differences), keep no floor."""
    lowest = float(flat.min())
    if lowest >= 0:
        return 0.0
    top = float(np.percentile(flat, 99.99))
    deep = float(np.percentile(flat, 0.01))
    if top > 0 and float(np.median(flat)) >= 0 and -deep <= NEGATIVE_EXCURSION * top:
        return 0.0
    return None


def foreground_threshold(v: np.ndarray) -> float:
    """Normalised intensity above which a voxel counts as signal (robust to sparse data)."""
    t = 0.2
    if np.count_nonzero(v > t) < 64:
        t = float(np.quantile(v, 0.99))
    return t
