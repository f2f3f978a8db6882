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
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from distributed.diagnostics.plugin import WorkerPlugin

from .background import Fill, cubic_fill, fill_read
from .chunks import bad_chunk
from .inputcheck import InputDataError, check_block
from .model import Model
from .ngff import make_store
from .operator import Pass, output_offset, run_pass
from .plan import Block, BlockPlan, on_axes
from .progress import Progress
from .state import DoneRecords
from .values import to_output

_MODELS: dict[str, Model] = {}
_ARRAYS: dict[tuple, object] = {}
NO_WORKERS_S = 600.0  # a cluster without a single worker for this long ends the run (one line, resumable)
READ_ATTEMPTS = 3  # a region that cannot be read is tried this often (transient store errors), then named
RETRY_DELAY_S = 0.2  # first wait between attempts (doubled each time)


class ClusterLost(RuntimeError):
    """The Dask scheduler went away (killed, or the client's link cut): one line, not a
    FutureCancelledError traceback; the finished blocks' records stay, so a re-run resumes."""


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


def _open_array(url: str, path: str, options: dict | None, writable: bool, run: str, image: bool = False):
    """Open once per process and run (``run`` = the job's fingerprint: a recreated output never
    reuses stale metadata). ``image``: a level of the output image (not a scratch array), written
    with every chunk stored, those equal to the fill value too (zarr leaves them out by default), so
    that an output enhanced again has no false "missing chunks"."""
    import zarr

    key = (url, path, writable, run, image)
    arr = _ARRAYS.get(key)
    if arr is None:
        store = make_store(url, options, read_only=not writable)
        arr = zarr.open_array(store, path=path, mode="r+" if writable else "r")
        if writable and image:  # this handle only: zarr's global config is left as it is
            if hasattr(arr, "with_config"):
                arr = arr.with_config({"write_empty_chunks": True})
            else:  # an older zarr 3: an array takes the setting when it is opened
                with zarr.config.set({"array.write_empty_chunks": True}):
                    arr = zarr.open_array(store, path=path, mode="r+")
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
    """Worker plugin: ships the model bytes once per worker and gives each task thread one torch
    thread (a worker runs ``nthreads`` tasks at once: its core share, and more would oversubscribe)."""

    def __init__(self, blobs: dict[str, bytes], name: str):
        self.blobs = blobs
        self.name = name

    def setup(self, worker=None):
        register_models(self.blobs)
        torch.set_num_threads(1)


def run_block(job: Job, index: int, background: bool = False) -> tuple[int, float, int]:
    """The task: read block + halo (and the companion), run the pass, write the owned chunks, record done.
    ``background`` (``--skip-background`` decided so): the block is written without the network
    (:func:`skip_block`)."""
    t0 = time.perf_counter()
    if background:
        return skip_block(job, index, t0)
    block = job.plan[index]
    in_options = job.in_options if job.in_raw else job.out_options
    dst = _open_array(job.out_url, job.out_path, job.out_options, writable=True, run=job.done_url, image=job.out_raw)
    model = _MODELS.get(job.model_for(block))
    if model is None:
        raise RuntimeError(f"model {job.model_for(block)} was not shipped to this worker")
    device = _device(job)
    spec = model.spec(device, job.precision)
    sel = job.selection(block, block.read, offsets=job.in_raw)
    x, src = _read(job, job.in_url, job.in_path, in_options, sel, index)
    note: dict = {}
    if job.in_raw:
        note = _check_input(job, src, x, block, index)
    if job.in_raw:
        xt = spec.norm.forward_array(x, device)
    else:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
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
        y = to_output(y, spec.norm, job.out_dtype)
    else:
        y = y.contiguous().cpu().numpy()
    dst[job.selection(block, block.write)] = y
    records = DoneRecords(job.done_url, job.out_options)
    if note:
        records.note(index, note)  # before the done-record: a resumed run still counts this block's findings
    records.mark(index)
    del y, x
    _release_heap()
    return index, time.perf_counter() - t0, block.write_voxels


def skip_block(job: Job, index: int, t0: float) -> tuple[int, float, int]:
    """A background block: in the last pass, the cubic upsampling of its input region (read from
    the image whatever the pass's source, checked as every raw read is); in earlier passes,
    nothing (no computed block reads what it would write). Either way a note, then the record."""
    block = job.plan[index]
    note: dict = {"background": True}
    if job.fill is not None:
        fj = replace(job, in_url=job.fill.image_url, in_path=job.fill.image_path, in_raw=True)
        in_shape = tuple(o // f for o, f in zip(job.plan.out_shape, job.fill.factors))
        read = fill_read(block.write, job.fill.factors, in_shape)
        fb = replace(block, read=read)
        x, src = _read(fj, fj.in_url, fj.in_path, job.in_options, fj.selection(fb, read, offsets=True), index)
        note.update(_check_input(fj, src, x, fb, index, job.fill.factors))
        model = _MODELS.get(job.model_for(block))
        if model is None:
            raise RuntimeError(f"model {job.model_for(block)} was not shipped to this worker")
        norm = model.norm
        xt = norm.forward_array(x, _device(job))
        y = cubic_fill(xt, read, block.write, job.fill.factors, in_shape, norm, job.out_dtype)
        dst = _open_array(
            job.out_url, job.out_path, job.out_options, writable=True, run=job.done_url, image=job.out_raw
        )
        dst[job.selection(block, block.write)] = y
        del x, xt, y
    records = DoneRecords(job.done_url, job.out_options)
    records.note(index, note)
    records.mark(index)
    return index, time.perf_counter() - t0, block.write_voxels


def _read(job: Job, url: str, path: str, options: dict | None, sel: tuple, index: int):
    """Read a region, retrying ``READ_ATTEMPTS`` times (a store's transient error), reopening the
    array each time; then stop with the array, chunk key and block named (a corrupt chunk was
    "error during blosc decompression: -1", nothing else)."""
    last: Exception | None = None
    arr = None
    for attempt in range(READ_ATTEMPTS):
        try:
            arr = _open_array(url, path, options, writable=False, run=job.done_url)
            return np.asarray(arr[sel]), arr
        except Exception as exc:  # noqa: BLE001 - every store and codec has its own errors
            last = exc
            _ARRAYS.pop((url, path, False, job.done_url), None)
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
    coarse = [(_open_array(job.in_url, p, job.in_options, False, job.done_url), r) for p, r in job.coarse_levels]
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


class _NoWorkerWatch:
    """Cancels the run's futures once the cluster has had no worker for ``limit`` seconds: Dask
    waits for workers forever, and the soak (docs/reliability.md) once lost both of its workers."""

    def __init__(self, client, limit: float, every: float = 1.0):
        import threading

        self.client, self.limit, self.every = client, limit, every
        self.futures: list = []
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="svision-big-no-worker-watch")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        since = None
        while not self._stop.wait(self.every):
            try:
                n = len(self.client.scheduler_info().get("workers", {}))
            except Exception:  # noqa: BLE001 - the scheduler itself gone: the main loop says so
                return
            if n:
                since = None
                continue
            since = since or time.monotonic()
            if time.monotonic() - since >= self.limit:
                self.fired = True
                try:
                    self.client.cancel(list(self.futures))
                except Exception:  # noqa: BLE001
                    pass
                return


def _address(client) -> str:
    try:
        return str(client.scheduler.address)
    except Exception:  # noqa: BLE001
        return "(unknown address)"


def _cluster_gone(client, exc: BaseException) -> bool:
    """True when ``exc`` means the scheduler is unreachable, not that a task failed."""
    from concurrent.futures import CancelledError

    from distributed.comm.core import CommClosedError

    if isinstance(exc, (CancelledError, CommClosedError, TimeoutError)):
        return True
    return getattr(client, "status", "running") not in ("running", "connecting")


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def _release_heap() -> None:
    """Hand the block's freed memory back to the OS before the next block (glibc keeps it in its
    arenas otherwise, and a worker's resident memory crept up block after block)."""
    if _libc():
        _LIBC.malloc_trim(0)


def limit_arenas(n: int) -> None:
    """At most ``n`` glibc malloc arenas (its default is 8 per core): the task threads of an
    in-process worker otherwise spread their blocks over arenas that each keep a high-water mark.
    Measured on the 512 M-voxel command (2 task threads): peak 0.81 -> 0.68 GB; 64 M: 0.67 -> 0.61
    GB (``benchmarks/whole_command.py``). Call before the threads start."""
    if _libc():
        _LIBC.mallopt(-8, max(1, int(n)))  # M_ARENA_MAX


_LIBC = None


# --------------------------------------------------------------------------- drivers


def _run_on_cluster(
    job: Job,
    models: dict[str, Model],
    client,
    todo,
    window: int | None,
    finished: Callable[[int, int], None],
    where: Callable[[], str],
    started: Callable[[], None] = lambda: None,
    background=None,
) -> None:
    """The blocks ``todo`` of one pass on the cluster (:func:`run_windowed`), the models shipped
    first (one plugin per worker), calling ``finished(index, voxels)`` per block."""

    def ship_models() -> None:
        blobs = {h: m.to_bytes() for h, m in models.items()}
        plugin = ModelPlugin(blobs, name=f"svision-big-models-{'-'.join(sorted(blobs))}")
        client.register_plugin(plugin, name=plugin.name)

    tag = "svb-" + job.done_url.rsplit("done-", 1)[-1].replace("/", "-")
    extra = None if background is None else (lambda i: (bool(background[i]),))
    run_windowed(
        client, run_block, job, todo, lambda r: finished(r[0], r[2]), where, tag, window, ship_models, started, extra
    )


def run_windowed(
    client,
    task: Callable,
    job,
    todo,
    finished: Callable[[object], None],
    where: Callable[[], str],
    tag: str,
    window: int | None = None,
    setup: Callable[[], None] | None = None,
    started: Callable[[], None] | None = None,
    extra: Callable[[int], tuple] | None = None,
) -> None:
    """Submit ``task(job, i)`` for each ``i`` of ``todo`` windowed (a few tasks per worker in flight,
    the next submitted as each ends), so the scheduler never holds more than the window however
    many tasks there are; ``finished(result)`` per task. ``setup()`` runs first, under the same
    guard; ``started()`` once the first window is out; ``extra(i)``: more arguments for task ``i``. A lost cluster is one line (:class:`ClusterLost`, ``where()`` says how far the run got)."""
    from distributed import as_completed

    watch = _NoWorkerWatch(client, NO_WORKERS_S)
    try:
        watch.start()
        if setup is not None:
            setup()
        window = window or 2 * max(1, sum(client.nthreads().values())) + 2

        def submit(i: int):
            return client.submit(task, job, i, *(extra(i) if extra else ()), pure=False, key=f"{tag}-{i}")

        first = [submit(i) for _, i in zip(range(window), todo)]
        if started is not None:
            started()
        watch.futures = first
        pending = as_completed(first)
        for fut in pending:
            result = fut.result()
            fut.release()
            finished(result)
            nxt = next(todo, None)
            if nxt is not None:
                f = submit(nxt)
                watch.futures.append(f)
                pending.add(f)
    except (InputDataError, ChunkReadError):
        raise  # the data's fault, named by the task
    except Exception as exc:  # noqa: BLE001
        if watch.fired:
            raise ClusterLost(
                f"the Dask cluster at {_address(client)} had no worker for {watch.limit:.0f} s, after "
                f"{where()}: the finished blocks are kept; re-run the same command once workers are up "
                f"to resume"
            ) from None
        if _cluster_gone(client, exc):
            raise ClusterLost(
                f"lost the Dask scheduler {_address(client)} ({type(exc).__name__}) after {where()}: "
                f"the finished blocks are kept; re-run the same command against a running scheduler "
                f"to resume"
            ) from None
        raise
    finally:
        watch.stop()


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
    records = DoneRecords(job.done_url, job.out_options)
    records.create()
    done = records.load()
    total = len(job.plan)
    todo = (i for i in range(total) if i not in done)
    n_todo = total - len(done)
    voxels_per_block = math.prod(job.plan.block)
    bar = Progress(
        total,
        label,
        unit="blocks",
        quiet=not progress,
        rate_scale=voxels_per_block,
        rate_unit="output voxels/s (approx)",
    )
    bar.done = len(done)
    t0 = time.perf_counter()
    count = {"blocks": 0, "voxels": 0}

    def finished(index: int, voxels: int) -> None:
        count["blocks"] += 1
        count["voxels"] += voxels
        bar.update(len(done) + count["blocks"])
        if on_block:
            on_block(index)

    if client is None:
        register_models(models)
        for i in todo:
            _, _, v = run_block(job, i, background is not None and bool(background[i]))
            finished(i, v)
    else:
        try:
            _run_on_cluster(
                job,
                models,
                client,
                todo,
                window,
                finished,
                lambda: f"{len(done) + count['blocks']} of {total} blocks",
                started=lambda: bar.update(len(done), force=True),  # the first line: the tasks are out
                background=background,
            )
        except ClusterLost:
            bar.close()
            raise
    computed, out_voxels = count["blocks"], count["voxels"]
    bar.close()
    seconds = time.perf_counter() - t0
    out = {
        "blocks": total,
        "skipped": len(done),
        "computed": computed,
        "todo_at_start": n_todo,
        "seconds": round(seconds, 3),
        "output_voxels": out_voxels,
        "voxels_per_second": out_voxels / seconds if seconds > 0 else 0.0,
    }
    if background is not None:
        out["background"] = int(np.count_nonzero(background))
    if job.in_raw or job.fill is not None:  # what the blocks found in the input, this run and earlier ones
        notes = records.notes()
        missing = sorted({k for n in notes for k in n.get("missing", ())})
        out["nonfinite"] = sum(n.get("nonfinite", 0) for n in notes)
        out["missing_chunks"] = len(missing)
        out["missing_examples"] = missing[:3]
    return out
