"""Running a block plan: one task per block, on a Dask cluster or in this process.

Tasks carry only a small :class:`Job` and a block index: each reads its own input region,
runs the in-memory operator, writes its own output chunks and a done-record, and returns a
tiny status. The model reaches a worker once (a worker plugin holding its bytes) and is built
once per process (a cache keyed by the model hash). Submission is windowed, so the client
never holds a graph of more than a few tasks per worker, however many blocks there are.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from distributed.diagnostics.plugin import WorkerPlugin

from .model import Model
from .operator import Pass, output_offset, run_pass, to_output
from .plan import Block, BlockPlan
from .progress import Progress

_MODELS: dict[str, Model] = {}
_ARRAYS: dict[tuple, object] = {}


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
    step: Pass | None = None  # None: a single network pass
    in_raw: bool = True  # ``in`` holds raw image values (normalise on read), else normalised float32
    out_raw: bool = True  # write raw values in ``out_dtype``, else normalised float32
    companion_path: str | None = None  # in the output store
    precision: str = "float32"  # the networks' arithmetic (operator.PRECISIONS)

    def model_for(self, block: Block) -> str:
        if self.model_axis is None or len(self.models) == 1:
            return self.models[0]
        return self.models[block.outer[self.model_axis]]

    def selection(self, block: Block, spatial: tuple[slice, ...], offsets: bool = False) -> tuple:
        """Full-array selection; ``offsets``: map the plan's outer index to the input's (channel choice)."""
        sel: list = [None] * (len(self.spatial_axes) + len(self.outer_axes))
        for ax, i, off in zip(self.outer_axes, block.outer, self.outer_offsets):
            sel[ax] = i + (off if offsets else 0)
        for ax, s in zip(self.spatial_axes, spatial):
            sel[ax] = s
        return tuple(sel)


# --------------------------------------------------------------------------- per-process state


def _open_array(url: str, path: str, options: dict | None, writable: bool, run: str):
    """Open once per process and run (``run`` = the job's fingerprint: a recreated output never
    reuses stale metadata)."""
    import zarr

    from .ngff import _make_store

    key = (url, path, writable, run)
    arr = _ARRAYS.get(key)
    if arr is None:
        store = _make_store(url, options, read_only=not writable)
        arr = zarr.open_array(store, path=path, mode="r+" if writable else "r")
        while len(_ARRAYS) >= 16:
            _ARRAYS.pop(next(iter(_ARRAYS)))
        _ARRAYS[key] = arr
    return arr


def _device(job: Job) -> str:
    if job.device:
        return job.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def register_models(models: dict[str, bytes | Model]) -> None:
    """Build each model once in this process; later tasks find it by hash."""
    for h, m in models.items():
        if h not in _MODELS:
            _MODELS[h] = m if isinstance(m, Model) else Model.from_bytes(m, where=f"model {h}")


class ModelPlugin(WorkerPlugin):
    """Worker plugin: ships the model bytes once per worker and sets torch's threads to the worker's share."""

    def __init__(self, blobs: dict[str, bytes], name: str):
        self.blobs = blobs
        self.name = name

    def setup(self, worker=None):
        register_models(self.blobs)
        threads = getattr(worker, "state", None)
        n = getattr(threads, "nthreads", None) or getattr(worker, "nthreads", None)
        if n:
            torch.set_num_threads(max(1, int(n)))



# --------------------------------------------------------------------------- done records


class DoneRecords:
    """One empty object per finished block under ``done_url``: explicit, survives any crash,
    cheap to list on resume, and independent of whether chunks equal the fill value."""

    def __init__(self, url: str, options: dict | None = None):
        import fsspec.core

        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url, **(options or {}))

    def create(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def mark(self, index: int) -> None:
        self.fs.pipe_file(f"{self.root}/{index}", b"")

    def load(self) -> set[int]:
        try:
            self.fs.invalidate_cache(self.root)
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return set()
        out = set()
        for n in names:
            base = n.rstrip("/").rsplit("/", 1)[-1]
            if base.isdigit():
                out.add(int(base))
        return out


def run_block(job: Job, index: int) -> tuple[int, float, int]:
    """The task: read block + halo (and the companion), run the pass, write the owned chunks, record done."""
    t0 = time.perf_counter()
    block = job.plan[index]
    src = _open_array(job.in_url, job.in_path, job.in_options if job.in_raw else job.out_options,
                      writable=False, run=job.done_url)
    dst = _open_array(job.out_url, job.out_path, job.out_options, writable=True, run=job.done_url)
    model = _MODELS.get(job.model_for(block))
    if model is None:
        raise RuntimeError(f"model {job.model_for(block)} was not shipped to this worker")
    device = _device(job)
    spec = model.spec(device, job.precision)
    x = np.asarray(src[job.selection(block, block.read, offsets=job.in_raw)])
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    if job.in_raw:
        xt = spec.norm.forward(xt)
    comp = None
    if job.companion_path is not None:
        carr = _open_array(job.out_url, job.companion_path, job.out_options, writable=False, run=job.done_url)
        hr = tuple(slice(r.start * f, r.stop * f) for r, f in zip(block.read, job.plan.factors))
        comp = torch.from_numpy(np.ascontiguousarray(carr[job.selection(block, hr)], dtype=np.float32)).to(device)
    step = job.step or Pass("net", 0, -1, job.plan.factors, False)
    faces = tuple((r.start == 0, r.stop == n) for r, n in zip(block.read, job.plan.in_shape))
    y = run_pass(spec, step, xt, comp, faces)
    del xt, comp
    off = output_offset(spec, step, faces)
    crop = tuple(slice(c.start - o, c.stop - o) for c, o in zip(block.crop, off))
    if any(c.start < 0 or c.stop > n for c, n in zip(crop, y.shape)):  # a halo too small for the pass
        raise RuntimeError(f"{step.label}: block {index} computed {tuple(y.shape)} voxels, not the region {crop}")
    y = y[crop]  # only the owned region goes on (the halo's share is dropped first)
    if job.out_raw:
        y = to_output(y, spec.norm, job.out_dtype)
    else:
        y = y.contiguous().cpu().numpy()
    dst[job.selection(block, block.write)] = y
    DoneRecords(job.done_url, job.out_options).mark(index)
    del y, x
    _release_heap()
    return index, time.perf_counter() - t0, block.write_voxels


def _release_heap() -> None:
    """Hand the block's freed memory back to the OS before the next block (glibc keeps it in its
    arenas otherwise, and a worker's resident memory crept up block after block)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


# --------------------------------------------------------------------------- drivers


def execute(job: Job, models: dict[str, Model], client=None, progress: bool = True,
            on_block: Callable[[int], None] | None = None, window: int | None = None, label: str = "enhance") -> dict:
    """Run every block not yet recorded done; return counts and timings."""
    records = DoneRecords(job.done_url, job.out_options)
    records.create()
    done = records.load()
    total = len(job.plan)
    todo = (i for i in range(total) if i not in done)
    n_todo = total - len(done)
    voxels_per_block = math.prod(job.plan.block)
    bar = Progress(total, label, unit="blocks", quiet=not progress,
                   rate_scale=voxels_per_block, rate_unit="output voxels/s (approx)")
    bar.done = len(done)
    t0 = time.perf_counter()
    finished = 0
    out_voxels = 0
    if client is None:
        register_models(models)
        for i in todo:
            _, _, v = run_block(job, i)
            finished += 1
            out_voxels += v
            bar.update(len(done) + finished)
            if on_block:
                on_block(i)
    else:
        from distributed import as_completed

        blobs = {h: m.to_bytes() for h, m in models.items()}
        plugin = ModelPlugin(blobs, name=f"svision-big-models-{'-'.join(sorted(blobs))}")
        client.register_plugin(plugin, name=plugin.name)
        tag = "svb-" + job.done_url.rsplit("done-", 1)[-1].replace("/", "-")
        window = window or 2 * max(1, sum(client.nthreads().values())) + 2
        first = [client.submit(run_block, job, i, pure=False, key=f"{tag}-{i}")
                 for _, i in zip(range(window), todo)]
        pending = as_completed(first)
        for fut in pending:
            idx, _, v = fut.result()
            fut.release()
            finished += 1
            out_voxels += v
            bar.update(len(done) + finished)
            if on_block:
                on_block(idx)
            nxt = next(todo, None)
            if nxt is not None:
                pending.add(client.submit(run_block, job, nxt, pure=False, key=f"{tag}-{nxt}"))
    bar.close()
    seconds = time.perf_counter() - t0
    return {"blocks": total, "skipped": len(done), "computed": finished, "todo_at_start": n_todo,
            "seconds": round(seconds, 3), "output_voxels": out_voxels,
            "voxels_per_second": out_voxels / seconds if seconds > 0 else 0.0}
