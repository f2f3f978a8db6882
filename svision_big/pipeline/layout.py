"""The run's layout: the outer axes it processes, the passes, one block plan per pass, level 0's
shape, chunks and shards, the scratch arrays' chunks and shards; and the checks on blocks.

Imports no other module of this package: every other step reads what these return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..halo import pass_halo
from ..ngff import Image, NgffError
from ..passes import IMAGE, BackProjectionPass, ClosingPass, NetPass, Pass, output_name, plan_passes
from ..plan import BlockPlan, default_block, on_axes

# Output chunks for viewers. Each pass's default block is its class's (``passes.Pass.default_block``).
DEFAULT_CHUNK = 128
DEFAULT_PASS_BLOCK = {c.kind: c.block for c in (NetPass, BackProjectionPass, ClosingPass)}
# Blocks smaller than twice the halo on a split axis repeat more work than they do (a few voxels
# per block can mean hours of halo). They are refused (unless ``force``) once the repeated work
# passes this many input voxels (a few core-minutes), so small test volumes may still be cut into
# many small blocks.
MAX_REPEATED_VOXELS = 2**24
MIN_SCRATCH_INNER = 16  # smaller inner chunks cost more per-chunk overhead than they save in reads


def _default_pass_block(p: Pass, halo: tuple[int, ...]) -> int:
    return p.default_block(halo)


@dataclass(frozen=True)
class Outer:
    """The non-spatial axes (t, c) of a run: positions, sizes processed, the chosen channel's offset."""

    axes: tuple[int, ...]
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    model_axis: int | None  # which outer axis selects the model (one model per channel)


@dataclass(frozen=True)
class Layout:
    """The passes, their block plans, and the output's level 0 (full axes)."""

    passes: tuple[Pass, ...]
    plans: list[BlockPlan]
    block: tuple[int, ...]  # the last pass's block (output voxels per spatial axis)
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    fmt: Any = None  # the output's NgffFormat and dtype name, once `request.output_format` has checked them
    dtype: str = ""


# --------------------------------------------------------------------------- outer axes


def _outer_axes(image: Image) -> list[int]:
    return [i for i in range(image.ndim) if i not in image.spatial_axes]


def _channel_axis(image: Image) -> int | None:
    for i, a in enumerate(image.axes):
        if a.get("type") == "channel" or a["name"] == "c":
            return i
    return None


def _check_channel(image: Image, channel: int | None, input: str) -> None:
    cax = _channel_axis(image)
    if channel not in (None, 0) and cax is None:
        raise NgffError(f"--channel {channel}: {input} has no channel axis")
    if cax is not None and channel is not None and not 0 <= channel < image.shape[cax]:
        raise NgffError(f"channel {channel} is out of range: the image has {image.shape[cax]}")


def _outer_layout(image: Image, channel: int | None, n_models: int, input: str) -> Outer:
    """Which part of the non-spatial axes the run processes: every index, or the chosen channel."""
    _check_channel(image, channel, input)
    cax = _channel_axis(image)
    axes = _outer_axes(image)
    chosen = [ax == cax and channel is not None for ax in axes]
    shape = tuple(1 if c else image.shape[ax] for ax, c in zip(axes, chosen))
    offsets = tuple(channel if c else 0 for c in chosen)
    n_channels = image.shape[cax] if cax is not None and channel is None else 1
    if n_models not in (1, n_channels):
        raise ValueError(f"{n_models} models for {n_channels} channels: give one, or one per channel")
    return Outer(tuple(axes), shape, offsets, axes.index(cax) if (cax is not None and n_models > 1) else None)


def _outer_selection(image: Image, channel: int | None, time_index: int | None) -> dict[int, int]:
    out = {}
    for ax in _outer_axes(image):
        name = image.axes[ax]["name"]
        n = image.shape[ax]
        want = channel if ax == _channel_axis(image) else time_index
        want = 0 if want is None else want
        if not 0 <= want < n:
            raise NgffError(f"{name} index {want} is out of range: the image has {n}")
        out[ax] = want
    return out


def _full_shape(image: Image, outer: Outer, spatial_shape) -> tuple[int, ...]:
    return tuple(on_axes(on_axes(image.shape, image.spatial_axes, spatial_shape), outer.axes, outer.shape))


def _full_chunks(image: Image, spatial_chunks) -> tuple[int, ...] | None:
    return None if spatial_chunks is None else tuple(on_axes([1] * image.ndim, image.spatial_axes, spatial_chunks))


def _axis_names(image: Image) -> list[str]:
    """The spec's lower-case axis names (iohub's "T C Z Y X" made outputs ngff-zarr rejects)."""
    return [n.lower() for n in image.axis_names]


def stored_order(image: Image, values) -> tuple:
    """Per-axis values given Z,Y,X (Y,X in 2D), as the flags and the Python API take them, in the
    order the image stores its spatial axes: by axis name, not position (on an image stored x,y,z,
    ``--factor 1,2,2`` upsampled z and left x alone). Images whose axes are not named z, y, x keep
    the given order."""
    values = tuple(values)
    names = [str(image.axes[i]["name"]).lower() for i in image.spatial_axes]
    canon = "zyx"[-len(names) :]
    if len(values) != len(names) or sorted(names) != sorted(canon):
        return values
    return tuple(values[canon.index(n)] for n in names)


# --------------------------------------------------------------------------- blocks and passes


def _check_block(block, n_axes: int) -> None:
    """`--block 0` / `--block -8` were reported as a wrong number of entries."""
    if block is None:
        return
    vals = [block] if isinstance(block, (int, np.integer)) else list(block)
    shown = ",".join(str(v) for v in vals)
    if any(not isinstance(v, (int, np.integer)) or v < 1 for v in vals):
        raise ValueError(f"--block {shown}: every entry must be a positive number of output voxels (e.g. --block 128)")
    if len(vals) not in (1, n_axes):
        raise ValueError(f"--block {shown}: give one size for every axis or {n_axes} (one per spatial axis)")


def _blocks(given, passes, specs, out_spatial, factors) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the last pass's block, the output's chunk), output voxels per spatial axis: the ``given``
    size (one for every axis, or one per axis) for both, else chunks for viewers and blocks of
    whole chunks as large as the pass's kind pays for."""
    if given is None:
        chunk = default_block(out_spatial, factors, DEFAULT_CHUNK)
        last_halo = tuple(max(h) for h in zip(*(pass_halo(sp, passes[-1]) for sp in specs)))
        block = default_block(out_spatial, factors, _default_pass_block(passes[-1], last_halo))
        return _whole_chunks(block, chunk, out_spatial), chunk
    _check_block(given, len(out_spatial))
    if not isinstance(given, (int, np.integer)) and len(given) == 1:
        given = given[0]  # one size for every axis, as ``--block 128``
    if isinstance(given, (int, np.integer)):
        given = default_block(out_spatial, factors, int(given))
    block = tuple(int(b) for b in given)
    return block, block


def layout(image: Image, models: list, outer: Outer, block, shards: bool, force: bool) -> Layout:
    """Passes, block plans, and level 0's shape, chunks and shards (``block``: as asked, or None)."""
    spatial = image.spatial_axes
    factors = models[0].factors
    in_shape = tuple(image.shape[a] for a in spatial)
    out_spatial = tuple(n * f for n, f in zip(in_shape, factors))
    specs = [m.spec() for m in models]
    passes = plan_passes(specs)
    given = block if block is None or isinstance(block, (int, np.integer)) else stored_order(image, block)
    last_block, chunk = _blocks(given, passes, specs, out_spatial, factors)
    plans = _pass_plans(passes, specs, in_shape, last_block, outer.shape, block is None)
    if block is not None and not force:
        _check_block_halo(plans, last_block, out_spatial, factors, math.prod(outer.shape))
    chunks = _full_chunks(image, chunk)
    shard_shape = None
    if shards:
        shard_shape = chunks
        chunks = tuple(c if ax not in spatial else _inner_chunk(c) for ax, c in enumerate(chunks))
    return Layout(passes, plans, last_block, _full_shape(image, outer, out_spatial), chunks, shard_shape)


def _whole_chunks(block: tuple[int, ...], chunk: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Round a block down to whole chunks per axis (one writer per chunk), unless it spans the axis."""
    return tuple(b if b >= n else max(c, b - b % c) for b, c, n in zip(block, chunk, shape))


def _pass_plans(passes, specs, in_shape, block, outer_shape, defaults: bool = True) -> list[BlockPlan]:
    """One plan per pass, on that pass's low-res input; the last pass writes the output in ``block``s,
    earlier passes use their kind's default block (``defaults``) or the same block size."""
    shapes = {IMAGE: tuple(in_shape)}  # each input's low-res shape, by name
    plans = []
    for k, p in enumerate(passes):
        ref = shapes[p.source]
        out = tuple(n * f for n, f in zip(ref, p.factors))
        shapes[output_name(k)] = out
        halo = tuple(max(h) for h in zip(*(pass_halo(s, p) for s in specs)))
        if k == len(passes) - 1:
            blk = block
        elif defaults:
            blk = default_block(out, p.factors, _default_pass_block(p, halo))
        else:
            blk = tuple(max(f, min(b, n) - min(b, n) % f) for b, n, f in zip(block, out, p.factors))
        if k == len(passes) - 1 and out != tuple(n * f for n, f in zip(in_shape, specs[0].factors)):
            raise AssertionError("the last pass must produce the output shape")
        plans.append(BlockPlan(ref, p.factors, blk, halo, outer_shape))
    return plans


def _check_block_halo(
    plans: list[BlockPlan], block: tuple[int, ...], out_spatial: tuple[int, ...], factors: tuple[int, ...], n_outer: int
) -> None:
    """Refuse blocks smaller than twice their pass's halo (input voxels, on an axis cut into more
    than one block) once the halos would repeat more than ``MAX_REPEATED_VOXELS`` of work."""
    need = [0] * len(block)  # output voxels per axis for blocks of twice the halo in every pass
    small = False
    for pl in plans:
        for d, (b, n, f, h) in enumerate(zip(pl.block, pl.out_shape, pl.factors, pl.halo)):
            need[d] = max(need[d], 2 * h * f)
            small |= b < n and b // f < 2 * h
    if not small:
        return
    repeated = sum(pl.overhead() * math.prod(pl.in_shape) for pl in plans) * n_outer
    if repeated <= MAX_REPEATED_VOXELS:
        return
    suggest = [min(max(b, -(-s // f) * f), n - n % f or n) for b, s, f, n in zip(block, need, factors, out_spatial)]
    overhead = max(pl.overhead() for pl in plans)
    raise ValueError(
        f"--block {','.join(map(str, block))}: blocks smaller than twice the halo ({max(max(pl.halo) for pl in plans)} "
        f"input voxels) repeat more work than they do ({len(plans[-1]):,} blocks, halo overhead {overhead:.0%}); "
        f"use at least --block {','.join(map(str, suggest))}, leave --block out for the default, or pass --force"
    )


# --------------------------------------------------------------------------- scratch arrays


def _scratch_layout(writer: tuple[int, ...], last: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(chunks, shards) of a staged pass output. One shard per writer block (one writer per shard),
    split into inner chunks of up to 64 voxels, so the next pass decodes little beyond its block
    and halo (whole-block chunks made an interior block decode its neighbours' chunks whole, many
    times the voxels it needed). Blocks without such a divisor fall back to plain chunks no bigger
    than either block (one writer per chunk)."""
    inner = tuple(_inner_chunk(b) for b in writer)
    if all(c >= min(MIN_SCRATCH_INNER, b) for c, b in zip(inner, writer)):
        return inner, tuple(writer)
    return tuple(math.gcd(a, b) for a, b in zip(writer, last)), None


def _inner_chunk(b: int) -> int:
    """Inner chunk of a shard: the largest divisor of the block at most 64 voxels."""
    for c in range(min(64, b), 0, -1):
        if b % c == 0:
            return c
    return b


def scratch_arrays(image: Image, outer: Outer, lay: Layout, path) -> list[tuple]:
    """(path, shape, chunks, shards) of each pass output a later pass reads (``path(k)``: where)."""
    return [
        (
            path(k),
            _full_shape(image, outer, pl.out_shape),
            *(_full_chunks(image, c) for c in _scratch_layout(pl.block, lay.block)),
        )
        for k, pl in enumerate(lay.plans[:-1])
    ]
