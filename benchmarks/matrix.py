"""The case matrix of benchmarks/quality.py: synthetic truths, acquisitions, noise, and the cases.

Axes (every value appears several times; the table below is a fixed, deterministic sample of the
product, not the product itself):

* structure: ``beads`` (sparse sub-resolution spheres), ``filaments`` (random smooth tubes),
  ``nuclei`` (rotated ellipsoids of radius 4-10 high-res voxels, soft edges, smooth interiors with
  a band-limited chromatin-like texture), ``texture`` (a dense band-limited random field through a
  sigmoid, filling the volume);
* PSF: ``nopsf`` (the object itself is the truth) or ``psfL`` = an anisotropic Gaussian applied to
  the object at high resolution: lateral FWHM L low-res voxels (L in 1.5-2.5, i.e. L x the lateral
  factor in high-res voxels), axial FWHM 2.5 x the lateral, in high-res voxels;
* acquisition (high-res truth -> low-res observation): ``cubic`` (MATLAB-imresize antialiased cubic
  downscale, ``svision_big.degrade.resize(up=False)``: the method authors' own simulation),
  ``integrate`` (detector integration: the mean of each factor-sized block), ``sample`` (point
  sampling at each low-res cell's centre, high-res position j*f + (f-1)/2, where the pixel-centre
  convention of OME-Zarr puts low-res voxel j; see ``centre_samples``);
* noise, added to the low-res observation in photon units scaled so that the clean low-res peak
  is N photons: ``clean`` (none), ``p1000`` (Poisson, N = 1000), ``p200r1`` (Poisson N = 200 plus
  Gaussian read noise of std 1% of the peak), ``p50`` (Poisson, N = 50). Stored as float32, not
  clipped at 0 (read noise makes some background voxels negative, as a camera's offset-subtracted
  values are);
* factors: (2, 2, 2), (4, 4, 4), (4, 2, 2), (2, 1, 1), (4, 1, 1).

Case names read ``structure-acquisition-psf-noise-xFACTOR`` (``x2`` = (2, 2, 2), ``x422`` =
(4, 2, 2), ``x211`` = z only), e.g. ``beads-cubic-nopsf-clean-x4``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from svision_big.synthetic import beads as _beads
from svision_big.synthetic import filaments as _filaments
from svision_big.synthetic import psf_blur

STRUCTURES = ("beads", "filaments", "nuclei", "texture")
ACQUISITIONS = ("cubic", "integrate", "sample")
# name -> (photons at the clean low-res peak, Gaussian read-noise std as a fraction of that peak)
NOISE = {"clean": (None, 0.0), "p1000": (1000.0, 0.0), "p200r1": (200.0, 0.01), "p50": (50.0, 0.0)}
FACTORS = {"x2": (2, 2, 2), "x4": (4, 4, 4), "x422": (4, 2, 2), "x211": (2, 1, 1), "x411": (4, 1, 1)}
PSF_AXIAL_RATIO = 2.5

# Low-res shape per factor. Lateral 96 (x2 lateral) or 128 (z-only) low-res voxels lets training
# hold aside a validation slab disjoint from its crops; x4 in z keeps 16 low-res slices (>= 12).
SHAPE_LR = {
    "x2": (32, 96, 96),  # high-res 64 x 192 x 192
    "x4": (16, 96, 96),  # high-res 64 x 384 x 384
    "x422": (16, 96, 96),  # high-res 64 x 192 x 192
    "x211": (32, 128, 128),  # high-res 64 x 128 x 128
    "x411": (16, 128, 128),  # high-res 64 x 128 x 128
}


@dataclass(frozen=True)
class Case:
    structure: str
    acquisition: str
    psf_lr: float | None  # lateral PSF FWHM in low-res voxels, None = no PSF
    noise: str
    factor: str  # key of FACTORS
    shape_lr: tuple[int, int, int] | None = None  # None = SHAPE_LR[factor]
    tag: str = ""  # name suffix (quick cases)
    authors_beads: bool = False  # the authors'-beads case: lateral bead FWHM target
    z_step: int = 1  # the truth's own z step in lateral voxels (anisotropic cases: its planes point-sampled)
    anisotropic: bool = False  # issue 26's group: z sampled 4x coarser than y/x, z-only factors

    @property
    def factors(self) -> tuple[int, int, int]:
        return FACTORS[self.factor]

    @property
    def lr_shape(self) -> tuple[int, int, int]:
        return self.shape_lr or SHAPE_LR[self.factor]

    @property
    def psf_text(self) -> str:
        return "nopsf" if self.psf_lr is None else f"psf{self.psf_lr:.1f}"

    @property
    def name(self) -> str:
        aniso = f"-zstep{self.factors[0] * self.z_step}" if self.anisotropic else ""
        return f"{self.structure}-{self.acquisition}-{self.psf_text}-{self.noise}-{self.factor}{aniso}{self.tag}"

    @property
    def noisy(self) -> bool:
        return self.noise != "clean"

    @property
    def seed(self) -> int:
        """Data seed, fixed by the name (the table order can change without changing a case)."""
        return zlib.crc32(self.name.encode()) % (2**31 - 1)

    def psf_fwhm_hr(self) -> tuple[float, float, float] | None:
        """PSF FWHM per axis (z, y, x) in high-res voxels."""
        if self.psf_lr is None:
            return None
        fz, fy, fx = self.factors
        lat_y, lat_x = self.psf_lr * fy, self.psf_lr * fx
        return (PSF_AXIAL_RATIO * 0.5 * (lat_y + lat_x), lat_y, lat_x)


# The fixed table: 14 clean + 13 noisy synthetic cases.
C, I, S = "cubic", "integrate", "sample"
CASES: list[Case] = [
    # ---- clean
    Case("beads", C, None, "clean", "x2"),  # paper-like: beads, imresize acquisition, no extra PSF
    Case("beads", C, 1.7, "clean", "x4", authors_beads=True),  # authors' beads: x4 imresize, 1.7 low-res px PSF
    Case("beads", C, None, "clean", "x4"),
    Case("beads", I, 2.0, "clean", "x422"),
    Case("beads", S, 1.5, "clean", "x211"),
    Case("filaments", I, None, "clean", "x2"),
    Case("filaments", S, 2.5, "clean", "x4"),
    Case("filaments", C, 1.5, "clean", "x411"),
    Case("nuclei", I, 2.0, "clean", "x2"),
    Case("nuclei", S, None, "clean", "x422"),
    Case("nuclei", C, 2.5, "clean", "x211"),
    Case("texture", S, None, "clean", "x2"),
    Case("texture", I, 1.5, "clean", "x411"),
    Case("texture", C, 2.0, "clean", "x422"),
    # ---- noisy: every noise level with several factors and all three acquisitions
    Case("beads", I, 2.0, "p1000", "x2"),
    Case("beads", S, None, "p200r1", "x4"),
    Case("beads", C, 1.5, "p50", "x211"),
    Case("filaments", C, 2.0, "p1000", "x422"),
    Case("filaments", I, 1.5, "p200r1", "x2"),
    Case("filaments", S, None, "p50", "x411"),
    Case("nuclei", S, 2.5, "p1000", "x211"),
    Case("nuclei", C, None, "p200r1", "x422"),
    Case("nuclei", I, 2.0, "p50", "x4"),
    Case("nuclei", C, 1.5, "p1000", "x411"),
    Case("texture", C, 1.5, "p1000", "x4"),
    Case("texture", S, 2.0, "p200r1", "x211"),
    Case("texture", I, None, "p50", "x2"),
]

# Issue 26's anisotropic group (``quality.py --anisotropic``): z-stacks whose low-res planes are 4x
# the lateral pixel apart (z factor 2 on a truth itself sampled every 2 lateral voxels in z, or z factor
# 4 on an isotropic truth), axial PSF 2.5x the lateral, every structure once per z factor, clean and
# Poisson 200 with 1% read noise; point sampling (z-steps) on five, block means on three.
ANISOTROPIC_CASES: list[Case] = [
    Case("filaments", S, 1.5, "clean", "x211", z_step=2, anisotropic=True),
    Case("beads", S, 1.5, "p200r1", "x211", z_step=2, anisotropic=True),
    Case("nuclei", I, 1.5, "p200r1", "x211", z_step=2, anisotropic=True),
    Case("texture", S, 2.0, "clean", "x211", z_step=2, anisotropic=True),
    Case("filaments", I, 2.0, "p200r1", "x411", anisotropic=True),
    Case("beads", S, 2.0, "clean", "x411", anisotropic=True),
    Case("nuclei", S, 2.0, "clean", "x411", anisotropic=True),
    Case("texture", I, 1.5, "p200r1", "x411", anisotropic=True),
]

# --quick: small volumes spanning the three acquisitions and the noise axis.
QUICK_CASES: list[Case] = [
    Case("beads", C, None, "clean", "x2", shape_lr=(16, 48, 48), tag="-small"),
    Case("filaments", S, 2.0, "p200r1", "x422", shape_lr=(12, 48, 48), tag="-small"),
    Case("nuclei", I, 1.5, "p50", "x211", shape_lr=(16, 48, 48), tag="-small"),
]


# --------------------------------------------------------------------------- structures


def nuclei(
    shape: tuple[int, ...], rng: np.random.Generator, fill: float = 0.25, radius: tuple[float, float] = (4.0, 10.0)
) -> np.ndarray:
    """Nuclei-like blobs: randomly rotated ellipsoids (semi-axes in ``radius``, high-res voxels),
    soft one-voxel edges, brightness 0.5-1 each, interiors modulated by a band-limited texture
    (chromatin) and a slight dimming towards the centre. ``fill`` = target volume fraction."""
    shape = tuple(int(s) for s in shape)
    out = np.zeros(shape, np.float32)
    tex = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.2)
    tex /= float(tex.std()) + 1e-12
    mean_vol = 4.0 / 3.0 * math.pi * (0.5 * sum(radius)) ** 3
    n = max(3, int(round(fill * float(np.prod(shape)) / mean_vol)))
    for _ in range(n):
        r = rng.uniform(radius[0], radius[1])
        semi = np.clip(r * rng.uniform(0.75, 1.25, 3), radius[0], radius[1])
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))  # random rotation
        c = rng.uniform(0, 1, 3) * (np.asarray(shape) - 1)
        reach = int(math.ceil(semi.max())) + 2
        lo = np.maximum(np.floor(c).astype(int) - reach, 0)
        hi = np.minimum(np.floor(c).astype(int) + reach + 1, shape)
        if np.any(hi <= lo):
            continue
        grids = np.meshgrid(*[np.arange(a, b) - cc for a, b, cc in zip(lo, hi, c)], indexing="ij")
        pts = np.stack(grids, -1) @ q  # coordinates in the ellipsoid's frame
        d = np.sqrt(((pts / semi) ** 2).sum(-1))  # 1 on the surface
        edge = 0.5 * (1.0 - np.tanh((d - 1.0) * semi.mean() / 0.8))  # ~1 voxel soft edge
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        val = rng.uniform(0.5, 1.0) * edge * (0.78 + 0.22 * np.tanh(tex[box])) * (0.85 + 0.15 * np.minimum(d, 1.0))
        np.maximum(out[box], val.astype(np.float32), out=out[box])
    return out


def texture(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Dense texture: two band-limited Gaussian random fields (sigma 1 and 3 high-res voxels), each
    of unit std, summed and passed through a sigmoid; fills the whole volume with values in (0, 1)."""
    shape = tuple(int(s) for s in shape)
    g = np.zeros(shape, np.float32)
    for sigma, w in ((1.0, 0.6), (3.0, 0.8)):
        f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
        g += w * f / (float(f.std()) + 1e-12)
    return (1.0 / (1.0 + np.exp(-2.5 * (g - 0.2)))).astype(np.float32)


def make_object(structure: str, shape_hr: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    voxels = int(np.prod(shape_hr))
    if structure == "beads":
        return _beads(shape_hr, n=max(3, voxels // 8000), rng=rng)
    if structure == "filaments":
        return _filaments(shape_hr, n=max(2, int(round(voxels / 60000))), rng=rng)
    if structure == "nuclei":
        return nuclei(shape_hr, rng)
    if structure == "texture":
        return texture(shape_hr, rng)
    raise ValueError(f"unknown structure {structure!r}")


# --------------------------------------------------------------------------- acquisition


def acquire(truth: np.ndarray, factors: tuple[int, ...], how: str) -> np.ndarray:
    """Noise-free low-res observation of the high-res ``truth``."""
    truth = np.ascontiguousarray(truth, dtype=np.float32)
    if how == "cubic":
        import torch

        from svision_big.degrade import resize

        return resize(torch.from_numpy(truth), tuple(factors), up=False).numpy()
    if how == "integrate":
        split = []
        for s, f in zip(truth.shape, factors):
            split += [s // f, f]
        return truth.reshape(split).mean(axis=tuple(range(1, 2 * truth.ndim, 2)), dtype=np.float64).astype(np.float32)
    if how == "sample":
        return centre_samples(truth, factors)
    raise ValueError(f"unknown acquisition {how!r}")


def centre_samples(truth: np.ndarray, factors: tuple[int, ...], pad: int = 16) -> np.ndarray:
    """Point samples at each low-res cell's centre, high-res position f*k + (f-1)/2: where the
    pixel-centre convention of OME-Zarr (and of svision-big) puts low-res voxel k. For even f the
    centre falls between high-res voxels: the truth is shifted there by Fourier interpolation
    (after a symmetric pad, so the faces do not wrap), then every f-th voxel is kept. Sampling
    voxel f*k instead would put the truth half a high-res voxel off the grid the metadata claim."""
    x = np.asarray(truth, dtype=np.float64)
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        shift = (f - 1) / 2.0
        if shift != int(shift):
            widths = [(0, 0)] * x.ndim
            widths[axis] = (pad, pad)
            xp = np.pad(x, widths, mode="symmetric")
            n = xp.shape[axis]
            ramp = np.exp(2j * np.pi * np.fft.fftfreq(n) * shift)
            if n % 2 == 0:
                ramp[n // 2] = np.cos(np.pi * shift)  # the Nyquist term stays real
            shape = [1] * x.ndim
            shape[axis] = n
            xs = np.fft.ifft(np.fft.fft(xp, axis=axis) * ramp.reshape(shape), axis=axis).real
            x = np.take(xs, np.arange(pad, pad + x.shape[axis]), axis=axis)
            start = 0
        else:
            start = int(shift)
        x = np.take(x, np.arange(start, x.shape[axis] - (f - 1 - start), f), axis=axis)
    return np.ascontiguousarray(np.clip(x, 0.0, None) if truth.min() >= 0 else x, dtype=np.float32)


@dataclass
class NoiseInfo:
    """What was added, and the truth about it in the units the model sees."""

    name: str
    photons: float | None  # photons at the clean low-res peak
    read: float  # read-noise std, fraction of the clean low-res peak
    peak: float  # clean low-res peak (intensity units)
    extra: dict = field(default_factory=dict)

    @property
    def scale(self) -> float | None:
        """Photons per intensity unit."""
        return None if self.photons is None else self.photons / self.peak

    def std_at(self, intensity: float) -> float:
        """True noise std (intensity units) at a clean intensity."""
        var = 0.0
        if self.scale is not None:
            var += max(intensity, 0.0) / self.scale
        var += (self.read * self.peak) ** 2
        return math.sqrt(var)

    def describe(self, norm_lo: float | None = None, norm_hi: float | None = None) -> dict:
        """Noise std at half the clean peak (fraction of the peak) and, given the model's
        normalisation x_n = (x - lo) / (hi - lo), at normalised intensity 0.5 with the true
        variance model var_n(v) = gain * v + offset in those units."""
        if self.photons is None and self.read == 0:
            return {"noise": "none"}
        out = {
            "photons_at_peak": self.photons,
            "read_std_of_peak": self.read,
            "std_at_half_peak_of_peak": round(self.std_at(0.5 * self.peak) / self.peak, 5),
        }
        if norm_lo is not None and norm_hi is not None and norm_hi > norm_lo:
            rng_ = norm_hi - norm_lo
            mid = norm_lo + 0.5 * rng_
            out["std_at_mid_normalised"] = round(self.std_at(mid) / rng_, 5)
            gain = 0.0 if self.scale is None else 1.0 / (self.scale * rng_)
            offset = (0.0 if self.scale is None else max(norm_lo, 0.0) / (self.scale * rng_**2)) + (
                self.read * self.peak / rng_
            ) ** 2
            out["true_gain_offset_normalised"] = [round(gain, 7), round(offset, 9)]
        return out


def add_noise(clean: np.ndarray, noise: str, rng: np.random.Generator) -> tuple[np.ndarray, NoiseInfo]:
    photons, read = NOISE[noise]
    peak = float(clean.max())
    info = NoiseInfo(noise, photons, read, peak)
    if photons is None and read == 0:
        return clean.astype(np.float32), info
    x = clean.astype(np.float64)
    if photons is not None:
        s = photons / peak
        x = rng.poisson(np.clip(x, 0.0, None) * s) / s  # cubic downscaling can ring slightly below 0
    if read:
        x = x + rng.normal(0.0, read * peak, size=x.shape)
    return x.astype(np.float32), info


@dataclass
class Synthetic:
    truth: np.ndarray  # high-res truth (object, PSF-blurred if any), max 1
    clean: np.ndarray  # noise-free low-res observation
    observed: np.ndarray  # what the tool gets (float32)
    noise: NoiseInfo


def simulate(case: Case) -> Synthetic:
    rng = np.random.default_rng(case.seed)
    shape_hr = tuple(s * f for s, f in zip(case.lr_shape, case.factors))
    fine = (shape_hr[0] * case.z_step, *shape_hr[1:])  # isotropic: the object and its PSF live here
    obj = make_object(case.structure, fine, rng)
    psf = case.psf_fwhm_hr()
    truth = psf_blur(obj, psf) if psf is not None else obj.astype(np.float32)
    if case.z_step > 1:  # the truth's planes are z-steps of the isotropic scene: point samples
        truth = acquire(truth, (case.z_step, 1, 1), "sample")
    truth = (truth / max(float(truth.max()), 1e-12)).astype(np.float32)
    clean = acquire(truth, case.factors, case.acquisition)
    observed, info = add_noise(clean, case.noise, np.random.default_rng(case.seed + 1))
    return Synthetic(truth, clean, observed, info)


# --------------------------------------------------------------------------- sample-aligned cubic


def keys_kernel(t: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys (1981) cubic convolution kernel; a = -0.5 is the interpolating 'cubic' of MATLAB."""
    t = np.abs(t)
    t2, t3 = t * t, t * t * t
    near = (a + 2.0) * t3 - (a + 3.0) * t2 + 1.0
    far = a * t3 - 5.0 * a * t2 + 8.0 * a * t - 4.0 * a
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


def _symmetric(idx: np.ndarray, n: int) -> np.ndarray:
    """Half-sample symmetric extension (numpy's 'symmetric' pad: -1 -> 0, n -> n - 1)."""
    m = np.mod(idx, 2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def cubic_sample_aligned(x: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Keys cubic interpolation through samples that sit at high-res positions j * f (point
    sampling starting at voxel 0), symmetric boundary; the output has n * f voxels per axis.
    Not ``scipy.ndimage.map_coordinates(order=3)``, which is a cubic B-spline."""
    y = np.asarray(x, dtype=np.float32)
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        n = y.shape[axis]
        u = np.arange(n * f, dtype=np.float64) / f  # low-res coordinate of each output voxel
        k0 = np.floor(u).astype(np.int64)
        out = None
        for t in range(-1, 3):
            k = k0 + t
            w = keys_kernel(u - k).astype(np.float32)
            shape = [1] * y.ndim
            shape[axis] = n * f
            term = np.take(y, _symmetric(k, n), axis=axis) * w.reshape(shape)
            out = term if out is None else out + term
        y = out
    return y
