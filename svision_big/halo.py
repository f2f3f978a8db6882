"""Receptive-field analysis: the exact halo a block needs, derived from the operator's spec.

One input voxel's structural influence is propagated through the very tap tables and network
radii the operator uses (boolean masks along one axis at a time), so the halo is exact for
every model: no guessing, no per-block padding rules. ``receptive_halo`` covers the whole
operator in one sweep; ``pass_halo`` one pass of it (see ``passes.Pass``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np

from .degrade import Degradation, phase_table
from .operator import OperatorSpec, ensemble_size, guard_reach

if TYPE_CHECKING:
    from .passes import Pass


def _through(mask: np.ndarray, table: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    idx, w = table
    return np.any(mask[idx] & (w != 0.0), axis=1)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for s in range(1, r + 1):
        out[s:] |= mask[:-s]
        out[:-s] |= mask[s:]
    return out


def _bp_mask(y: np.ndarray, x: np.ndarray, deg: Degradation, axis: int, iters: int) -> np.ndarray:
    blur_k, down_k, up_k = deg.kernels(axis)
    for _ in range(iters):
        d = y
        if blur_k is not None:
            d = _through(d, phase_table(blur_k, len(d)))
        if down_k is not None:
            d = _through(d, phase_table(down_k, len(d)))
            u = _through(x | d, phase_table(up_k, len(x)))
        else:
            u = x | d
        y = y | u
    return y


def _influence(spec: OperatorSpec, axis: int, n: int) -> np.ndarray:
    """Which outputs (high-res, along one axis) an impulse at the centre of ``n`` inputs touches."""
    x0 = np.zeros(n, dtype=bool)
    x0[n // 2] = True
    x = x0
    for stage in spec.stages:
        f = stage.factors[axis]
        g = guard_reach(spec, stage.factors)  # the saturation guard reads around each cell after every pass
        y = np.repeat(_dilate(x, max(stage.net.config.radius(), g)), f)
        if stage.bp_iters:
            y = _bp_mask(y, x, stage.degradation, axis, stage.bp_iters) | np.repeat(_dilate(x, g), f)
        x = y
    if spec.final is not None and spec.final_bp_iters > 0:
        g = guard_reach(spec, spec.factors)
        x = _bp_mask(x, x0, spec.final, axis, spec.final_bp_iters) | np.repeat(_dilate(x0, g), spec.factors[axis])
    return x


def _reach(influences: Callable[[int], Iterable[tuple[np.ndarray, int]]], factor: int) -> int:
    """Halo along one axis, in low-res voxels: the farthest low-res cell that an impulse's influence
    reaches from the cell it sits in. ``influences(n)`` gives (high-res mask, impulse cell) pairs
    on a stand-in axis of ``n`` low-res voxels; the axis grows until no mask touches its ends."""
    n = 65
    while True:
        found, inside = 0, True
        for m, c in influences(n):
            hit = np.nonzero(m)[0]
            if len(hit) == 0:
                continue
            if hit[0] == 0 or hit[-1] == len(m) - 1:
                inside = False
                break
            lr = hit // factor
            found = max(found, int(max(c - lr.min(), lr.max() - c)))
        if inside:
            return found
        n = 2 * n + 1


def receptive_halo(spec: OperatorSpec) -> tuple[int, ...]:
    """Exact halo (input voxels per spatial axis) so a block's write region is unaffected by its edges.

    Rotations in the ensemble mix y and x, so both lateral axes get the larger of the two.
    """
    halo = [
        _reach(lambda n, a=axis: [(_influence(spec, a, n), n // 2)], spec.factors[axis]) for axis in range(spec.ndim)
    ]
    if spec.ndim >= 2 and any(ensemble_size(s.ensemble, s.factors, s.zflip) > 1 for s in spec.stages):
        halo[-2] = halo[-1] = max(halo[-2], halo[-1])
    return tuple(halo)


def _pass_influences(spec: OperatorSpec, p: Pass, axis: int, n: int) -> list[tuple[np.ndarray, int]]:
    """High-res outputs (along one axis) touched by an impulse in each of the pass's inputs,
    with the low-res cell the impulse sits in (``Pass.influences``)."""
    c = n // 2
    x0 = np.zeros(n, dtype=bool)
    x0[c] = True
    g = guard_reach(spec, p.factors)  # the saturation guard: cells around each output cell
    return [(m, c) for m in p.influences(spec, axis, x0, g)]


def pass_halo(spec: OperatorSpec, p: Pass) -> tuple[int, ...]:
    """Exact halo of one pass, in voxels of its low-res input per side (as ``receptive_halo``)."""
    halo = [_reach(lambda n, a=axis: _pass_influences(spec, p, a, n), p.factors[axis]) for axis in range(spec.ndim)]
    if spec.ndim >= 2 and p.mixes_lateral(spec):
        halo[-2] = halo[-1] = max(halo[-2], halo[-1])
    return tuple(halo)
