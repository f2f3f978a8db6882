"""Value mapping between raw image units and the operator's normalised units.

The operator works on normalised float32 values; an image stores raw values in its dtype. This
module holds the one global mapping between them (:class:`Normalisation`, measured once, never
per block), and the one casting rule from float results to a stored dtype (round and clip for
integers), used by block outputs and pyramid levels alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

WIDE = 2.0**24  # float32 resolves steps of 1 up to here


@dataclass(frozen=True)
class Normalisation:
    """Global intensity mapping x_n = (x - lo) / (hi - lo); measured once, never per block."""

    lo: float
    hi: float
    floor: float | None  # clamp value in raw units (0 for non-negative data), None = no clamp
    ceiling: float | None = None  # the input's saturation value (raw), None = not saturated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.lo) / (self.hi - self.lo)

    @property
    def wide(self) -> bool:
        """Raw values whose offset float32 cannot hold beside their signal (|value| >= 2^24: a uint32
        3e9 plus a 0-1000 signal came out with 7 levels): the offset is subtracted, and added back,
        in float64."""
        return max(abs(self.lo), abs(self.hi)) >= WIDE

    def forward_array(self, x: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
        """Raw values (any dtype) -> normalised float32 tensor; ``forward`` on float32, except for
        ``wide`` data, whose offset goes first, in float64."""
        if self.wide:
            n = (np.asarray(x, dtype=np.float64) - self.lo) / (self.hi - self.lo)
            return torch.from_numpy(n.astype(np.float32)).to(device)
        return self.forward(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * (self.hi - self.lo) + self.lo

    @property
    def floor_n(self) -> float | None:
        return None if self.floor is None else (self.floor - self.lo) / (self.hi - self.lo)

    @property
    def bounds_n(self) -> tuple[float | None, float | None]:
        """(floor, ceiling) in normalised units: the output never leaves what the input could record."""
        ceil = None if self.ceiling is None else (self.ceiling - self.lo) / (self.hi - self.lo)
        return self.floor_n, ceil


def cast_output(y: np.ndarray, dtype: np.dtype, own: bool = False) -> np.ndarray:
    """Round and clip to an integer dtype's range; plain cast for floats. ``own``: ``y`` may be
    overwritten (no float temporary). Integer values are only clipped: rounding them through a
    float would lose int64 precision."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if y.dtype.kind != "f":
            return np.clip(y, info.min, info.max).astype(dtype)
        y = np.rint(y, out=y if own else None)
        return np.clip(y, info.min, info.max, out=y).astype(dtype)
    return y.astype(dtype, copy=False)


def to_output(y: torch.Tensor, norm: Normalisation, dtype: np.dtype, chunk: int = 32) -> np.ndarray:
    """Normalised result (or a view into it) -> raw values in ``dtype``, ``chunk`` slices of axis 0
    at a time, so that at most one chunk's float temporary exists beside the result."""
    dtype = np.dtype(dtype)
    a, b = norm.hi - norm.lo, norm.lo
    out = np.empty(tuple(y.shape), dtype)
    for c0 in range(0, y.shape[0], chunk):
        t = y[c0 : c0 + chunk]
        t = torch.mul(t.double(), a).add_(b) if norm.wide else torch.mul(t, a).add_(b)  # as ``inverse``
        out[c0 : c0 + chunk] = cast_output(t.cpu().numpy(), dtype, own=True)
    return out


def check_workable(volume: np.ndarray) -> None:
    """Refuse an in-memory volume the float32 working precision cannot carry: NaN/Inf voxels (a network
    spreads each over its receptive field) and magnitudes beyond float32's range (they become Inf)."""
    if volume.dtype.kind not in "fc" or not volume.size:
        return
    finite = np.isfinite(volume)
    if not finite.all():
        bad = int(volume.size - np.count_nonzero(finite))
        raise ValueError(
            f"the volume holds {bad:,} NaN/Inf voxels of {volume.size:,}: replace them first (e.g. numpy.nan_to_num)"
        )
    peak = float(np.abs(volume).max())
    if peak > float(np.finfo(np.float32).max):
        raise ValueError(f"the volume reaches {peak:.3g}, beyond float32's range, the working precision: rescale it")
