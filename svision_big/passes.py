"""The operator's passes: one class per kind of blockwise sweep, each knowing how it runs, where its
output starts in a block, how one input voxel's influence spreads through it (for ``halo.py``) and
its default block size.

Run in one sweep, back-projection's wide halo (about 3 low-res voxels per iteration) would make every
block re-run the network over that whole margin. Split into passes, the network runs with its own
radius and back-projection reads the stored network output. ``plan_passes`` lists the passes of an
operator; ``run_pass`` runs one on normalised tensors, then the saturation guard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .degrade import Degradation
from .halo import _bp_mask, _dilate
from .operator import (
    OperatorSpec,
    _bp_start,
    back_project,
    clamp_,
    ensemble_size,
    predict,
    saturation_guard_,
    trim_radius,
)

IMAGE = "image"  # the input image, as a pass input

# Each pass's default block (output voxels per axis, whole chunks). Bigger blocks repeat less halo and
# the streamed network runs as fast per voxel at any size, so its block is as large as a
# single-threaded worker's memory allows; back-projection runs as fast in smaller blocks, at half the
# memory. `python benchmarks/pipeline.py --only blocks` measures them.
NET_BLOCK = 256
BP_BLOCK = 128
# A back-projection pass whose halo is no wider than the network's (2 iterations or fewer at x2)
# takes the network's block instead: its compute is negligible, so what it costs is reading the
# staged float32 output, and smaller blocks re-read a larger share of halo, in more tasks.
NARROW_BP_HALO = 8


def output_name(k: int) -> str:
    """The name of pass ``k``'s output, as other passes list it in their ``inputs``."""
    return f"p{k}"


@dataclass(frozen=True)
class Pass:
    """One blockwise sweep of the operator, so that each part gets its own (small) halo.

    ``inputs`` names what the pass reads (as daisy's upstream tasks): first its low-res input
    (``source``: ``IMAGE`` or ``output_name(k)`` of an earlier pass), then, for passes that correct
    a high-res estimate, that estimate (``companion``, read at the read region times ``factors``).
    ``kind`` names the class in statistics, done-records and the fingerprint.
    """

    kind: ClassVar[str]
    block: ClassVar[int] = BP_BLOCK  # the default block, output voxels per axis
    closing: ClassVar[bool] = False  # runs after every stage (``apply_normalised(upto=...)`` stops before it)

    stage: int
    factors: tuple[int, ...]
    inputs: tuple[str, ...]

    @property
    def source(self) -> str:
        return self.inputs[0]

    @property
    def companion(self) -> str | None:
        return self.inputs[1] if len(self.inputs) > 1 else None

    @property
    def label(self) -> str:  # for progress lines
        raise NotImplementedError

    def compute(self, spec: OperatorSpec, x: torch.Tensor, companion, faces) -> torch.Tensor:
        """The pass's output before the saturation guard (normalised tensors, in inference mode)."""
        raise NotImplementedError

    def output_offset(self, spec: OperatorSpec, faces) -> tuple[int, ...]:
        """Where the output starts inside the read region times ``factors``, in high-res voxels per axis."""
        raise NotImplementedError

    def influences(self, spec: OperatorSpec, axis: int, x0: np.ndarray, guard: int) -> list[np.ndarray]:
        """High-res outputs (along one axis) touched by an impulse ``x0`` (one low-res cell) in each
        of the pass's inputs; ``guard``: the cells the saturation guard reads around each cell."""
        raise NotImplementedError

    def mixes_lateral(self, spec: OperatorSpec) -> bool:
        """Whether the pass mixes y and x (rotations), so both lateral axes need the larger halo."""
        return False

    def default_block(self, halo: tuple[int, ...]) -> int:
        return self.block

    def run(self, spec: OperatorSpec, x: torch.Tensor, companion: torch.Tensor | None = None, faces=None):
        """The pass on normalised tensors, then the saturation guard: ``x`` is its low-res input,
        ``companion`` the high-res estimate it corrects, if any. ``faces``: see ``predict`` (passes
        return less than the whole region where a side is halo; ``output_offset`` says where)."""
        with torch.inference_mode():
            y = self.compute(spec, x, companion, faces)
            offset = (0,) * x.ndim if faces is None else self.output_offset(spec, faces)
            return saturation_guard_(y, x, self.factors, spec.norm.bounds_n[1], offset)


@dataclass(frozen=True)
class NetPass(Pass):
    """A stage's ensemble network, then the clamp."""

    kind: ClassVar[str] = "net"
    block: ClassVar[int] = NET_BLOCK

    @property
    def label(self) -> str:
        return f"stage {self.stage + 1} network"

    def compute(self, spec, x, companion, faces):
        stage = spec.stages[self.stage]
        return clamp_(predict(stage.net, x, stage.ensemble, faces, stage.zflip), spec.norm.bounds_n)

    def output_offset(self, spec, faces):
        # on sides that are not volume faces the network leaves out its convolution radius
        r = trim_radius(spec.stages[self.stage].net)
        return tuple(0 if lo else r * f for (lo, _), f in zip(faces, self.factors))

    def influences(self, spec, axis, x0, guard):
        r = max(spec.stages[self.stage].net.config.radius(), guard)
        return [np.repeat(_dilate(x0, r), self.factors[axis])]

    def mixes_lateral(self, spec):
        stage = spec.stages[self.stage]
        return ensemble_size(stage.ensemble, self.factors, stage.zflip) > 1


@dataclass(frozen=True)
class BackProjectionPass(Pass):
    """A stage's iterative back-projection of the previous pass's output (the companion) against
    the stage's input (iterations 0: a copy)."""

    kind: ClassVar[str] = "bp"

    @property
    def label(self) -> str:
        return f"stage {self.stage + 1} back-projection"

    def settings(self, spec: OperatorSpec) -> tuple[Degradation | None, int]:
        st = spec.stages[self.stage]
        return st.degradation, st.bp_iters

    def default_block(self, halo):
        return NET_BLOCK if max(halo, default=0) <= NARROW_BP_HALO else self.block

    def compute(self, spec, x, companion, faces):
        deg, iters = self.settings(spec)
        return back_project(companion, x, deg, iters, spec.norm.bounds_n, faces)

    def output_offset(self, spec, faces):
        # the margin back-projection's iterations cannot compute exactly
        deg, iters = self.settings(spec)
        if deg is None or iters <= 0:
            return (0,) * len(faces)
        psf = None if deg.psf_fwhm is None else tuple(float(s) for s in deg.psf_fwhm)
        return tuple(
            _bp_start(tuple(deg.factors), psf, deg.acquisition, a, iters, lo) for a, (lo, _) in enumerate(faces)
        )

    def influences(self, spec, axis, x0, guard):
        deg, iters = self.settings(spec)
        if deg is None or iters <= 0:
            iters = 0
        n, f = len(x0), self.factors[axis]
        guarded = np.repeat(_dilate(x0, guard) if guard else np.zeros(n, dtype=bool), f)
        none = np.zeros(n * f, dtype=bool)
        out = [(_bp_mask(none, x0, deg, axis, iters) if iters else none) | guarded]
        c = int(np.flatnonzero(x0)[0])
        for phase in range(f):  # an impulse in the companion, at each sub-voxel position of cell c
            y0 = np.zeros(n * f, dtype=bool)
            y0[c * f + phase] = True
            out.append(_bp_mask(y0, np.zeros(n, dtype=bool), deg, axis, iters) if iters else y0)
        return out


@dataclass(frozen=True)
class ClosingPass(BackProjectionPass):
    """The closing full-factor back-projection of the last stage's output against the original input."""

    kind: ClassVar[str] = "final"
    closing: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return "closing back-projection"

    def settings(self, spec):
        return spec.final, spec.final_bp_iters

    def run(self, spec, x, companion=None, faces=None):
        if spec.final is None or spec.final_bp_iters <= 0:
            with torch.inference_mode():
                return companion.clone()  # an operator without one, planned beside one that has it
        return super().run(spec, x, companion, faces)


def readers(passes, k: int) -> tuple[int, ...]:
    """The passes (indices) that read pass ``k``'s output."""
    name = output_name(k)
    return tuple(i for i, q in enumerate(passes) if name in q.inputs)


def plan_passes(specs) -> tuple[Pass, ...]:
    """The passes for one or more operators of the same structure (one per channel): a
    back-projection pass wherever any of them back-projects (iterations 0 make it a copy)."""
    specs = list(specs) if isinstance(specs, (list, tuple)) else [specs]
    first = specs[0]
    if any(len(s.stages) != len(first.stages) or s.factors != first.factors for s in specs):
        raise ValueError("operators with different stages cannot share passes")
    passes: list[Pass] = []
    source = IMAGE
    for i, st in enumerate(first.stages):
        passes.append(NetPass(i, st.factors, (source,)))
        if any(s.stages[i].bp_iters > 0 for s in specs):
            passes.append(BackProjectionPass(i, st.factors, (source, output_name(len(passes) - 1))))
        source = output_name(len(passes) - 1)
    if any(s.final is not None and s.final_bp_iters > 0 for s in specs):
        passes.append(ClosingPass(len(first.stages), first.factors, (IMAGE, output_name(len(passes) - 1))))
    return tuple(passes)


def run_pass(
    spec: OperatorSpec, p: Pass, x: torch.Tensor, companion: torch.Tensor | None = None, faces=None
) -> torch.Tensor:
    """One pass on normalised tensors (``Pass.run``)."""
    return p.run(spec, x, companion, faces)


def output_offset(spec: OperatorSpec, p: Pass, faces) -> tuple[int, ...]:
    """Where a pass's output starts inside its read region times ``p.factors`` (``Pass.output_offset``)."""
    return p.output_offset(spec, faces)


def apply_normalised(x: torch.Tensor, spec: OperatorSpec, upto: int | None = None) -> torch.Tensor:
    """All passes (or those of the first ``upto`` stages, without the closing back-projection),
    in normalised units: exactly the sequence the chunked pipeline runs block by block."""
    outs = {IMAGE: x}
    last = IMAGE
    for k, p in enumerate(plan_passes(spec)):
        if upto is not None and (p.closing or p.stage >= upto):
            break
        last = output_name(k)
        outs[last] = run_pass(spec, p, outs[p.source], outs[p.companion] if p.companion else None)
    return outs[last]
