"""The inference operator: ensemble -> back-projection -> clamp, per stage; volume in, volume out.

Everything here is a pure function of (input array, operator spec), so the whole-volume result
is the reference that chunked inference must reproduce. The exact halo a block needs is derived
from the same spec in ``halo.py``; the mapping between raw and normalised values is ``values.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from .degrade import Degradation, apply_window, interpolation_kernel, valid_window
from .network import SVNet
from .precision import DEFAULT_PRECISION
from .values import Normalisation, to_output


def clamp_(y: torch.Tensor, bounds) -> torch.Tensor:
    """In-place clamp to ``bounds`` = (low, high) (either None), or a single low value."""
    lo, hi = bounds if isinstance(bounds, tuple) else (bounds, None)
    if lo is None and hi is None:
        return y
    return y.clamp_(min=lo, max=hi)


@dataclass(frozen=True)
class StageOp:
    """One network stage (usually x2 on some axes) and its data-chosen inference settings."""

    net: SVNet = field(compare=False)
    degradation: Degradation
    bp_iters: int
    ensemble: int | bool = True  # variants averaged: True (all), 8, 4 or 1
    zflip: bool = False  # the variants include z flips (``_variants``); models written before: lateral only

    @property
    def factors(self) -> tuple[int, ...]:
        return self.degradation.factors


@dataclass(frozen=True)
class OperatorSpec:
    stages: tuple[StageOp, ...]
    norm: Normalisation
    final: Degradation | None = None  # full-factor degradation for the closing back-projection
    final_bp_iters: int = 0
    precision: str = DEFAULT_PRECISION  # the networks' arithmetic (see ``PRECISIONS``); the rest is float32

    @property
    def factors(self) -> tuple[int, ...]:
        out = [1] * len(self.stages[0].factors)
        for s in self.stages:
            out = [a * b for a, b in zip(out, s.factors)]
        return tuple(out)

    @property
    def ndim(self) -> int:
        return len(self.stages[0].factors)


# --------------------------------------------------------------------------- precision

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


AUTO_ENV = "SVISION_BIG_AUTO_PRECISION"  # what "auto" means, when set (the test suite pins float32)


def cpu_has_bf16() -> bool:
    """Native bfloat16 dot products (AVX512-BF16 or AMX), read from the CPU flags: where the CPU
    only emulates bfloat16, float32 is the faster choice."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``auto`` -> the precision a run uses: bfloat16 on a CPU with native bfloat16 (1.3x the
    float32 operator, fit-PSNR within 0.03 dB on trained models, see benchmarks/README.md), float32
    elsewhere (CUDA included: its half precisions are not measured yet). ``$SVISION_BIG_AUTO_PRECISION``
    overrides the rule."""
    if precision != "auto":
        return precision
    pinned = os.environ.get(AUTO_ENV)
    if pinned:
        if pinned not in PRECISIONS:
            raise ValueError(f"${AUTO_ENV}={pinned}: choose one of {', '.join(PRECISIONS)}")
        return pinned
    return "bfloat16" if torch.device(device).type == "cpu" and cpu_has_bf16() else "float32"


def precision_dtype(precision: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype the networks run in.

    float32 is the reference (the seamless invariant is stated for it). bfloat16 halves the
    convolutions' time on CPUs with AVX512-BF16 or AMX, at an accuracy cost measured in
    ``benchmarks/``; cubic upsampling, the ensemble mean and back-projection stay
    float32. float16 is for CUDA devices only."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "float16" and torch.device(device).type == "cpu":
        raise ValueError("precision float16 needs a CUDA device; on CPU use bfloat16")
    return PRECISIONS[precision]


# --------------------------------------------------------------------------- ensemble


ENSEMBLES = (8, 4, 1)  # variants the held-aside check chooses from: each halving halves the network's cost


_FLIPS = [(0, False), (0, True), (2, False), (2, True)]


def _lateral_variants(rotations: bool, size: int | bool = True) -> list[tuple[int, bool]]:
    """Lateral (y, x) symmetries: the 8 of the square (rot90 x flip) or, when y and x are
    upsampled differently (rotation would swap their factors), or 4 are asked for, the 4 flips
    (none, x, y and x, y); ``size`` 1 or False: the identity. True = as many as the factors allow."""
    if size is True:  # before the size test: True == 1 in Python
        return [(k, flip) for k in range(4) for flip in (False, True)] if rotations else _FLIPS
    if size is False or size == 1:
        return [(0, False)]
    if rotations and size >= 8:
        return [(k, flip) for k in range(4) for flip in (False, True)]
    return _FLIPS


# With z flips (``StageOp.zflip``, every 3D stage trained since they were measured): 8 variants are the 4
# lateral flips in both z orientations, 4 are the identity and the y-and-x flip in both, 1 the identity.
# A network's error has a z-alternating part (its sub-voxel phases along z) that lateral symmetries
# cannot average out and a z flip does: docs/fidelity.md, section 3g.
_Z_VARIANTS = {
    8: [(k, f, z) for z in (False, True) for k, f in _FLIPS],
    4: [(k, False, z) for k in (0, 2) for z in (False, True)],
}


def _variants(rotations: bool, size: int | bool = True, zflip: bool = False) -> list[tuple[int, bool, bool]]:
    """The ensemble's variants as (lateral rot90 count, x flip, z flip): lateral only
    (``_lateral_variants``) unless ``zflip``."""
    if not zflip:
        return [(k, f, False) for k, f in _lateral_variants(rotations, size)]
    if size is False or (size is not True and size < 4):
        return [(0, False, False)]
    return _Z_VARIANTS[8 if size is True or size >= 8 else 4]


def ensemble_size(ensemble: int | bool, factors: tuple[int, ...], zflip: bool = False) -> int:
    """How many variants ``ensemble`` runs for a stage with these factors."""
    return len(_variants(len(factors) >= 2 and factors[-2] == factors[-1], ensemble, zflip))


def _forward_t(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k, dims=(-2, -1)) if k else x


def _inverse_t(y: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    if k:
        y = torch.rot90(y, -k, dims=(-2, -1))
    return torch.flip(y, dims=(-1,)) if flip else y


SLAB = 8  # low-res z-slices per streamed network step (measured: 4-16 equally fast, 2 slower)


def _transform_faces(faces, k: int, flip: bool, zflip: bool = False):
    """Which sides are volume faces after an ensemble variant's flip/rotation (and z flip: its two
    z sides swap)."""
    (ylo, yhi), (xlo, xhi) = faces[-2:]
    m = torch.zeros(3, 3)
    m[0, 1], m[2, 1], m[1, 0], m[1, 2] = float(ylo), float(yhi), float(xlo), float(xhi)
    m = _forward_t(m, k, flip)
    lat = ((bool(m[0, 1]), bool(m[2, 1])), (bool(m[1, 0]), bool(m[1, 2])))
    rest = tuple(faces[:-2])
    if zflip:
        rest = ((rest[0][1], rest[0][0]),) + rest[1:]
    return rest + lat


def predict(net: SVNet, x: torch.Tensor, ensemble: bool = True, faces=None, zflip: bool = False) -> torch.Tensor:
    """Network output for a spatial tensor, averaged over the lateral symmetry group (and z flips
    with ``zflip``, 3D only).

    ``faces`` (per axis, (low, high)): which sides of ``x`` are the volume's faces. Other sides
    are halo: the output leaves out ``trim_radius(net)`` input voxels there, because the
    convolutions run unpadded ('valid') instead of computing values only the halo's edge would
    need, and the network runs only where the output needs it when the residual's interpolation
    reaches farther than the convolutions (the B-spline: 16 voxels against 8). ``None``: the whole
    volume, every side a face, output the full upsampled size.

    Runs channels-last (about 25% faster convolutions on CPU), streams 3D inputs through the
    network in z-slabs (the symmetries are lateral, so every variant's slab undoes into the same
    output slab; a z-flipped variant's slabs arrive in reverse order and are flipped back into
    place), and adds the residual's cubic upsampling once: it commutes with every flip and
    rotation, so averaging it is a no-op."""
    fmt = torch.channels_last_3d if x.ndim == 3 else torch.channels_last
    factors = net.config.factors
    faces = tuple(faces) if faces is not None else ((True, True),) * x.ndim
    r = net.conv_radius()
    if net.config.face == "mirror" and r:
        x, faces = mirror_faces(x, faces, r)
    t = trim_radius(net)
    trim = [(0 if lo else t, 0 if hi else t) for lo, hi in faces]
    # the network's input: what its convolutions need around the output, no more
    xn = x[tuple(slice(a - r if a else 0, n - b + r if b else n) for n, (a, b) in zip(x.shape, trim))]
    variants = _variants(x.ndim >= 2 and factors[-2] == factors[-1], ensemble, zflip and x.ndim == 3)
    shape = [(n - a - b) * f for n, (a, b), f in zip(x.shape, trim, factors)]
    acc = torch.zeros(shape, dtype=x.dtype, device=x.device)
    net_dtype = next(net.parameters()).dtype  # 16-bit nets: slabs in, float32 accumulation
    for k, flip, zf in variants:
        xt = _forward_t(torch.flip(xn, (0,)) if zf else xn, k, flip)
        xt = xt[None, None].to(net_dtype).contiguous(memory_format=fmt)
        for z0, y in net.correction_slabs(xt, SLAB, _transform_faces(faces, k, flip, zf)):
            y = _inverse_t(y[0, 0], k, flip)
            if zf:
                y, z0 = torch.flip(y, (0,)), shape[0] - z0 - y.shape[0]
            acc[z0 : z0 + y.shape[0]] += y
    if len(variants) > 1:
        acc /= len(variants)
    if net.config.residual:
        start = [a * f for (a, _), f in zip(trim, factors)]
        add_upsampled(acc, x, factors, start, faces, interpolation=net.config.interpolation)
    return acc


def trim_radius(net: SVNet) -> int:
    """Input voxels a network pass leaves out of its output on a halo side: the farther of the
    convolutions' radius and the residual interpolation's reach (``NetConfig.radius``), except for
    mirrored faces, which extend the input by the convolutions' radius only (the denoiser)."""
    return net.conv_radius() if net.config.face == "mirror" else net.config.radius()


def mirror_faces(x: torch.Tensor, faces, r: int):
    """``x`` extended by ``r`` mirrored voxels (x[-1] = x[0]) beyond each side that is a volume face,
    and those sides then marked as halo: a net with ``face="mirror"`` sees there what a filter
    with symmetric boundaries sees, and whole-volume and blockwise inference agree because a
    block at a face mirrors the same voxels the whole volume does."""
    out = []
    for axis, (lo, hi) in enumerate(faces):
        if lo or hi:
            n = x.shape[axis]
            if n < r:
                raise ValueError(f"a block of {n} voxels along axis {axis} is thinner than the mirrored margin {r}")
            parts = (
                ([torch.flip(x.narrow(axis, 0, r), (axis,))] if lo else [])
                + [x]
                + ([torch.flip(x.narrow(axis, n - r, r), (axis,))] if hi else [])
            )
            x = torch.cat(parts, axis)
        out.append((False, False))
    return x, tuple(out)


def add_upsampled(
    acc: torch.Tensor,
    x: torch.Tensor,
    factors: tuple[int, ...],
    start: list[int],
    faces,
    chunk: int = 32,
    interpolation: str = "keys",
) -> torch.Tensor:
    """``acc += upsample(x, factors, interpolation)[start : start + acc.shape]``, ``chunk`` high-res slices
    of axis 0 at a time, each axis through ``apply_window`` (tap for tap the whole resize). The
    whole upsampled block and its intermediates (about 150 MB for a 256^3 block) were the largest
    allocation of a network pass."""
    kers = [interpolation_kernel(interpolation, f) if f > 1 else None for f in factors]
    for c0 in range(0, acc.shape[0], chunk):
        c1 = min(acc.shape[0], c0 + chunk)
        t = x
        for d, ker in enumerate(kers):
            o = (start[d] + c0, start[d] + c1) if d == 0 else (start[d], start[d] + acc.shape[d])
            if ker is None:
                t = t.narrow(d, o[0], o[1] - o[0])
            else:
                t = apply_window(t, d, ker, 0, x.shape[d], o, faces[d])
        acc[c0:c1] += t
    return acc


def _axis_kernels(deg: Degradation, axis: int):
    return deg.kernels(axis)


def _cap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, max(lo, hi))


def bp_windows(deg: Degradation, axis: int, iters: int, n_lr: int, faces: tuple[bool, bool]) -> list:
    """Per iteration, along one axis of a block (``n_lr`` low-res voxels read): the windows
    (y in, blurred, low-res residual, y out) that iteration computes exactly. On halo sides each
    iteration loses the margin its taps need (about 3.3 low-res voxels at x2), so it computes only
    what later iterations can still use, as unpadded convolutions do for the network."""
    f = deg.factors[axis]
    blur_k, down_k, up_k = _axis_kernels(deg, axis)
    n_hr = n_lr * f
    v, out = (0, n_hr), []
    for _ in range(iters):
        b = valid_window(blur_k, v, n_hr, faces) if blur_k is not None else v
        q = _cap(valid_window(down_k, b, n_hr, faces) if down_k is not None else b, (0, n_lr))
        u = valid_window(up_k, q, n_lr, faces) if up_k is not None else q
        nv = _cap(u, v)
        out.append((v, b, q, nv))
        v = nv
    return out


@lru_cache(maxsize=256)
def _bp_start(
    factors: tuple[int, ...], psf: tuple[float, ...] | None, acquisition: str, axis: int, iters: int, lo_face: bool
) -> int:
    """High-res start of back-projection's exact output in a block whose low side is (not) a face:
    it does not depend on the block's length, so a stand-in axis long enough that the windows
    never meet gives it (every iteration trims at most all its taps from each side)."""
    deg = Degradation(factors, psf, acquisition=acquisition)
    reach = sum(k[0].shape[1] for k in _axis_kernels(deg, axis) if k is not None)  # in voxels, >= low-res
    n = 64 + 2 * iters * (reach + 2)
    wins = bp_windows(deg, axis, iters, n, (lo_face, False))
    assert wins[-1][3][1] - wins[-1][3][0] >= n * deg.factors[axis] // 2, "stand-in axis too short"
    return wins[-1][3][0]


def back_project(y: torch.Tensor, x: torch.Tensor, deg: Degradation, iters: int, floor, faces=None) -> torch.Tensor:
    """Iterative back-projection y += up(x - down(y)), clamped inside every iteration.

    ``faces`` (per axis, (low, high)): which sides of the block are volume faces; on the others
    every iteration computes only what it can compute exactly (``bp_windows``), so the result
    covers less than ``y`` (``Pass.output_offset`` says where it starts). ``None``: the whole volume,
    the same arithmetic tap for tap."""
    nd = len(deg.factors)
    faces = tuple(faces) if faces is not None else ((True, True),) * nd
    lead = y.ndim - nd
    wins = [bp_windows(deg, a, iters, x.shape[lead + a], faces[a]) for a in range(nd)]
    kers = [_axis_kernels(deg, a) for a in range(nd)]
    for i in range(iters):
        t = y
        for a in range(nd):  # blur every axis, then resize every axis, as Degradation.down
            v, b, _, _ = wins[a][i]
            if kers[a][0] is not None:
                t = apply_window(t, lead + a, kers[a][0], v[0], x.shape[lead + a] * deg.factors[a], b, faces[a])
        for a in range(nd):
            v, b, q, _ = wins[a][i]
            if kers[a][1] is not None:
                t = apply_window(t, lead + a, kers[a][1], b[0], x.shape[lead + a] * deg.factors[a], q, faces[a])
            else:
                t = t.narrow(lead + a, q[0] - b[0], q[1] - q[0])
        r = x[(slice(None),) * lead + tuple(slice(w[i][2][0], w[i][2][1]) for w in wins)] - t
        del t
        for a in reversed(range(nd)):  # innermost axis first, on the smallest volume: its interleaved
            _, _, q, nv = wins[a][i]  # writes cost the most per voxel
            if kers[a][2] is not None:
                r = apply_window(r, lead + a, kers[a][2], q[0], x.shape[lead + a], nv, faces[a])
            else:
                r = r.narrow(lead + a, nv[0] - q[0], nv[1] - nv[0])
        keep = y[(slice(None),) * lead + tuple(slice(w[i][3][0] - w[i][0][0], w[i][3][1] - w[i][0][0]) for w in wins)]
        # in place into the new term (never into the caller's ``y``); bit-equal to y + u
        y = r.add_(keep) if (i == 0 or r.shape != y.shape) else y.add_(r)
        del r, keep
        y = clamp_(y, floor)
    return y


# --------------------------------------------------------------------------- saturation

# Beside a saturated object the network sharpens a clipped plateau and rings below it, and back-projection
# spreads the ringing: on a real Purkinje neuron (flowdec 1.1.0's neuron-25pct, soma saturated at 255,
# block means x2, input never below 24.7) 232 output voxels fell below 20, down to 0, where the truth is at
# least 24 (the better cubic: 36). A clipped plateau carries no detail to sharpen: near one, no output
# voxel goes below the darkest input voxel near it. Measured there (docs/fidelity.md, section 4), the
# reach (for both "near"s) 1 / 4 / 8 / 16 input voxels left 179 / 42 / 11 / 2 such voxels with the
# darkest of the 3 nearest cells as the bound, but cost a clipped nuclei case 0.08 dB at 16; with the
# darkest voxel within the reach as the bound it leaves 11 (reach 8) and 2 (reach 16), gains +0.09 and
# +0.06 dB on the neuron, and changes nothing on that nuclei case.
SATURATION_TOLERANCE = 1e-5  # normalised units: float32 rounding of the ceiling's own value
SATURATION_REACH = (
    16  # input voxels around a cell: how near saturation counts, and how far the darkest voxel is looked for
)


def guard_reach(spec: OperatorSpec, factors: tuple[int, ...]) -> int:
    """Input voxels around each cell that ``saturation_guard_`` reads in a pass with these factors (0
    where it cannot act: no ceiling, or no upsampling); ``halo.py`` adds them to the pass's halo."""
    return SATURATION_REACH if spec.norm.ceiling is not None and max(factors) > 1 else 0


def _cube_max(x: torch.Tensor, r: int) -> torch.Tensor:
    """The maximum over the (2r+1)^d cube around each voxel, one axis at a time (outside counts as
    -inf, so a block's face sees what the whole volume's face sees)."""
    pool = torch.nn.functional.max_pool3d if x.ndim == 3 else torch.nn.functional.max_pool2d
    t = x[None, None]
    for a in range(x.ndim):
        k = tuple(2 * r + 1 if i == a else 1 for i in range(x.ndim))
        t = pool(t, k, stride=1, padding=tuple(r if i == a else 0 for i in range(x.ndim)))
    return t[0, 0]


def saturation_guard_(
    y: torch.Tensor, x: torch.Tensor, factors: tuple[int, ...], ceiling: float | None, offset: tuple[int, ...]
) -> torch.Tensor:
    """No output voxel near a saturated input voxel falls below the darkest input voxel near it.

    ``x``: a pass's low-res input (normalised), ``y`` its output, which begins ``offset`` output
    voxels into ``x``'s upsampled grid per axis. Near means within ``SATURATION_REACH`` cells of the
    output voxel's cell, for both. Elsewhere, and on inputs without a ceiling, ``y`` is unchanged. The
    guard reads ``SATURATION_REACH`` cells around each cell, which ``halo.py`` adds to every pass's
    halo, so blocks agree with the whole volume."""
    if ceiling is None or max(factors) == 1:
        return y
    sat = x >= ceiling - SATURATION_TOLERANCE
    if not bool(sat.any()):
        return y
    near = _cube_max(sat.to(x.dtype), SATURATION_REACH) > 0
    low = -_cube_max(-x, SATURATION_REACH)
    cells = tuple(slice(o // f, -(-(o + n) // f)) for o, n, f in zip(offset, y.shape, factors))
    near, low = near[cells], low[cells]
    for a, f in enumerate(factors):
        if f > 1:
            near = near.repeat_interleave(f, dim=a)
            low = low.repeat_interleave(f, dim=a)
    hr = tuple(slice(o % f, o % f + n) for o, n, f in zip(offset, y.shape, factors))
    return torch.where(near[hr], torch.maximum(y, low[hr]), y)


def enhance_array(
    volume: np.ndarray, spec: OperatorSpec, dtype: np.dtype | str | None = None, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Whole-array inference: the reference every chunked result must equal.

    ``volume`` has the operator's spatial dims ((z, y, x) or (y, x)); the result is upsampled by
    ``spec.factors``, in ``dtype`` (default: the input's).
    """
    if volume.ndim != spec.ndim:
        raise ValueError(f"the model works on {spec.ndim}D arrays, got shape {volume.shape}")
    from .passes import apply_normalised  # the passes build on this module

    out_dtype = np.dtype(dtype) if dtype is not None else volume.dtype
    return to_output(apply_normalised(spec.norm.forward_array(volume, device), spec), spec.norm, out_dtype)
