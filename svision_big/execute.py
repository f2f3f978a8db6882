"""The enhance block task: one pass of a block plan, served by the block engine (``engine``).

Tasks carry only a small :class:`Job` and a block index: each reads its own input region,
runs the in-memory operator and writes its own output chunks (:func:`run_block`); the engine
records it done, submits windowed and watches the cluster. The model reaches a worker once (a
worker plugin holding its bytes) and is built once per process (:data:`MODELS`, keyed by the model
hash). ``--skip-background`` is a per-block policy of this task: a background block is written
from the cubic upsampling of its input instead of the network (or, before the last pass, not at all).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from distributed.diagnostics.plugin import WorkerPlugin

from . import engine
from .background import Fill, cubic_fill, fill_read
from .chunks import bad_chunk
from .engine import BlockTask, BlockWork, ClusterLost, ProcessCache, run_blocks
from .inputcheck import InputDataError, check_block
from .model import Model
from .passes import Pass, output_offset, run_pass
from .plan import Block, BlockPlan, on_axes
from .state import DoneRecords
from .values import to_output

__all__ = ["MODELS", "ChunkReadError", "ClusterLost", "Job", "execute", "register_models", "run_block"]

MODELS = ProcessCache()  # model hash -> the Model built in this process
NO_WORKERS_S = engine.NO_WORKERS_S  # a cluster without a single worker for this long ends the run (resumable)
READ_ATTEMPTS = 3  # a region that cannot be read is tried this often (transient store errors), then named
RETRY_DELAY_S = 0.2  # first wait between attempts (doubled each time)


class ChunkReadError(OSError):
    """A chunk that stays unreadable after ``READ_ATTEMPTS``: names the array, chunk key and block."""


@dataclass(frozen=True)
class Job:
    """What a task needs besides its block index: locations, plan, pass and model hashes. No data.

    A task reads ``in`` (the pass's low-res input: the image, or an earlier pass's float32
    output) over the block's read region and, for back-projection passes, ``companion`` (the
    previous pass's output) over the same region times the factors."""

    in_url: str
    in_path: str
    out_url: str
    out_path: str
    plan: BlockPlan
    spatial_axes: tuple[int, ...]  # positions of the spatial axes in the full array
    outer_axes: tuple[int, ...]  # positions of the other axes (t, c), in plan.outer_shape order
    outer_offsets: tuple[int, ...]  # plan outer index -> array index offset (channel selection)
    models: tuple[str, ...]  # model hash per entry of ``model_axis`` (or one for all)
    model_axis: int | None  # which outer axis selects the model (the channel axis)
    out_dtype: str
    done_url: str
    in_options: dict | None = field(default=None, hash=False, compare=False)
    out_options: dict | None = field(default=None, hash=False, compare=False)
    device: str | None = None  # None: CUDA when the worker has it, else CPU
    pass_: Pass | None = None  # the pass this job runs (every job the pipeline builds has one)
    in_raw: bool = True  # ``in`` holds raw image values (normalise on read), else normalised float32
    out_raw: bool = True  # write raw values in ``out_dtype``, else normalised float32
    companion_path: str | None = None  # in the output store
    precision: str = "float32"  # the networks' arithmetic (operator.PRECISIONS)
    nonfinite: str = "error"  # NaN/Inf in a raw input: "error", or "fill" (read as the array's fill value)
    strict: bool = False  # a missing input chunk is an error, not the fill value (zarr's rule)
    fill: Fill | None = None  # the last pass, with --skip-background: how a background block is written
    # the input's coarser levels (path, per-axis ratio of level 0's shape to theirs): an absent level-0
    # chunk is missing only where they show data there (``chunks.empty_on_coarser_levels``)
    coarse_levels: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def model_for(self, block: Block) -> str:
        if self.model_axis is None or len(self.models) == 1:
            return self.models[0]
        return self.models[block.outer[self.model_axis]]

    def selection(self, block: Block, spatial: tuple[slice, ...], offsets: bool = False) -> tuple:
        """Full-array selection; ``offsets``: map the plan's outer index to the input's (channel choice)."""
        outer = [i + (off if offsets else 0) for i, off in zip(block.outer, self.outer_offsets)]
        sel = on_axes([None] * (len(self.spatial_axes) + len(self.outer_axes)), self.outer_axes, outer)
        return tuple(on_axes(sel, self.spatial_axes, spatial))


# --------------------------------------------------------------------------- per-process state


def _device(job: Job) -> str:
    if job.device:
        return job.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def register_models(models: dict[str, bytes | Model]) -> None:
    """Build each model once in this process (:data:`MODELS`); later tasks find it by hash."""
    for h, m in models.items():
        if h not in MODELS:
            MODELS.put(h, m if isinstance(m, Model) else Model.from_bytes(m, where=f"model {h}"))


class ModelPlugin(WorkerPlugin):
    """Worker plugin: ships the model bytes once per worker and gives each task thread one torch
    thread (a worker runs ``nthreads`` tasks at once: its core share, and more would oversubscribe)."""

    def __init__(self, blobs: dict[str, bytes], name: str):
        self.blobs = blobs
        self.name = name

    def setup(self, worker=None):
        register_models(self.blobs)
        torch.set_num_threads(1)


def _ship_models(models: dict[str, Model], client) -> None:
    """The task's setup: build the models in this process (``client`` None), or ship their bytes
    to every worker once (one plugin)."""
    if client is None:
        register_models(models)
        return
    blobs = {h: m.to_bytes() for h, m in models.items()}
    plugin = ModelPlugin(blobs, name=f"svision-big-models-{'-'.join(sorted(blobs))}")
    client.register_plugin(plugin, name=plugin.name)


def _model(job: Job, block: Block) -> Model:
    model = MODELS.get(job.model_for(block))
    if model is None:
        raise RuntimeError(f"model {job.model_for(block)} was not shipped to this worker")
    return model


# --------------------------------------------------------------------------- the block task


def run_block(job: Job, index: int, background: bool = False) -> tuple[int, dict]:
    """The enhance task's process (``engine.BlockWork``): block ``index`` of the pass, written;
    returns (voxels written, the note of what it found in its input). ``background``: the
    ``--skip-background`` policy decided so for this block (:func:`_background`); else the block
    + halo (and the companion) is read, the pass run, and the owned region kept (:func:`_enhanced`).
    The engine records the block done (its note first)."""
    block = job.plan[index]
    y, note = _background(job, block, index) if background else _enhanced(job, block, index)
    if y is not None:
        dst = engine.open_array(
            job.out_url, job.out_path, job.out_options, writable=True, run=job.done_url, image=job.out_raw
        )
        dst[job.selection(block, block.write)] = y
    return block.write_voxels, note


def _enhanced(job: Job, block: Block, index: int) -> tuple[np.ndarray, dict]:
    """The block's owned region computed by the pass, in the output's values (or float32)."""
    in_options = job.in_options if job.in_raw else job.out_options
    device = _device(job)
    spec = _model(job, block).spec(device, job.precision)
    sel = job.selection(block, block.read, offsets=job.in_raw)
    x, src = _read(job, job.in_url, job.in_path, in_options, sel, index)
    note: dict = {}
    if job.in_raw:
        note = _check_input(job, src, x, block, index)
        xt = spec.norm.forward_array(x, device)
    else:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    del x
    comp = None
    if job.companion_path is not None:
        hr = tuple(slice(r.start * f, r.stop * f) for r, f in zip(block.read, job.plan.factors))
        c, _ = _read(job, job.out_url, job.companion_path, job.out_options, job.selection(block, hr), index)
        comp = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)).to(device)
        del c
    faces = tuple((r.start == 0, r.stop == n) for r, n in zip(block.read, job.plan.in_shape))
    y = run_pass(spec, job.pass_, xt, comp, faces)
    del xt, comp
    off = output_offset(spec, job.pass_, faces)
    crop = tuple(slice(c.start - o, c.stop - o) for c, o in zip(block.crop, off))
    if any(c.start < 0 or c.stop > n for c, n in zip(crop, y.shape)):  # a halo too small for the pass
        raise RuntimeError(f"{job.pass_.label}: block {index} computed {tuple(y.shape)} voxels, not the region {crop}")
    y = y[crop]  # only the owned region goes on (the halo's share is dropped first)
    if job.out_raw:
        return to_output(y, spec.norm, job.out_dtype), note
    return y.contiguous().cpu().numpy(), note


def _background(job: Job, block: Block, index: int) -> tuple[np.ndarray | None, dict]:
    """A background block: in the last pass, the cubic upsampling of its input region (read from
    the image whatever the pass's source, checked as every raw read is); in earlier passes,
    nothing (no computed block reads what it would write). Either way a note."""
    note: dict = {"background": True}
    if job.fill is None:
        return None, note
    fj = replace(job, in_url=job.fill.image_url, in_path=job.fill.image_path, in_raw=True)
    in_shape = tuple(o // f for o, f in zip(job.plan.out_shape, job.fill.factors))
    read = fill_read(block.write, job.fill.factors, in_shape)
    fb = replace(block, read=read)
    x, src = _read(fj, fj.in_url, fj.in_path, job.in_options, fj.selection(fb, read, offsets=True), index)
    note.update(_check_input(fj, src, x, fb, index, job.fill.factors))
    norm = _model(job, block).norm
    xt = norm.forward_array(x, _device(job))
    del x
    return cubic_fill(xt, read, block.write, job.fill.factors, in_shape, norm, job.out_dtype), note


def _read(job: Job, url: str, path: str, options: dict | None, sel: tuple, index: int):
    """Read a region, retrying ``READ_ATTEMPTS`` times (a store's transient error), reopening the
    array each time; then stop with the array, chunk key and block named (a corrupt chunk was
    "error during blosc decompression: -1", nothing else)."""
    last: Exception | None = None
    arr = None
    for attempt in range(READ_ATTEMPTS):
        try:
            arr = engine.open_array(url, path, options, writable=False, run=job.done_url)
            return np.asarray(arr[sel]), arr
        except Exception as exc:  # noqa: BLE001 - every store and codec has its own errors
            last = exc
            engine.forget_array(url, path, writable=False, run=job.done_url)
            if attempt + 1 < READ_ATTEMPTS:
                time.sleep(RETRY_DELAY_S * 2**attempt)
    where = f"{url.rstrip('/')}/{path}"
    key = bad_chunk(arr, sel) if arr is not None else None
    cause = (str(last).strip().splitlines() or [type(last).__name__])[0]
    what = f"chunk {key}" if key else "a chunk"
    raise ChunkReadError(
        f"{where}: {what} cannot be read ({cause}), needed by block {index} of "
        f"{job.pass_.label}; stopped after {READ_ATTEMPTS} "
        f"attempts (finished blocks are kept: repair the input and re-run to finish)"
    ) from None


def _check_input(job: Job, src, x: np.ndarray, block: Block, index: int, factors=None) -> dict:
    """``inputcheck.check_block`` for one block of the job's raw input (its region, core and the
    input's coarser levels, opened once per process)."""
    core = tuple(
        slice(w.start // f - r.start, w.stop // f - r.start)
        for w, r, f in zip(block.write, block.read, factors or job.plan.factors)
    )
    coarse = [(engine.open_array(job.in_url, p, job.in_options, False, job.done_url), r) for p, r in job.coarse_levels]
    return check_block(
        x,
        src,
        job.selection(block, block.read, offsets=True),
        core,
        f"{job.in_url.rstrip('/')}/{job.in_path}",
        index,
        {"strict": job.strict, "nonfinite": job.nonfinite},
        coarse,
    )


# --------------------------------------------------------------------------- the driver


def enhance_task(job: Job, models: dict[str, Model], label: str = "enhance", background=None) -> BlockTask:
    """One pass as a block task for the engine. ``background``: a flat bool per block
    (``--skip-background``), True where the block is written without the network."""
    return BlockTask(
        work=BlockWork(run_block, job, job.done_url, job.out_options, release=True),
        blocks=len(job.plan),
        label=label,
        key="svb-" + job.done_url.rsplit("done-", 1)[-1].replace("/", "-"),
        rate_scale=math.prod(job.plan.block),
        rate_unit="output voxels/s (approx)",
        args=None if background is None else (lambda i: (bool(background[i]),)),
        setup=lambda client: _ship_models(models, client),
        data_errors=(InputDataError, ChunkReadError),
    )


def execute(
    job: Job,
    models: dict[str, Model],
    client=None,
    progress: bool = True,
    on_block: Callable[[int], None] | None = None,
    window: int | None = None,
    label: str = "enhance",
    background=None,
) -> dict:
    """Run every block not yet recorded done; return counts and timings. ``background``: a flat
    bool per block (``--skip-background``), True where the block is written without the network."""
    task = enhance_task(job, models, label, background)
    run = run_blocks(task, client, progress, on_block, window, no_workers_s=NO_WORKERS_S)
    seconds, out_voxels = run["seconds"], run["voxels"]
    out = {
        "blocks": run["total"],
        "skipped": run["skipped"],
        "computed": run["computed"],
        "todo_at_start": run["total"] - run["skipped"],
        "seconds": round(seconds, 3),
        "output_voxels": out_voxels,
        "voxels_per_second": out_voxels / seconds if seconds > 0 else 0.0,
    }
    if background is not None:
        out["background"] = int(np.count_nonzero(background))
    if job.in_raw or job.fill is not None:  # what the blocks found in the input, this run and earlier ones
        notes = DoneRecords(job.done_url, job.out_options).notes()
        missing = sorted({k for n in notes for k in n.get("missing", ())})
        out["nonfinite"] = sum(n.get("nonfinite", 0) for n in notes)
        out["missing_chunks"] = len(missing)
        out["missing_examples"] = missing[:3]
    return out
