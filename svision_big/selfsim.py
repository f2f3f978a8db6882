"""The input's own blur and acquisition, by cross-scale self-similarity.

Training pairs are the input degraded once more. That teaches the network the step from the
input to the truth only if the step down looks like the step up. A blurred input breaks it: with
a PSF of ``p`` input voxels the truth is blurred by ``f*p`` of its own voxels, while the input
degraded by the acquisition alone is blurred by only ``p/f`` of its voxels, so the network learns
to sharpen data far less blurred than the input, and over-sharpens the input (x(2,1,1)
point-sampled beads, PSF 1.9 input voxels axially: -4.69 dB against cubic, trained with the right
acquisition).

The pairs here first blur the input by ``p*sqrt(f^2-1)`` (``pair_blur``): the target is then blurred
by ``f*p`` of the input's voxels and its partner by ``p`` of its own, as truth and input are. ``p``
is found as KernelGAN and ZSSR find a kernel: the extra blur for which the input, blurred and
degraded once more, has the input's own spectrum per voxel along each resampled axis
(``match_blur``); the acquisition is the one whose match is closest (``estimate``). Structure
smoother than a voxel counts as blur too, which is what the pairs need: the truth has it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .degrade import ACQUISITIONS, blur, resize

# Extra FWHM (input voxels) tried for the x2 step: fine where PSFs are (1-3 voxels), coarser above.
GRID = tuple(float(g) for g in np.r_[np.arange(0.0, 6.01, 0.25), np.arange(6.5, 12.01, 0.5)])
MIN_FREQUENCY = 0.04  # cycles per voxel below which the spectra are not compared (object size, not blur)
MIN_LENGTH = 8  # voxels along an axis below which no spectrum is estimated (no blur assumed)
MAX_VOXELS = 2_000_000  # the estimate runs on a central crop of at most this many voxels
# An axis whose best match leaves a log-spectrum mismatch above this carries no evidence on the
# acquisition (a 16-slice stack blurred over 4+ voxels: 0.9-14 measured; axes with detail: 0.001-0.4)
POOR_MATCH = 1.0
# Two acquisitions whose mismatches are within this ratio cannot be told apart by the input: a box of
# f voxels blurs like a Gaussian of variance f^2/12, so block means with a PSF look like point samples
# with a slightly wider one. Measured on the 21 matrix cases where ``estimate`` ran (docs/fidelity.md,
# 1b): it picked wrong on 12; on 6 of them the true acquisition was within 1.05-1.22x of the one found
# (the wrong picks cost up to 9.66 dB), on the others 1.28-1.61x. ``fit`` names the rivals within this
# ratio (on 16 of the 21: 10 of the wrong picks, 6 of the right ones) and the flag that settles it.
AMBIGUOUS_RATIO = 1.25


@dataclass
class SelfSimilarity:
    """What ``estimate`` found: the acquisition, the input's blur per axis (FWHM, input voxels),
    and each acquisition's spectral mismatch (lower is closer)."""

    acquisition: str
    psf_fwhm: tuple[float, ...]
    scores: dict[str, float] = field(default_factory=dict)
    blurs: dict[str, list[float]] = field(default_factory=dict)
    axes: list[int] = field(default_factory=list)  # the axes whose mismatch chose the acquisition

    def rivals(self) -> dict[str, float]:
        """The other acquisitions that match almost as well (``AMBIGUOUS_RATIO``), with their ratio to the best."""
        best = max(self.scores.get(self.acquisition, 0.0), 1e-12)
        return {a: s / best for a, s in self.scores.items() if a != self.acquisition and s / best < AMBIGUOUS_RATIO}

    def record(self) -> dict:
        return {
            "acquisition": self.acquisition,
            "psf_fwhm": [round(p, 3) for p in self.psf_fwhm],
            "scores": {a: round(s, 5) for a, s in self.scores.items()},
            "blurs": {a: [round(p, 3) for p in b] for a, b in self.blurs.items()},
            "axes": list(self.axes),
            "ambiguous_with": {a: round(r, 3) for a, r in self.rivals().items()},
        }


def pair_blur(psf_fwhm: tuple[float, ...], factors: tuple[int, ...]) -> tuple[float, ...]:
    """Blur (FWHM, in the voxels being degraded) that makes a degraded copy's partner as blurred per
    voxel as the input: FWHMs add in quadrature, and the target must reach ``f`` times the blur."""
    return tuple(float(p) * math.sqrt(f * f - 1.0) for p, f in zip(psf_fwhm, factors))


def power_spectrum(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean DCT-II power along ``axis`` (cycles per voxel, without the DC term). The DCT's mirrored
    extension has no edge jump, so short axes (16 slices) keep their high frequencies clean."""
    from scipy.fft import dct

    n = x.shape[axis]
    c = dct(np.asarray(x, np.float64), type=2, norm="ortho", axis=axis)
    p = np.moveaxis(c * c, axis, -1).reshape(-1, n).mean(0)
    return np.arange(1, n) / (2.0 * n), p[1:]


def mismatch(x: np.ndarray, y: np.ndarray, axis: int) -> float:
    """Variance of the log-spectrum ratio of ``y`` to ``x`` (frequencies per own voxel, above
    ``MIN_FREQUENCY``): 0 when they differ only by a gain."""
    kx, px = power_spectrum(x, axis)
    ky, py = power_spectrum(y, axis)
    keep = ky > MIN_FREQUENCY
    r = np.log(py[keep] + 1e-30) - np.interp(ky[keep], kx, np.log(px + 1e-30))
    return float(np.var(r)) if r.size else 0.0


def match_blur(x: torch.Tensor, axis: int, acquisition: str) -> tuple[float, float]:
    """(extra FWHM, mismatch): the blur along ``axis`` after which an x2 ``acquisition`` of ``x``
    has ``x``'s spectrum."""
    if x.shape[axis] % 2:  # an x2 degradation needs an even length: drop the last voxel
        x = x.narrow(axis, 0, x.shape[axis] - 1).contiguous()
    xs = x.numpy()
    factors = tuple(2 if d == axis else 1 for d in range(x.ndim))
    best = (float("inf"), 0.0)
    for e in GRID:
        fwhm = tuple(e if d == axis else 0.0 for d in range(x.ndim))
        y = resize(blur(x, fwhm), factors, up=False, acquisition=acquisition)
        best = min(best, (mismatch(xs, y.numpy(), axis), e))
    return best[1], best[0]


def central_crop(v: np.ndarray, max_voxels: int = MAX_VOXELS) -> np.ndarray:
    """Shrink the longest axis around its centre until the crop fits: spectra need long axes."""
    box = [[0, n] for n in v.shape]
    while np.prod([b - a for a, b in box]) > max_voxels:
        d = int(np.argmax([b - a for a, b in box]))
        a, b = box[d]
        cut = max(1, (b - a) // 8)
        box[d] = [a + cut // 2, b - (cut - cut // 2)]
    return v[tuple(slice(a, b) for a, b in box)]


def estimate(v: np.ndarray, factors: tuple[int, ...], acquisitions: tuple[str, ...] = ACQUISITIONS) -> SelfSimilarity:
    """The acquisition and blur that make the input most like itself one scale down, on the axes
    ``factors`` resamples (the others get 0). The mismatch of an acquisition is summed over those
    axes whose best match is good (``POOR_MATCH``; all of them if none is); the lowest wins."""
    x = torch.from_numpy(np.ascontiguousarray(central_crop(np.asarray(v, np.float32))))
    axes = [d for d, f in enumerate(factors) if f > 1 and x.shape[d] >= MIN_LENGTH]
    found = {acq: {d: match_blur(x, d, acq) for d in axes} for acq in acquisitions}
    good = [d for d in axes if min(found[a][d][1] for a in acquisitions) <= POOR_MATCH] or axes
    scores, blurs = {}, {}
    for acq in acquisitions:
        scores[acq] = float(sum(found[acq][d][1] for d in good))
        blurs[acq] = [found[acq][d][0] / math.sqrt(3.0) if d in found[acq] else 0.0 for d in range(x.ndim)]
    best = min(acquisitions, key=lambda a: scores[a])
    return SelfSimilarity(best, tuple(blurs[best]), scores, blurs, good)
