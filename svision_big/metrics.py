"""Image-quality metrics used to evaluate resolution enhancement (PSNR, SSIM, bead FWHM).

These are the metrics of the Self-Vision paper. They are implemented here with numpy and
scipy only (no scikit-image dependency); SSIM follows scikit-image's Gaussian-weighted
variant exactly, so numbers are comparable with published ones. All computations run in
float64 whatever the input dtype, so integer volumes do not overflow.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

__all__ = ["psnr", "ssim", "ssim_many", "fwhm_profile", "bead_fwhm"]


def _data_range(ref: np.ndarray, data_range: float | None) -> float:
    """Default dynamic range = reference's max - min (1.0 for a constant reference)."""
    if data_range is None:
        data_range = float(ref.max()) - float(ref.min()) if ref.size else 0.0
        if data_range == 0:
            data_range = 1.0
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    return float(data_range)


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(data_range^2 / MSE); inf if identical.

    Pass ``data_range=255`` for 8-bit data to match the paper's convention (MAX = 255).
    """
    ref, tst = np.asarray(reference), np.asarray(test)
    if ref.shape != tst.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs test {tst.shape}")
    dr = _data_range(ref, data_range)
    # the difference in float64 without a float64 copy of each image (the same numbers as converting first)
    d = np.subtract(ref, tst, dtype=np.float64)
    np.square(d, out=d)
    mse = float(np.mean(d))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(dr * dr / mse)


def ssim(
    reference: np.ndarray,
    test: np.ndarray,
    data_range: float | None = None,
    sigma: float = 1.5,
) -> float:
    """Mean structural similarity (Wang et al. 2004) with a Gaussian window, in 2D or 3D.

    Matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``: K1=0.01, K2=0.03, window truncated at 3.5 sigma,
    reflect boundary, and the mean taken after cropping half a window from every border
    (axes too short to crop are kept whole).
    """
    return ssim_many(reference, [test], data_range, sigma)[0]


def ssim_many(
    reference: np.ndarray,
    tests: list[np.ndarray],
    data_range: float | None = None,
    sigma: float = 1.5,
) -> list[float]:
    """:func:`ssim` of each of ``tests`` against one ``reference``: the same numbers as ``ssim`` one by
    one, faster. The cropped mean is summed slab by slab along axis 0 (each slab read with the rows its
    filter needs around it) in float64 buffers of a few MiB that each thread reuses slab after slab: whole-volume
    float64 temporaries cost 3-4 s of page faults for a 100x512x512 pair. The reference's local mean and
    variance are filtered once per slab for all tests."""
    ref = np.asarray(reference)
    tests = [np.asarray(t) for t in tests]
    for tst in tests:
        if tst.shape != ref.shape:
            raise ValueError(f"shape mismatch: reference {ref.shape} vs test {tst.shape}")
    dr = _data_range(ref, data_range)
    truncate = 3.5
    w = _gaussian_weights(sigma, truncate)
    pad = len(w) // 2
    crop = [slice(pad, n - pad) if n > 2 * pad else slice(None) for n in ref.shape]
    out_rows = len(range(ref.shape[0])[crop[0]])
    per_row = 8 * math.prod(ref.shape[1:]) or 8
    step = max(1, SLAB_BYTES // per_row) if crop[0].start is not None else out_rows
    starts = range(0, out_rows, step)
    local = threading.local()

    def slab(lo: int) -> list[float]:
        # output rows lo..hi of the cropped map need input rows lo..hi + 2 pad (all rows where axis 0 is kept whole)
        rows = slice(lo, min(lo + step, out_rows) + 2 * pad) if crop[0].start is not None else slice(None)
        if not hasattr(local, "scratch"):
            local.scratch = _Scratch()
        smooth = functools.partial(_smooth, scratch=local.scratch, w=w, sigma=sigma, truncate=truncate, crop=crop)
        return _ssim_sums(ref[rows], [t[rows] for t in tests], dr, smooth, local.scratch)

    with ThreadPoolExecutor(max_workers=max(1, min(len(starts), os.cpu_count() or 1))) as pool:
        sums = list(pool.map(slab, starts))
    count = out_rows * math.prod(len(range(n)[c]) for n, c in zip(ref.shape[1:], crop[1:]))
    return [math.fsum(s[i] for s in sums) / count for i in range(len(tests))]


# float64 bytes of a slab's output rows (its input has 2 x 5 more rows): near the cache's size; a 100x408x408 pair took
# 1.7-2.2 s wall for 2-8 MiB, 2.8-4.1 s for 40-120 MiB (those before the buffers were reused)
SLAB_BYTES = 1 << 23


class _Scratch:
    """Named float64 buffers of one thread, reused slab after slab (grown when a slab needs more): the slabs'
    arrays allocated anew were 100k page faults per SSIM of a 100x408x408 pair."""

    def __init__(self) -> None:
        self.flat: dict[str, np.ndarray] = {}

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        buf = self.flat.get(name)
        if buf is None or buf.size < n:
            buf = self.flat[name] = np.empty(n)
        return buf[:n].reshape(shape)


def _gaussian_weights(sigma: float, truncate: float) -> np.ndarray:
    """scipy.ndimage's Gaussian kernel (its formula, so its numbers), for the valid correlation along axis 0."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    return phi / phi.sum()


def _valid_rows(a: np.ndarray, w: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """The correlation of ``a`` with the symmetric kernel ``w`` along axis 0, on the rows that need no
    border (``pad``..``n - pad``), into ``out``: whole planes multiplied and added, where scipy walks the
    slowest axis with a stride (3-5x slower in float64)."""
    pad = len(w) // 2
    n = a.shape[0] - 2 * pad
    np.multiply(a[pad : pad + n], w[pad], out=out)
    for j in range(1, pad + 1):
        np.add(a[pad - j : pad - j + n], a[pad + j : pad + j + n], out=tmp)
        tmp *= w[pad + j]
        out += tmp
    return out


def _smooth(
    a: np.ndarray, name: str, *, scratch: _Scratch, w: np.ndarray, sigma: float, truncate: float, crop: list[slice]
) -> np.ndarray:
    """The Gaussian filter of ``a`` (reflect boundary), cropped by ``crop``, in the buffer ``name``: axis 0 by
    ``_valid_rows`` where it is cropped (the crop leaves only rows that need no border), every other pass by
    scipy, cropped after it. Each pass writes its own buffer; only the last, ``name``, outlives the call."""
    outs = [f"pass{axis}" for axis in range(a.ndim - 1)] + [name]
    for axis in range(a.ndim):
        if axis == 0 and crop[0].start is not None:
            shape = (a.shape[0] - (len(w) - 1), *a.shape[1:])
            a = _valid_rows(a, w, scratch(outs[0], shape), scratch("tmp", shape))
        else:
            out = scratch(outs[axis], a.shape)
            a = ndimage.gaussian_filter1d(a, sigma, axis=axis, truncate=truncate, mode="reflect", output=out)
            a = a[(slice(None),) * axis + (crop[axis],)]
    return a


def _ssim_sums(ref: np.ndarray, tests: list[np.ndarray], dr: float, smooth, scratch: _Scratch) -> list[float]:
    """The sum of the SSIM map of each test against ``ref`` over one slab (its rows, with the filter's
    context along axis 0), in float64, every term formed in ``scratch``'s buffers in the order the whole-volume
    code used."""
    c1 = (0.01 * dr) ** 2
    c2 = (0.03 * dr) ** 2
    x = scratch("x", ref.shape)
    np.copyto(x, ref)
    prod = scratch("prod", ref.shape)
    ux = smooth(x, "ux")
    vx = smooth(np.multiply(x, x, out=prod), "vx")
    t = scratch("t", ux.shape)
    vx -= np.multiply(ux, ux, out=t)
    out = []
    for test in tests:
        y = scratch("y", test.shape)
        np.copyto(y, test)
        uy = smooth(y, "uy")
        vy = smooth(np.multiply(y, y, out=prod), "vy")
        vxy = smooth(np.multiply(x, y, out=prod), "vxy")
        vy -= np.multiply(uy, uy, out=t)
        num = np.multiply(ux, uy, out=scratch("num", ux.shape))
        vxy -= num
        num *= 2  # exact: the same as 2 * ux * uy
        num += c1
        vxy *= 2
        vxy += c2
        num *= vxy
        den = np.multiply(ux, ux, out=t)
        uy *= uy
        den += uy
        den += c1
        vy += vx  # vx + vy + c2, in that order
        vy += c2
        den *= vy
        num /= den
        out.append(float(num.sum(dtype=np.float64)))
    return out


def _fwhm_at(profile: np.ndarray, peak: int) -> float:
    """FWHM (samples) of the peak at index ``peak``, half max above the profile minimum.

    Walks outwards from the peak to the first samples below half max and interpolates
    linearly between the bracketing samples. NaN if a side never drops below half max.
    """
    p = np.asarray(profile, dtype=np.float64)
    base = float(p.min())
    top = float(p[peak])
    if not top > base:
        return math.nan
    half = base + 0.5 * (top - base)
    below = p < half
    left_idx = np.nonzero(below[:peak])[0]
    right_idx = np.nonzero(below[peak + 1 :])[0]
    if len(left_idx) == 0 or len(right_idx) == 0:
        return math.nan
    i = int(left_idx[-1])  # p[i] < half <= p[i + 1]
    left = i + (half - p[i]) / (p[i + 1] - p[i])
    j = int(right_idx[0]) + peak + 1  # p[j - 1] >= half > p[j]
    right = (j - 1) + (p[j - 1] - half) / (p[j - 1] - p[j])
    return float(right - left)


def fwhm_profile(profile: np.ndarray) -> float:
    """Full width at half maximum, in samples, of the highest peak of a 1D profile.

    Half maximum is measured above the profile's minimum (its baseline), and the crossings
    are linearly interpolated, so widths are sub-sample accurate for well-sampled peaks.
    Returns NaN when the peak is not bracketed by half-max crossings on both sides.
    """
    p = np.asarray(profile, dtype=np.float64).ravel()
    if p.size < 3:
        return math.nan
    return _fwhm_at(p, int(np.argmax(p)))


def bead_fwhm(
    volume: np.ndarray,
    axis: int,
    n_beads: int = 10,
    isolation: int = 9,
    half_window: int = 32,
) -> float:
    """Median FWHM (voxels) along ``axis`` of the ``n_beads`` brightest isolated beads.

    The paper's resolution measure. Candidate beads are local maxima over a cube of
    ``isolation`` voxels, above 10% of the volume's range; they are taken brightest first,
    skipping any within ``isolation`` voxels of one already taken (so plateaus and
    double-counting are excluded). The line profile through each bead along ``axis``
    (``half_window`` voxels each side) gives one FWHM; beads whose profile is cut by the
    border or by a neighbour before half max are dropped. NaN if no bead qualifies.
    """
    vol = np.asarray(volume, dtype=np.float64)
    if not -vol.ndim <= axis < vol.ndim:
        raise ValueError(f"axis {axis} out of range for a {vol.ndim}-D volume")
    axis %= vol.ndim
    lo, hi = float(vol.min()), float(vol.max())
    if hi <= lo:
        return math.nan
    is_max = (vol == ndimage.maximum_filter(vol, size=isolation, mode="nearest")) & (vol > lo + 0.1 * (hi - lo))
    coords = np.argwhere(is_max)
    order = np.argsort(-vol[tuple(coords.T)], kind="stable")
    coords = coords[order]

    taken: list[np.ndarray] = []
    widths: list[float] = []
    n_len = vol.shape[axis]
    for c in coords:
        if len(widths) >= n_beads:
            break
        if taken and np.min(np.max(np.abs(np.asarray(taken) - c), axis=1)) < isolation:
            continue
        taken.append(c)
        start = max(0, int(c[axis]) - half_window)
        stop = min(n_len, int(c[axis]) + half_window + 1)
        index = list(c)
        index[axis] = slice(start, stop)
        w = _fwhm_at(vol[tuple(index)], int(c[axis]) - start)
        if math.isfinite(w):
            widths.append(w)
    return float(np.median(widths)) if widths else math.nan
