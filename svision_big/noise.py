"""Noise model of the input, measured from the input alone: variance as a function of intensity.

A Poisson-Gaussian camera gives var(I) = gain * I + offset. We estimate it from a lateral
high-pass residual whose noise gain is known, binned by local mean intensity, with a robust
(MAD) spread per bin so sparse edges and beads do not inflate it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NoiseModel:
    gain: float
    offset: float

    def std(self, intensity: float) -> float:
        return float(np.sqrt(max(0.0, self.gain * intensity + self.offset)))


def _residuals(v: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Unit-noise-gain high-pass residuals (second differences along each axis, lateral Laplacian)
    on a common interior, and the local mean intensity there.

    White noise gives every residual the same variance; signal inflates each one differently
    (a PSF is usually wider along z than in y/x), so the smallest per-intensity spread among them
    is the best bound on the noise.
    """
    core = tuple(slice(1, -1) if n >= 3 else slice(None) for n in v.shape)
    c = v[core]
    out = []
    lap = 4.0 * c
    for axis in range(v.ndim):
        if v.shape[axis] < 3:
            continue
        lo = list(core)
        hi = list(core)
        lo[axis], hi[axis] = slice(0, -2), slice(2, None)
        a, b = v[tuple(lo)], v[tuple(hi)]
        out.append((2.0 * c - a - b) / np.sqrt(6.0))
        if axis >= v.ndim - 2:
            lap = lap - a - b
    if v.shape[-1] >= 3 and v.shape[-2] >= 3:
        out.append(lap / np.sqrt(20.0))
    return out, c


def estimate_noise(volume: np.ndarray, n_bins: int = 12, max_samples: int = 2_000_000, seed: int = 0) -> NoiseModel:
    """Fit var = gain*I + offset to per-intensity-bin noise variances of a (normalised) volume."""
    v = np.asarray(volume, dtype=np.float32)
    if min(v.shape[-2:]) < 3:
        return NoiseModel(0.0, 0.0)
    resids, mean = _residuals(v)
    resids = [r.ravel() for r in resids]
    mean = mean.ravel()
    if mean.size > max_samples:
        pick = np.random.default_rng(seed).choice(mean.size, max_samples, replace=False)
        resids, mean = [r[pick] for r in resids], mean[pick]
    edges = np.unique(np.quantile(mean, np.linspace(0.0, 1.0, n_bins + 1)))
    if edges.size < 2:
        return NoiseModel(0.0, 0.0)
    which = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, edges.size - 2)
    xs, vs, ws = [], [], []
    for b in range(edges.size - 1):
        sel = which == b
        if sel.sum() < 50:
            continue
        spreads = []
        for r in resids:
            rb = r[sel]
            spreads.append(1.4826 * np.median(np.abs(rb - np.median(rb))))
        xs.append(float(np.median(mean[sel])))
        vs.append(float(min(spreads) ** 2))
        ws.append(float(sel.sum()))
    if len(xs) < 2:
        return NoiseModel(0.0, float(vs[0]) if vs else 0.0)
    x, y, w = np.array(xs), np.array(vs), np.sqrt(np.array(ws))
    a_mat = np.stack([x, np.ones_like(x)], axis=1) * w[:, None]
    gain, offset = np.linalg.lstsq(a_mat, y * w, rcond=None)[0]
    if gain < 0:  # variance cannot fall with intensity: fall back to constant noise
        gain, offset = 0.0, float(np.average(y, weights=w))
    if offset < 0:
        offset = 0.0
    return NoiseModel(float(gain), float(offset))
