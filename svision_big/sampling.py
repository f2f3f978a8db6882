"""Training pairs from the volume itself: crops, lateral symmetries, synthetic low-res partners.

Crops prefer foreground (background crops teach nothing), are aligned to the factor grid so
the low-res partner's pixel centres match inference, and are degraded with a margin so the
partner has no artificial edges inside the patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .degrade import Degradation

MARGIN_LR = 3  # low-res voxels of context for the degradation, cropped off afterwards


@dataclass(frozen=True)
class Region:
    """A box of the volume (start, stop per axis) that crops must stay inside."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))


def split_regions(
    shape: tuple[int, ...], patch: tuple[int, ...], val_fraction: float = 0.2
) -> tuple[Region, Region, bool]:
    """Hold aside a slab of the longest lateral axis for validation; (train, val, disjoint)."""
    nd = len(shape)
    axis = max(range(nd - 2, nd), key=lambda a: shape[a])
    n_val = max(patch[axis], int(round(shape[axis] * val_fraction)))
    full = Region((0,) * nd, tuple(shape))
    if shape[axis] - n_val < 2 * patch[axis]:
        return full, full, False
    cut = shape[axis] - n_val
    stop = list(shape)
    stop[axis] = cut
    start = [0] * nd
    start[axis] = cut
    return Region((0,) * nd, tuple(stop)), Region(tuple(start), tuple(shape)), True


def patch_shape(region: tuple[int, ...], factors: tuple[int, ...], target: int) -> tuple[int, ...]:
    """High-res patch edge per axis, shrunk to fit the region, a multiple of the factor.

    ``target`` voxels on the axes with the largest factor, proportionally fewer on the others, so
    the network's low-res input is a cube: a z-only (2, 1, 1) stage with 32 voxels on every axis
    trained on 16x32x32 low-res inputs, 4.3x the cost per step of an isotropic stage."""
    top = max(factors)
    out = []
    for n, f in zip(region, factors):
        p = min(max(target * f // top, f), n)
        p -= p % f
        if p < f:
            raise ValueError(f"an axis of {n} voxels is too small to train a x{f} factor on")
        out.append(p)
    return tuple(out)


class PairSampler:
    """Draws (low-res, high-res) training pairs from one region of a normalised volume."""

    def __init__(
        self,
        volume: np.ndarray,
        region: Region,
        patch: tuple[int, ...],
        degradation: Degradation,
        fg_threshold: float,
        fg_fraction: float = 0.85,
        lateral_rotations: bool = True,
    ):
        self.volume = volume
        self.region = region
        self.patch = patch
        self.deg = degradation
        self.fg_fraction = fg_fraction
        self.rotations = (
            lateral_rotations and patch[-1] == patch[-2] and degradation.factors[-1] == degradation.factors[-2]
        )
        sub = volume[tuple(slice(a, b) for a, b in zip(region.start, region.stop))]
        fg = np.argwhere(sub > fg_threshold)
        if len(fg) > 200_000:
            fg = fg[np.random.default_rng(0).choice(len(fg), 200_000, replace=False)]
        self.fg = fg + np.array(region.start)

    def origin(self, rng: np.random.Generator) -> tuple[int, ...]:
        """Crop start, a multiple of the factor per axis, centred near a foreground voxel when drawn."""
        out = []
        use_fg = len(self.fg) > 0 and rng.random() < self.fg_fraction
        centre = self.fg[rng.integers(len(self.fg))] if use_fg else None
        for d, (a, b) in enumerate(zip(self.region.start, self.region.stop)):
            f, p = self.deg.factors[d], self.patch[d]
            lo = -(-a // f)  # first multiple of f inside the region, in units of f
            hi = (b - p) // f
            if hi < lo:
                raise ValueError("training region is smaller than one patch")
            if centre is not None:
                want = (centre[d] - rng.integers(p)) // f
                s = int(np.clip(want, lo, hi))
            else:
                s = int(rng.integers(lo, hi + 1))
            out.append(s * f)
        return tuple(out)

    def pair(
        self, origin: tuple[int, ...], rng: np.random.Generator, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Degrade the crop with context (clipped at the volume faces), cut both to the patch, augment."""
        sl_big, inner = [], []
        for d, s in enumerate(origin):
            f, p = self.deg.factors[d], self.patch[d]
            n = self.volume.shape[d]
            a = max(0, s - MARGIN_LR * f)
            b = min(n - (n - s) % f, s + p + MARGIN_LR * f)  # keep the length a multiple of f
            sl_big.append(slice(a, b))
            inner.append((s - a, s - a + p))
        big = torch.from_numpy(np.ascontiguousarray(self.volume[tuple(sl_big)], dtype=np.float32))
        lr, target = self.deg.synthesize(big, generator)
        hr_sl = tuple(slice(i0, i1) for i0, i1 in inner)
        lr_sl = tuple(slice(i0 // f, i1 // f) for (i0, i1), f in zip(inner, self.deg.factors))
        return self._augment(lr[lr_sl], target[hr_sl], rng)

    def _augment(
        self, lr: torch.Tensor, hr: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same lateral rot90 / flip (and z flip) on both partners.

        The degradation commutes with these symmetries (symmetric kernels, pixel-centre grid), so
        transforming the finished pair equals degrading a transformed crop. Rotations need square
        lateral patches and equal lateral factors.
        """
        if self.rotations:
            k = int(rng.integers(4))
            if k:
                lr, hr = torch.rot90(lr, k, dims=(-2, -1)), torch.rot90(hr, k, dims=(-2, -1))
        for axis in range(hr.ndim):
            if rng.random() < 0.5:
                lr, hr = torch.flip(lr, dims=(axis,)), torch.flip(hr, dims=(axis,))
        return lr.contiguous(), hr.contiguous()

    def batch(self, n: int, rng: np.random.Generator, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.pair(self.origin(rng), rng, generator) for _ in range(n)]
        lr = torch.stack([p[0] for p in pairs])[:, None]
        hr = torch.stack([p[1] for p in pairs])[:, None]
        return lr, hr
