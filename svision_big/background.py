"""Sparse volumes (``--skip-background``): which blocks lie in the background, and what they hold.

Whole-brain and cleared-tissue volumes are mostly background, and the network costs the same
there as in the tissue. A block of the last pass whose whole *cone* (its write region divided by
the factors, plus every pass's halo: every input voxel its output depends on) lies below a
threshold is written as the cubic upsampling of its input region (what the operator's safe
baseline, ``train.cubic_baseline``, computes) without running the network. The decision is made
once, in the client, on a coarse level of the input pyramid; earlier passes then skip exactly the
blocks whose output no computed block reads, so every computed block is bit-equal to an
unskipped run (``docs/sparse.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .ngff import NgffError
from .operator import add_upsampled, clamp_
from .passes import output_name
from .plan import BlockPlan, on_axes
from .values import Normalisation, to_output

# The finest pyramid level of at most this many spatial voxels decides (read once in the client).
COARSE_VOXELS = 4_000_000
# The default threshold, as a fraction of the model's normalised range above its low percentile.
AUTO_FRACTION = 0.1
RULE = (
    "skip a block when every coarse-level voxel under its cone (write region / factors + the sum "
    "of every pass's halo) is <= b + (T - b) / d, b = the coarse level's 1st percentile, d = its "
    "linear downsampling factor (T itself when T <= b); T default lo + 0.1 (hi - lo) of the "
    "model's normalisation; skipped blocks hold the cubic upsampling of their input (clamped)"
)
RULE_VERSION = "coarse-cone-v1"


def parse_threshold(value) -> float | str | None:
    """``skip_background`` as given: None/False (off), True/"auto" (the default rule), or a number
    (a threshold in raw input units). Anything else is a one-line error."""
    if value is None or value is False:
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"--skip-background {value}: not a threshold (give a number in the input's units, or no value for auto)"
        ) from None
    if not math.isfinite(t):
        raise ValueError(f"--skip-background {value}: the threshold must be a finite number")
    return t


def thresholds(norms: list[Normalisation], value: float | str) -> list[float]:
    """The raw threshold per model: ``lo + AUTO_FRACTION (hi - lo)`` for "auto", else the number
    given, refused when it reaches a model's high percentile (it would skip the signal itself)."""
    if value == "auto":
        return [n.lo + AUTO_FRACTION * (n.hi - n.lo) for n in norms]
    for n in norms:
        if value >= n.hi:
            raise ValueError(
                f"--skip-background {value:g}: at or above the model's high percentile ({n.hi:g}), it "
                f"would skip the signal itself; use a value near the background (auto: "
                f"{n.lo + AUTO_FRACTION * (n.hi - n.lo):g})"
            )
    return [float(value)] * len(norms)


def coarse_level(shapes: list[tuple[int, ...]], budget: int | None = None) -> int:
    """The finest level whose spatial shape holds at most ``budget`` (``COARSE_VOXELS``) voxels, else the coarsest."""
    budget = COARSE_VOXELS if budget is None else budget
    for i, s in enumerate(shapes):
        if math.prod(s) <= budget:
            return i
    return len(shapes) - 1


def coarse_threshold(t: float, coarse: np.ndarray, ratio: tuple[float, ...]) -> tuple[float, float]:
    """(threshold on the coarse level, its background b). A coarse voxel is the mean of about
    ``d^ndim`` voxels, so it underestimates their maximum: the margin above the background shrinks
    by the linear factor ``d`` (an object must be that much brighter per cell to count)."""
    finite = coarse[np.isfinite(coarse)]
    b = float(np.percentile(finite, 1.0)) if finite.size else t
    d = math.prod(ratio) ** (1.0 / len(ratio))
    return (b + (t - b) / d if t > b else t), b


def cone_halo(plans: list[BlockPlan], in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Input voxels per side that a last-pass block's output can depend on: every pass's halo,
    converted from its source's resolution to the input's (rounded up), summed."""
    out = [0] * len(in_shape)
    for pl in plans:
        for d, (h, n, n0) in enumerate(zip(pl.halo, pl.in_shape, in_shape)):
            out[d] += -(-h * n0 // n)
    return tuple(out)


def _cone_cells(plan: BlockPlan, halo: tuple[int, ...], in_shape, coarse_shape) -> list[list[tuple[int, int]]]:
    """Per spatial axis, per block grid index: the coarse cells [a, b) that cover the block's cone
    (cell ``i`` covers input voxels ``[i n / nc, (i + 1) n / nc)``; one more cell each side where
    the level is not an integer downsampling, whose cells' edges the pyramid's writer chose)."""
    out = []
    for d, (g, b, n_out) in enumerate(zip(plan.grid, plan.block, plan.out_shape)):
        n, nc = in_shape[d], coarse_shape[d]
        f = n_out // n
        extra = 0 if n % nc == 0 else 1
        cells = []
        for i in range(g):
            w0, w1 = i * b, min((i + 1) * b, n_out)
            a, z = max(0, w0 // f - halo[d]), min(n, -(-w1 // f) + halo[d])
            cells.append((max(0, a * nc // n - extra), min(nc, (z - 1) * nc // n + 1 + extra)))
        out.append(cells)
    return out


def cone_maxima(coarse: np.ndarray, cells: list[list[tuple[int, int]]]) -> np.ndarray:
    """The maximum of ``coarse`` over every block's cone cells (separable: one axis at a time)."""
    m = coarse
    for d, axis_cells in enumerate(cells):
        m = np.stack([m.take(range(a, z), axis=d).max(axis=d) for a, z in axis_cells], axis=d)
    return m


def _overlaps(writer: BlockPlan, reads: list[tuple[int, int]], d: int) -> np.ndarray:
    """(writer grid, reader grid) along axis ``d``: does a reader's interval meet a writer block's write region."""
    w = np.array(
        [(i * writer.block[d], min((i + 1) * writer.block[d], writer.out_shape[d])) for i in range(writer.grid[d])]
    )
    r = np.array(reads)
    return (w[:, None, 0] < r[None, :, 1]) & (r[None, :, 0] < w[:, None, 1])


def _read_intervals(reader: BlockPlan, d: int, scale: int) -> list[tuple[int, int]]:
    """Along axis ``d``: each reader block's read region (times ``scale``: a companion is read at
    the pass's output resolution)."""
    out = []
    for i in range(reader.grid[d]):
        w0, w1 = i * reader.block[d], min((i + 1) * reader.block[d], reader.out_shape[d])
        f = reader.factors[d]
        a, z = max(0, w0 // f - reader.halo[d]), min(reader.in_shape[d], -(-w1 // f) + reader.halo[d])
        out.append((a * scale, z * scale))
    return out


def propagate(passes, plans: list[BlockPlan], last: np.ndarray) -> list[np.ndarray]:
    """Skip grids (outer + block grid, bool) for every pass, given the last pass's: an earlier
    pass's block is skipped exactly when no block that is computed reads any voxel it writes, so
    computed blocks read only computed data (bit-equal to an unskipped run)."""
    grids: list[np.ndarray | None] = [None] * len(plans)
    grids[-1] = last
    n_outer = len(plans[-1].outer_shape)
    for k in range(len(plans) - 2, -1, -1):
        needed = np.zeros(plans[k].shape, bool)
        for j in range(k + 1, len(plans)):
            p = passes[j]
            if output_name(k) not in p.inputs:
                continue
            scale = p.factors if p.companion == output_name(k) else (1,) * len(p.factors)
            m = (~grids[j]).astype(np.int64)
            for d in range(len(p.factors)):
                ov = _overlaps(plans[k], _read_intervals(plans[j], d, scale[d]), d).astype(np.int64)
                m = np.moveaxis(np.tensordot(ov, np.moveaxis(m, n_outer + d, 0), axes=(1, 0)), 0, n_outer + d)
            needed |= m > 0
        grids[k] = ~needed
    return grids


@dataclass(frozen=True)
class Decision:
    """What ``--skip-background`` decided for one run: recorded, fingerprinted, and per pass which blocks skip."""

    thresholds: tuple[float, ...]  # raw, per model
    auto: bool
    level: int  # the coarse level read
    coarse_thresholds: tuple[float, ...]  # per outer index (C order)
    background: tuple[float, ...]  # b per outer index
    grids: tuple[np.ndarray, ...]  # per pass, bool over the plan's (outer + grid) shape

    def flat(self, k: int) -> np.ndarray:
        return self.grids[k].ravel()

    def counts(self) -> list[int]:
        return [int(g.sum()) for g in self.grids]

    def identity(self) -> dict:
        """What the fingerprint hashes: the rule and its numbers (the grids follow from them and the input)."""
        return {
            "rule": RULE_VERSION,
            "thresholds": [float(t) for t in self.thresholds],
            "level": self.level,
            "coarse_voxels": COARSE_VOXELS,
        }

    def provenance(self) -> dict:
        counts = self.counts()
        return {
            "enabled": True,
            "rule": RULE,
            "threshold": [round(float(t), 6) for t in self.thresholds],
            "auto": self.auto,
            "coarse_level": self.level,
            "coarse_threshold": [round(float(t), 6) for t in self.coarse_thresholds],
            "coarse_background": [round(float(b), 6) for b in self.background],
            "fill": "cubic upsampling of the input region, clamped (train.cubic_baseline)",
            "blocks_skipped": counts[-1],
            "blocks": int(self.grids[-1].size),
            "blocks_skipped_per_pass": counts,
        }


def decide(image, value, models, outer, passes, plans: list[BlockPlan]) -> Decision:
    """Read the coarse level once per outer index, and decide every pass's skipped blocks."""
    spatial = image.spatial_axes
    opened = []  # (level, spatial shape) of the levels that open: one missing from the metadata is passed over
    for i in range(image.nlevels):
        try:
            opened.append((i, tuple(image.level(i).shape[a] for a in spatial)))
        except NgffError:
            if i == 0:
                raise
    k = coarse_level([shape for _, shape in opened])
    level, coarse_shape = opened[k]
    in_shape = opened[0][1]
    ratio = tuple(n / c for n, c in zip(in_shape, coarse_shape))
    ts = thresholds([m.norm for m in models], value)
    last = plans[-1]
    cells = _cone_cells(last, cone_halo(plans, in_shape), in_shape, coarse_shape)
    grid = np.zeros(last.shape, bool)
    cts, bgs = [], []
    for o in np.ndindex(*last.outer_shape) if last.outer_shape else [()]:
        idx = [i + off for i, off in zip(o, outer.offsets)]
        sel = on_axes([slice(None)] * image.ndim, outer.axes, idx)  # one time point and channel, every voxel
        coarse = image.read(level, tuple(sel)).astype(np.float64)
        coarse = np.where(np.isfinite(coarse), coarse, np.inf)  # a NaN cell is not known to be background
        t = ts[o[outer.model_axis]] if outer.model_axis is not None and len(ts) > 1 else ts[0]
        tc, b = coarse_threshold(t, coarse, ratio)
        grid[o] = cone_maxima(coarse, cells) <= tc
        cts.append(tc)
        bgs.append(b)
    grids = propagate(passes, plans, grid)
    return Decision(tuple(ts), value == "auto", level, tuple(cts), tuple(bgs), tuple(grids))


@dataclass(frozen=True)
class Fill:
    """What a skipped block of the last pass needs to write its fill: where the input image is and
    the whole factor. Small: travels with the pass's ``Job``."""

    image_url: str
    image_path: str
    factors: tuple[int, ...]


def up_margin(f: int) -> int:
    """Low-res voxels beyond a region that the cubic upsampling by ``f`` reads (a safe upper bound)."""
    from .degrade import phase_kernels

    ker, left, _ = phase_kernels("up", f)
    return max(left, ker.shape[1] - left) + 1 if f > 1 else 0


def fill_read(write: tuple[slice, ...], factors: tuple[int, ...], in_shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The input region the cubic fill of ``write`` reads: under it, plus the kernel's margin, clipped."""
    out = []
    for w, f, n in zip(write, factors, in_shape):
        m = up_margin(f)
        out.append(slice(max(0, w.start // f - m), min(n, -(-w.stop // f) + m)))
    return tuple(out)


def cubic_fill(
    x: torch.Tensor, read: tuple[slice, ...], write: tuple[slice, ...], factors, in_shape, norm: Normalisation, dtype
) -> np.ndarray:
    """The cubic upsampling of the normalised region ``x`` (input voxels ``read``) over ``write``,
    clamped to the data's bounds and cast like every block: tap for tap what the cubic baseline
    model writes there (its network's correction is exactly zero)."""
    faces = tuple((r.start == 0, r.stop == n) for r, n in zip(read, in_shape))
    start = [w.start - r.start * f for w, r, f in zip(write, read, factors)]
    acc = torch.zeros(tuple(w.stop - w.start for w in write), dtype=torch.float32, device=x.device)
    with torch.inference_mode():
        add_upsampled(acc, x, tuple(factors), start, faces)
        clamp_(acc, norm.bounds_n)
    return to_output(acc, norm, dtype)
