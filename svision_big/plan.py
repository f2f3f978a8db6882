"""The block plan: which input region each task reads and which output region it writes.

Vocabulary (after daisy): a :class:`Block` has a *write* region (whole output chunks or shards
of the upsampled array, owned by exactly one task) and a *read* region (the matching input
voxels plus the operator's halo, clipped at the volume's faces). Blocks are computed on demand
from their flat index, so a plan of a million blocks costs no memory and no time to make.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    index: int  # flat index in the plan (C order over (*outer, *spatial grid))
    outer: tuple[int, ...]  # fixed non-spatial coordinates (e.g. t, c), one per outer axis
    read: tuple[slice, ...]  # input region, spatial axes only
    write: tuple[slice, ...]  # output region, spatial axes only
    crop: tuple[slice, ...]  # where ``write`` sits inside the operator's output for ``read``

    @property
    def write_voxels(self) -> int:
        return math.prod(s.stop - s.start for s in self.write)


@dataclass(frozen=True)
class BlockPlan:
    """Spatial tiling of an upsampled output into blocks of ``block`` voxels (a multiple of ``factors``)."""

    in_shape: tuple[int, ...]  # input spatial shape
    factors: tuple[int, ...]
    block: tuple[int, ...]  # output voxels per block per spatial axis
    halo: tuple[int, ...]  # input voxels of context per side
    outer_shape: tuple[int, ...] = ()  # sizes of the axes processed independently (t, c)

    def __post_init__(self):
        for b, f, n in zip(self.block, self.factors, self.in_shape):
            if b < f or b % f:
                raise ValueError(
                    f"block {self.block} must be a positive multiple of the factors {self.factors} on every axis"
                )
            if n < 1:
                raise ValueError(f"empty input shape {self.in_shape}")
        if not (len(self.in_shape) == len(self.factors) == len(self.block) == len(self.halo)):
            raise ValueError("in_shape, factors, block and halo need one entry per spatial axis")

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(n * f for n, f in zip(self.in_shape, self.factors))

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-o // b) for o, b in zip(self.out_shape, self.block))

    @property
    def shape(self) -> tuple[int, ...]:
        """Full block-grid shape including the outer (t, c) axes."""
        return tuple(self.outer_shape) + self.grid

    def __len__(self) -> int:
        return math.prod(self.shape)

    def unravel(self, index: int) -> tuple[int, ...]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} outside a plan of {len(self)} blocks")
        out = []
        for n in reversed(self.shape):
            index, r = divmod(index, n)
            out.append(r)
        return tuple(reversed(out))

    def __getitem__(self, index: int) -> Block:
        pos = self.unravel(index)
        outer, grid_pos = pos[: len(self.outer_shape)], pos[len(self.outer_shape) :]
        read, write, crop = [], [], []
        for g, b, f, n, h in zip(grid_pos, self.block, self.factors, self.in_shape, self.halo):
            w0 = g * b
            w1 = min(w0 + b, n * f)
            i0, i1 = w0 // f, -(-w1 // f)  # input voxels under the write region
            r0, r1 = max(0, i0 - h), min(n, i1 + h)
            read.append(slice(r0, r1))
            write.append(slice(w0, w1))
            crop.append(slice(w0 - r0 * f, w1 - r0 * f))
        return Block(index, tuple(outer), tuple(read), tuple(write), tuple(crop))

    def __iter__(self) -> Iterator[Block]:
        for i in range(len(self)):
            yield self[i]

    def overhead(self) -> float:
        """Input voxels read (and run through the operator) per input voxel of the volume, minus one:
        the fraction of work the halos repeat."""
        spatial_blocks = math.prod(self.grid)
        total_in = math.prod(self.in_shape)
        # separable: sum of read lengths per axis multiply out over the grid
        per_axis = []
        for d in range(len(self.in_shape)):
            s = 0
            for g in range(self.grid[d]):
                w0 = g * self.block[d]
                w1 = min(w0 + self.block[d], self.out_shape[d])
                i0, i1 = w0 // self.factors[d], -(-w1 // self.factors[d])
                s += min(self.in_shape[d], i1 + self.halo[d]) - max(0, i0 - self.halo[d])
            per_axis.append(s)
        del spatial_blocks
        return math.prod(per_axis) / total_in - 1.0


def default_block(out_shape: tuple[int, ...], factors: tuple[int, ...], target: int = 128) -> tuple[int, ...]:
    """``target`` output voxels per axis (a multiple of the factor), never more than the axis."""
    out = []
    for n, f in zip(out_shape, factors):
        b = min(target, n)
        b = max(f, b - b % f)
        out.append(b)
    return tuple(out)


def on_axes(base, axes, values) -> list:
    """``base`` (one entry per array axis) with the entries at ``axes`` replaced by ``values``: how
    per-spatial-axis (or per-outer-axis) values, as a plan holds them, become a full array's."""
    out = list(base)
    for ax, v in zip(axes, values):
        out[ax] = v
    return out
