"""Degradation operator: antialiased cubic resize (MATLAB ``imresize`` convention) and PSF blur.

The same separable operator synthesises the low-resolution training partner and runs the
back-projection at inference, so what the network learns to invert is exactly what
back-projection enforces. Every 1D operator is a *tap table* ``(idx, w)`` of shape
``(n_out, taps)``: output ``i`` is ``sum_k w[i, k] * x[idx[i, k]]``. Tables carry the boundary
rule (symmetric reflection, as ``imresize``), so one gather-and-sum routine serves resize and
blur, on any axis, for any block size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def cubic_kernel(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = -0.5 (MATLAB's 'cubic')."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = 1.5 * ax3 - 2.5 * ax2 + 1.0
    far = -0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0
    return np.where(ax <= 1.0, near, np.where(ax < 2.0, far, 0.0))


def _reflect(idx: np.ndarray, n: int) -> np.ndarray:
    """Symmetric (half-sample) reflection of indices into [0, n): -1 -> 0, n -> n-1."""
    period = 2 * n
    m = np.mod(idx, period)
    return np.where(m < n, m, period - 1 - m)


def take(x: torch.Tensor, axis: int, idx: np.ndarray) -> torch.Tensor:
    """``x.index_select(axis, idx)`` built from slices: a view when ``idx`` is one ascending run (a
    block's halo side), else a concatenation of runs (reflected faces). Same values; ``index_select``
    gathers element by element and cost 6-25 ms per 160^3 copy, most of a back-projection iteration."""
    idx = np.asarray(idx)
    if idx.size == 0:
        return x.narrow(axis, 0, 0)
    cut = np.nonzero(np.diff(idx) != 1)[0] + 1
    starts, stops = np.r_[0, cut], np.r_[cut, idx.size]
    parts = [x.narrow(axis, int(idx[a]), int(b - a)) for a, b in zip(starts, stops)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, axis)


def _compact(idx: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop tap columns whose weight is zero for every output (keeps the gather loop short)."""
    keep = np.any(w != 0.0, axis=0)
    return np.ascontiguousarray(idx[:, keep]), np.ascontiguousarray(w[:, keep])


@lru_cache(maxsize=512)
def resize_table(n_in: int, n_out: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Tap table of a cubic resize by ``scale`` (antialiased when shrinking), pixel-centre aligned."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"resize needs non-empty axes, got {n_in} -> {n_out}")
    width = 4.0
    if scale < 1.0:  # antialias: stretch the kernel by 1/scale

        def kernel(x):
            return scale * cubic_kernel(scale * x)

        width = width / scale
    else:
        kernel = cubic_kernel
    i = np.arange(n_out, dtype=np.float64)
    u = (i + 0.5) / scale - 0.5  # input coordinate of each output centre
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    w = kernel(u[:, None] - idx)
    w = w / w.sum(axis=1, keepdims=True)
    idx = _reflect(idx.astype(np.int64), n_in)
    return _compact(idx, w)


@lru_cache(maxsize=512)
def gaussian_table(n: int, fwhm: float) -> tuple[np.ndarray, np.ndarray]:
    """Tap table of a normalised Gaussian blur (FWHM in voxels), symmetric boundary."""
    sigma = fwhm * FWHM_TO_SIGMA
    r = max(1, int(4.0 * sigma + 0.5))  # scipy.ndimage truncate=4 convention
    offsets = np.arange(-r, r + 1)
    g = np.exp(-0.5 * (offsets / sigma) ** 2)
    g /= g.sum()
    idx = np.arange(n)[:, None] + offsets[None, :]
    w = np.broadcast_to(g, idx.shape).copy()
    return _compact(_reflect(idx, n), w)


def apply_table(x: torch.Tensor, axis: int, table: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
    """Gather-and-sum along ``axis``: one ``index_select`` per tap, no loops over voxels."""
    idx_np, w_np = table
    n_out, taps = idx_np.shape
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = n_out
    idx = torch.from_numpy(idx_np).to(x.device)
    w = torch.from_numpy(w_np).to(device=x.device, dtype=x.dtype)
    out = None
    for k in range(taps):
        term = x.index_select(axis, idx[:, k]) * w[:, k].reshape(shape)
        out = term if out is None else out.add_(term)
    return out


# The cubic B-spline prefilter (the inverse of sampling the B-spline, [1, 4, 1] / 6) is an IIR filter
# whose impulse response decays as Z1 ** |k|. Truncated at BSPLINE_PREFILTER taps per side,
# |Z1| ** 14 = 1e-8 of the centre tap, below float32's resolution: the upsampling is then a finite
# kernel, exact in blocks with a halo of BSPLINE_REACH low-res voxels, and equal to
# ``scipy.ndimage.zoom(order=3, grid_mode=True, mode="grid-mirror")`` to float32 rounding.
Z1 = math.sqrt(3.0) - 2.0
BSPLINE_PREFILTER = 14
BSPLINE_REACH = BSPLINE_PREFILTER + 2  # the prefilter plus the B-spline's own support


def bspline3(x: np.ndarray) -> np.ndarray:
    """The cubic B-spline."""
    a = np.abs(x)
    return np.where(a < 1.0, 2.0 / 3.0 - a**2 + a**3 / 2.0, np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))


def bspline_phase(f: int, p: int) -> np.ndarray:
    """Weights on input offsets ``-BSPLINE_REACH .. BSPLINE_REACH`` of output phase ``p`` of a x``f``
    cubic B-spline upsampling (pixel-centre aligned: the phase sits at ``(p + 0.5) / f - 0.5``)."""
    t = np.arange(-BSPLINE_PREFILTER, BSPLINE_PREFILTER + 1)
    h = (-6.0 * Z1 / (1.0 - Z1 * Z1)) * Z1 ** np.abs(t)  # prefilter: h * [1, 4, 1] / 6 = delta
    h /= h.sum()  # unit gain after truncation (a constant stays constant)
    delta = (p + 0.5) / f - 0.5
    m = np.arange(-BSPLINE_REACH, BSPLINE_REACH + 1)
    w = np.zeros(m.size)
    for k in range(-2, 3):  # the B-spline's support around the phase
        b = float(bspline3(np.array(delta - k)))
        if b:
            w += b * np.interp(k - m, t, h, left=0.0, right=0.0)  # h[k - m]: the prefilter is symmetric
    return w


@lru_cache(maxsize=64)
def phase_kernels(kind: str, param: float) -> tuple[np.ndarray, int, int]:
    """A resize or blur as a periodic convolution: ``(ker[phases, K], left, step)``.

    Output ``i = phases * k + p`` is ``sum_j ker[p, j] * xp[k * step + j]`` where ``xp`` is the
    input symmetric-padded by ``left`` voxels. Read off the interior rows of the very tap table
    (whose weights depend only on the phase), so both forms compute the same operator.
    """
    if kind == "up":
        f = int(param)
        n = 64
        idx, w = resize_table(n, n * f, float(f))
        rows, phases, step, base = [f * (n // 2) + p for p in range(f)], f, 1, [n // 2] * f
    elif kind == "down":
        f = int(param)
        n = 64 * f
        idx, w = resize_table(n, n // f, 1.0 / f)
        rows, phases, step, base = [32], 1, f, [32 * f]
    elif kind == "mean":  # detector integration: the mean of each f-voxel cell
        f = int(param)
        return np.full((1, f), 1.0 / f), 0, f
    elif kind == "pick":  # point sampling at each cell's centre: Keys cubic there, no antialiasing
        f = int(param)
        c = (f - 1) / 2.0
        offs = np.arange(int(math.floor(c)) - 1, int(math.floor(c)) + 3)
        w = cubic_kernel(c - offs)
        keep = w != 0.0
        offs, w = offs[keep], w[keep] / w[keep].sum()
        left = max(0, -int(offs.min()))
        ker = np.zeros((1, int(offs.max()) + left + 1))
        ker[0, offs + left] = w
        return ker, left, f
    elif kind == "bspline":  # cubic B-spline interpolation: prefilter and B-spline weights as one kernel
        f = int(param)
        ker = np.stack([bspline_phase(f, p) for p in range(f)])
        return ker, BSPLINE_REACH, 1
    elif kind == "blur":
        r = gaussian_table(1, float(param))[0].shape[1]  # taps of the kernel
        n = 4 * r + 8
        idx, w = gaussian_table(n, float(param))
        rows, phases, step, base = [n // 2], 1, 1, [n // 2]
    else:
        raise ValueError(f"unknown kernel kind {kind!r}")
    offs = [idx[r] - b for r, b in zip(rows, base)]
    lo = min(int(o.min()) for o in offs)
    hi = max(int(o.max()) for o in offs)
    ker = np.zeros((phases, hi - lo + 1))
    for p, (r, o) in enumerate(zip(rows, offs)):
        for oo, ww in zip(o, w[r]):
            ker[p, oo - lo] += ww
    return ker, -lo, step


def apply_phases(x: torch.Tensor, axis: int, kernel: tuple[np.ndarray, int, int], n_out: int) -> torch.Tensor:
    """Periodic convolution along ``axis``: one gather builds the symmetric-padded copy, then every
    tap is a strided view added in place (3.65x faster per back-projection iteration than one
    ``index_select`` per tap, benchmarks/README bottleneck 4; the copy is only made where a face
    reflects, see ``take``)."""
    ker, left, step = kernel
    axis = axis % x.ndim
    n = x.shape[axis]
    per = n_out // ker.shape[0]
    need = (per - 1) * step + ker.shape[1]
    return _phase_sum(take(x, axis, _reflect(np.arange(-left, need - left), n)), axis, kernel, per)


def _phase_sum(xp: torch.Tensor, axis: int, kernel: tuple[np.ndarray, int, int], per: int) -> torch.Tensor:
    """The taps of ``kernel`` summed over strided views of the padded input ``xp``: ``per`` outputs
    per phase, phases interleaved."""
    ker, _, step = kernel
    phases, taps = ker.shape
    x = xp
    shape = list(xp.shape)
    shape[axis] = per
    shape.insert(axis + 1, phases)
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    for p in range(phases):
        o = out.select(axis + 1, p)
        first = True
        for j in range(taps):
            wj = float(ker[p, j])
            if wj == 0.0:
                continue
            v = x.narrow(axis, j, (per - 1) * step + 1)
            if step > 1:
                v = v[(slice(None),) * axis + (slice(None, None, step),)]
            if first:
                torch.mul(v, wj, out=o)
                first = False
            else:
                o.add_(v, alpha=wj)
    shape = list(x.shape)
    shape[axis] = per * phases
    return out.reshape(shape)


# --------------------------------------------------------------------------- windows (block halos)
#
# A block reads a halo around the region it writes. Back-projection iterates down/up resizes,
# and each iteration can compute exactly only a slightly smaller region than the last (the
# taps at its edge would need voxels beyond the halo). Computing just that region, rather than
# the whole read region every iteration, is what "valid" convolutions do for the network. A
# window is an interval [start, stop) of one axis in the block's frame (its read region starts
# at 0, so resize phases line up with the volume's); at a side that is the volume's face the
# taps reflect as whole-volume resizing does, elsewhere they must fall inside the input.


def _reflect_at_faces(v: np.ndarray, n_in: int, faces: tuple[bool, bool]) -> np.ndarray:
    """Indices beyond a side that is a volume face reflect (as whole-volume resizing pads); beyond a
    halo side they stay out of range."""
    out = faces[0] & (v < 0) | faces[1] & (v >= n_in)
    return np.where(out, _reflect(v, n_in), v)


def valid_window(
    kernel: tuple[np.ndarray, int, int], inp: tuple[int, int], n_in: int, faces: tuple[bool, bool]
) -> tuple[int, int]:
    """Outputs of ``kernel`` (a resize or blur along one axis of ``n_in`` voxels) computable exactly
    from the input window ``inp``: every non-zero tap inside it, or reflected into it at a face."""
    ker, left, step = kernel
    phases = ker.shape[0]
    n_out = n_in * phases // step
    i = np.arange(n_out)
    k, p = i // phases, i % phases
    v = _reflect_at_faces((k * step - left)[:, None] + np.arange(ker.shape[1])[None, :], n_in, faces)
    ok = np.all(((v >= inp[0]) & (v < inp[1])) | (ker[p] == 0.0), axis=1)
    hit = np.nonzero(ok)[0]
    if hit.size == 0:
        return (0, 0)
    if hit[-1] - hit[0] + 1 != hit.size:
        raise AssertionError("valid outputs of a window are not contiguous")
    return int(hit[0]), int(hit[-1]) + 1


def apply_window(
    x: torch.Tensor,
    axis: int,
    kernel: tuple[np.ndarray, int, int],
    x_start: int,
    n_in: int,
    out: tuple[int, int],
    faces: tuple[bool, bool],
) -> torch.Tensor:
    """Outputs ``out`` of ``kernel`` along ``axis`` of the full axis (``n_in`` voxels, faces as
    given) from ``x``, which holds input voxels ``[x_start, x_start + len)``. Same arithmetic, tap
    for tap, as ``apply_phases`` on the whole axis."""
    ker, left, step = kernel
    phases, taps = ker.shape
    axis = axis % x.ndim
    k0, k1 = out[0] // phases, -(-out[1] // phases)
    v = _reflect_at_faces(np.arange(k0 * step - left, (k1 - 1) * step - left + taps), n_in, faces) - x_start
    # taps only the edge phases of the first/last cell read (outputs cropped below): any voxel will do
    v = np.clip(v, 0, x.shape[axis] - 1)
    y = _phase_sum(take(x, axis, v), axis, kernel, k1 - k0)
    return y.narrow(axis, out[0] - k0 * phases, out[1] - out[0])


ACQUISITIONS = ("cubic", "integrate", "sample")
# how each acquisition makes one low-res voxel from the (blurred) high-res axis: antialiased
# cubic (imresize), the mean of its f-voxel cell (a detector), or the value at the cell's centre
# (point sampling). Every low-res voxel sits at its cell's centre (the metadata's pixel-centre
# convention), so one cubic interpolation inverts all three and every flip commutes with them.
# "mixed" (what ``auto`` trains with): each training pair draws one of the three, so the network
# learns to invert whichever made the input; back-projection then uses the cubic model, and the
# held-aside check (on mixed pairs too) decides whether it helps.
DOWN_KIND = {"cubic": "down", "integrate": "mean", "sample": "pick", "mixed": "down"}
UP_KIND = {"cubic": "up", "integrate": "up", "sample": "up", "mixed": "up"}
MODELS = ACQUISITIONS + ("mixed",)


def check_acquisition(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown acquisition {name!r}: choose one of auto, {', '.join(ACQUISITIONS)}")
    return name


def resize(x: torch.Tensor, factors: tuple[int, ...], up: bool, acquisition: str = "cubic") -> torch.Tensor:
    """Resize of the trailing ``len(factors)`` axes by integer factors: down as ``acquisition``
    records (antialiased cubic, block mean or point sampling), up by the cubic interpolation on
    that acquisition's grid."""
    nd = len(factors)
    kinds = UP_KIND if up else DOWN_KIND
    kind = kinds[check_acquisition(acquisition)]
    for d, f in enumerate(factors):
        if f == 1:
            continue
        axis = x.ndim - nd + d
        n = x.shape[axis]
        if up:
            x = apply_phases(x, axis, phase_kernels(kind, f), n * f)
        else:
            if n % f:
                raise ValueError(f"axis of length {n} is not divisible by the factor {f}")
            x = apply_phases(x, axis, phase_kernels(kind, f), n // f)
    return x


# The interpolations a residual stage (and the safe baseline) adds its correction to: Keys cubic
# convolution (MATLAB's and Fiji's bicubic, a = -0.5) or the cubic B-spline (scipy's and skimage's
# order=3). Which is better depends on the data (block-mean inputs favour the B-spline, point
# samples Keys): the held-aside check picks (``harmcheck.do_no_harm``).
INTERPOLATIONS = {"keys": ("up", 2), "bspline": ("bspline", BSPLINE_REACH)}  # phase kernel, reach (low-res voxels)


def interpolation_kernel(interpolation: str, f: int) -> tuple[np.ndarray, int, int]:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
    return phase_kernels(INTERPOLATIONS[interpolation][0], f)


def upsample(x: torch.Tensor, factors: tuple[int, ...], interpolation: str = "keys") -> torch.Tensor:
    """Upsampling of the trailing ``len(factors)`` axes by ``interpolation`` (``INTERPOLATIONS``)."""
    nd = len(factors)
    for d, f in enumerate(factors):
        if f > 1:
            axis = x.ndim - nd + d
            x = apply_phases(x, axis, interpolation_kernel(interpolation, f), x.shape[axis] * f)
    return x


def phase_table(kernel: tuple[np.ndarray, int, int], n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """The tap table (reflected indices, weights) of a phase kernel on an axis of ``n_in`` voxels:
    the operator ``apply_phases`` computes, for receptive-field analysis."""
    ker, left, step = kernel
    phases, taps = ker.shape
    n_out = n_in * phases // step
    i = np.arange(n_out)
    k, p = i // phases, i % phases
    idx = (k * step - left)[:, None] + np.arange(taps)[None, :]
    return _compact(_reflect(idx, n_in), ker[p])


def blur(x: torch.Tensor, fwhm: tuple[float, ...] | None) -> torch.Tensor:
    """Separable Gaussian PSF blur of the trailing axes; FWHM per axis in voxels (0 = none)."""
    if fwhm is None:
        return x
    nd = len(fwhm)
    for d, s in enumerate(fwhm):
        if s and s > 0:
            axis = x.ndim - nd + d
            x = apply_phases(x, axis, phase_kernels("blur", float(s)), x.shape[axis])
    return x


@dataclass(frozen=True)
class Degradation:
    """High-res -> low-res model: optional Gaussian PSF (FWHM in high-res voxels), then the
    acquisition's downscale (antialiased cubic, detector integration or point sampling).

    ``noise`` = (gain, offset) of a variance model var(I) = gain*I + offset measured on the
    *low-res* input; training partners get the noise that downscaling did not already leave.
    """

    factors: tuple[int, ...]
    psf_fwhm: tuple[float, ...] | None = None
    noise: tuple[float, float] | None = None
    acquisition: str = "cubic"  # how the low-res voxels were made: see ``ACQUISITIONS``

    def down(self, y: torch.Tensor) -> torch.Tensor:
        return resize(blur(y, self.psf_fwhm), self.factors, up=False, acquisition=self.acquisition)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        return resize(x, self.factors, up=True, acquisition=self.acquisition)

    def kernels(self, axis: int) -> tuple:
        """(blur, down, up) phase kernels along one axis (None where the axis has none)."""
        f = self.factors[axis]
        fwhm = float(self.psf_fwhm[axis]) if self.psf_fwhm is not None and self.psf_fwhm[axis] else 0.0
        return (
            phase_kernels("blur", fwhm) if fwhm > 0 else None,
            phase_kernels(DOWN_KIND[self.acquisition], f) if f > 1 else None,
            phase_kernels(UP_KIND[self.acquisition], f) if f > 1 else None,
        )

    def noise_keep_fraction(self) -> float:
        """Fraction of i.i.d. noise variance that survives ``down``: per axis, the squared weights of
        one (interior) output row of the blur-then-resize chain, multiplied over axes."""
        frac = 1.0
        for d, f in enumerate(self.factors):
            n = 64 * f
            t = torch.eye(n, dtype=torch.float64)  # column j = response to a unit input at j
            blur_k, down_k, _ = self.kernels(d)
            if blur_k is not None:
                t = apply_table(t, 0, phase_table(blur_k, n))
            if down_k is not None:
                t = apply_table(t, 0, phase_table(down_k, n))
            frac *= float((t[t.shape[0] // 2] ** 2).sum())
        return frac

    def synthesize(
        self, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(low-res partner, target) for a crop ``y`` of the (possibly noisy) input.

        Clean data: ``(down(y), y)``. Noisy data (``noise`` set), recorrupted pairs: with
        z ~ N(0, var(y)) the input is built from y + z and the target is y - z, whose noises are
        uncorrelated, so the L2 optimum is the *clean* high-res image rather than one that copies
        the input's noise. The partner then gets the noise still missing for it to carry exactly
        the input's noise level (downscaling averages most of y + z's noise away).
        """
        if self.acquisition == "mixed":
            pick = int(torch.randint(len(ACQUISITIONS), (1,), generator=generator))
            one = Degradation(self.factors, self.psf_fwhm, self.noise, ACQUISITIONS[pick])
            return one.synthesize(y, generator)
        if self.noise is None or (self.noise[0] <= 0 and self.noise[1] <= 0):
            return self.down(y), y
        gain, offset = self.noise
        z = torch.randn(y.shape, generator=generator, dtype=y.dtype) * (gain * y.clamp(min=0) + offset).sqrt()
        x = self.down(y + z)
        missing = max(0.0, 1.0 - 2.0 * self.noise_keep_fraction())
        var = (gain * x.clamp(min=0) + offset) * missing
        x = x + torch.randn(x.shape, generator=generator, dtype=x.dtype) * var.sqrt()
        return x, y - z
