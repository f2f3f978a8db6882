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


def _second_differences(v: np.ndarray, lag: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Unit-noise-gain second differences (2c - a - b)/sqrt(6) at ``lag`` along each axis long enough,
    on the common interior (margin 2), and the local mean intensity there."""
    m = 2
    core = tuple(slice(m, n - m) for n in v.shape)
    c = v[core]
    out = []
    for axis in range(v.ndim):
        if v.shape[axis] < 2 * m + 1:
            continue
        lo, hi = list(core), list(core)
        lo[axis] = slice(m - lag, v.shape[axis] - m - lag)
        hi[axis] = slice(m + lag, v.shape[axis] - m + lag)
        out.append((2.0 * c - v[tuple(lo)] - v[tuple(hi)]) / np.sqrt(6.0))
    return out, c


def _robust_var(r: np.ndarray) -> float:
    return float((1.4826 * np.median(np.abs(r - np.median(r)))) ** 2)


def estimate_noise(volume: np.ndarray, n_bins: int = 12, max_samples: int = 2_000_000, seed: int = 0) -> NoiseModel:
    """Fit var = gain*I + offset to per-intensity-bin noise variances of a (normalised) volume."""
    v = np.asarray(volume, dtype=np.float32)
    if min(v.shape[-2:]) < 3:
        return NoiseModel(0.0, 0.0)
    r1, mean = _second_differences(v, 1)
    r2, _ = _second_differences(v, 2)
    if not r1:
        return NoiseModel(0.0, 0.0)
    mean = mean.ravel()
    r1, r2 = [r.ravel() for r in r1], [r.ravel() for r in r2]
    if mean.size > max_samples:
        pick = np.random.default_rng(seed).choice(mean.size, max_samples, replace=False)
        r1, r2, mean = [r[pick] for r in r1], [r[pick] for r in r2], mean[pick]
    edges = np.unique(np.quantile(mean, np.linspace(0.0, 1.0, n_bins + 1)))
    if edges.size < 2:
        return NoiseModel(0.0, 0.0)
    which = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, edges.size - 2)
    xs, vs, ws = [], [], []
    for b in range(edges.size - 1):
        sel = which == b
        if sel.sum() < 50:
            continue
        per_axis = []
        for a1, a2 in zip(r1, r2):
            v1, v2 = _robust_var(a1[sel]), _robust_var(a2[sel])
            # white noise gives v1 = v2 = var; a locally quadratic signal adds L at lag 1 and 16 L at
            # lag 2: extrapolate the signal's share away (Richardson), never below zero
            per_axis.append(max(0.0, min(v1, (16.0 * v1 - v2) / 15.0)))
        xs.append(float(np.median(mean[sel])))
        vs.append(float(min(per_axis)))
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
