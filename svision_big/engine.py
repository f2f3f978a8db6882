"""The block engine: runs any :class:`BlockTask`, one Dask task per block, or in this process.

A block task (daisy's Task: a process function and a done check) says how to process block ``i``
(:class:`BlockWork`, small and picklable: it travels with every block) and where its done-records
go. The engine serves every task the same way:

- skips the blocks already recorded done (``state.DoneRecords``), and records each block done on
  the worker right after it is written (its note first, when it has one);
- submits windowed (a few tasks per worker in flight, the next as each ends), so the scheduler
  never holds more than the window however many blocks there are;
- ends a run whose cluster has had no worker for ``NO_WORKERS_S`` in one line (:class:`ClusterLost`);
- keeps the arrays a process opened (:data:`ARRAYS`, :func:`open_array`), and hands a block's freed
  heap back to the OS (:func:`release_heap`, :func:`limit_arenas`).

The enhance passes (``execute``) and the pyramid's levels (``pyramid``) are its two tasks. It
imports neither torch nor the model: only storage (``ngff.make_store``, ``state``) and ``progress``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .ngff import make_store
from .progress import Progress
from .state import DoneRecords

__all__ = [
    "ARRAYS",
    "BlockTask",
    "BlockWork",
    "ClusterLost",
    "NO_WORKERS_S",
    "ProcessCache",
    "limit_arenas",
    "open_array",
    "process_block",
    "release_heap",
    "run_blocks",
    "run_windowed",
]

NO_WORKERS_S = 600.0  # a cluster without a single worker for this long ends the run (one line, resumable)


class ClusterLost(RuntimeError):
    """The Dask scheduler went away (killed, or the client's link cut): one line, not a
    FutureCancelledError traceback; the finished blocks' records stay, so a re-run resumes."""


# --------------------------------------------------------------------------- per-process state


class ProcessCache:
    """Values a process builds once and finds again by key (each worker process holds its own):
    the open arrays here, the built models in ``execute``. ``limit``: at most this many, the oldest
    dropped first (None: no limit). Tests read it (``keys()``, ``in``) instead of private names."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self._items: dict = {}

    def get(self, key, build: Callable[[], object] | None = None):
        """The value kept under ``key``; else ``build()``'s, kept (``build`` None: None)."""
        value = self._items.get(key)
        if value is None and build is not None:
            value = build()
            self.put(key, value)
        return value

    def put(self, key, value) -> None:
        while self.limit is not None and len(self._items) >= self.limit:
            self._items.pop(next(iter(self._items)))
        self._items[key] = value

    def drop(self, key) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def keys(self) -> list:
        return list(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)


ARRAYS = ProcessCache(limit=16)  # (url, path, writable, run, image) -> an open zarr array


def _open(url: str, path: str, options: dict | None, writable: bool, image: bool):
    import zarr

    store = make_store(url, options, read_only=not writable)
    arr = zarr.open_array(store, path=path, mode="r+" if writable else "r")
    if writable and image:  # this handle only: zarr's global config is left as it is
        if hasattr(arr, "with_config"):
            arr = arr.with_config({"write_empty_chunks": True})
        else:  # an older zarr 3: an array takes the setting when it is opened
            with zarr.config.set({"array.write_empty_chunks": True}):
                arr = zarr.open_array(store, path=path, mode="r+")
    return arr


def open_array(url: str, path: str, options: dict | None, writable: bool, run: str, image: bool = False):
    """Open once per process and run (``run``: the task's fingerprint or build id, so that a
    recreated array never reuses stale metadata), kept in :data:`ARRAYS`. ``image``: a level of an
    output image (not a scratch array), written with every chunk stored, those equal to the fill
    value too (zarr leaves them out by default), so that an output enhanced again has no false
    "missing chunks"."""
    return ARRAYS.get((url, path, writable, run, image), lambda: _open(url, path, options, writable, image))


def forget_array(url: str, path: str, writable: bool, run: str, image: bool = False) -> None:
    """Drop an open array from :data:`ARRAYS` (a read that failed reopens it)."""
    ARRAYS.drop((url, path, writable, run, image))


_LIBC = None


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


def release_heap() -> None:
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


# --------------------------------------------------------------------------- the block-task protocol


@dataclass(frozen=True)
class BlockWork:
    """What travels with each block of a task (small, picklable, no data): ``process(job, index,
    *args)`` reads, computes and writes block ``index`` and returns ``(voxels written, note or
    None)``; ``done_url``: where the blocks' done-records go (None: none kept); ``release``: hand
    the heap back after each block (tasks that allocate much per block)."""

    process: Callable[..., tuple[int, dict | None]]
    job: object
    done_url: str | None = None
    options: dict | None = None
    release: bool = False


def process_block(work: BlockWork, index: int, *args) -> tuple[int, float, int]:
    """One block on a worker (or here): process it, then its note and done-record (the note first: a
    resumed run still counts the block's findings); returns ``(index, seconds, voxels)``."""
    t0 = time.perf_counter()
    voxels, note = work.process(work.job, index, *args)
    if work.done_url is not None:
        records = DoneRecords(work.done_url, work.options)
        if note:
            records.note(index, note)
        records.mark(index)
    if work.release:
        release_heap()
    return index, time.perf_counter() - t0, voxels


@dataclass(frozen=True)
class BlockTask:
    """One kind of block work and how the engine shows it (the client's side; only ``work`` travels).

    ``blocks``: how many; ``label``: the progress bar's name; ``unit``: what a block is called
    ("blocks", "chunks", "shards"); ``rate_scale``/``rate_unit``: the bar's rate; ``key``: the Dask
    keys' prefix; ``place``: what comes before "N of M blocks" when a lost cluster says how far the
    run got; ``args(i)``: more arguments for block ``i``, decided here (a per-block policy such as
    ``--skip-background``'s); ``setup(client)``: before the first block, in this process (None) or
    on the cluster (under the no-worker watch); ``data_errors``: the task's own errors, raised as
    they are (never read as a lost cluster)."""

    work: BlockWork
    blocks: int
    label: str
    key: str
    unit: str = "blocks"
    rate_scale: int = 1
    rate_unit: str = "voxels/s (approx)"
    place: str = ""
    args: Callable[[int], tuple] | None = None
    setup: Callable[[object], None] | None = None
    data_errors: tuple[type[BaseException], ...] = ()


# --------------------------------------------------------------------------- the engine


def run_blocks(
    task: BlockTask,
    client=None,
    progress: bool = True,
    on_block: Callable[[int], None] | None = None,
    window: int | None = None,
    no_workers_s: float | None = None,
) -> dict:
    """Every block of ``task`` not yet recorded done, in this process (``client`` None) or windowed
    on the cluster; ``on_block(index)`` as each ends. Returns ``total``, ``skipped`` (recorded done
    before), ``computed``, ``voxels`` (written) and ``seconds``. ``no_workers_s``: the no-worker
    limit (default :data:`NO_WORKERS_S`)."""
    done: set[int] = set()
    if task.work.done_url is not None:
        records = DoneRecords(task.work.done_url, task.work.options)
        records.create()
        done = records.load()
    total = task.blocks
    todo = (i for i in range(total) if i not in done)
    bar = Progress(
        total, task.label, unit=task.unit, quiet=not progress, rate_scale=task.rate_scale, rate_unit=task.rate_unit
    )
    bar.done = len(done)
    t0 = time.perf_counter()
    count = {"blocks": 0, "voxels": 0}

    def finished(result: tuple[int, float, int]) -> None:
        count["blocks"] += 1
        count["voxels"] += result[2]
        bar.update(len(done) + count["blocks"])
        if on_block is not None:
            on_block(result[0])

    try:
        if client is None:
            if task.setup is not None:
                task.setup(None)
            for i in todo:
                finished(process_block(task.work, i, *(task.args(i) if task.args else ())))
        else:
            run_windowed(
                client,
                task,
                todo,
                finished,
                lambda: f"{task.place}{len(done) + count['blocks']} of {total} {task.unit}",
                window,
                started=lambda: bar.update(len(done), force=True),  # the first line: the tasks are out
                no_workers_s=no_workers_s,
            )
    except ClusterLost:  # its line follows the bar's last; a task's own error comes alone
        bar.close()
        raise
    bar.close()
    seconds = time.perf_counter() - t0
    return {
        "total": total,
        "skipped": len(done),
        "computed": count["blocks"],
        "voxels": count["voxels"],
        "seconds": seconds,
    }


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


def _lost(client, watch: _NoWorkerWatch, exc: BaseException, where: Callable[[], str]) -> ClusterLost | None:
    """The one-line error for a cluster that went away (no worker, or no scheduler), else None."""
    if watch.fired:
        return ClusterLost(
            f"the Dask cluster at {_address(client)} had no worker for {watch.limit:.0f} s, after "
            f"{where()}: the finished blocks are kept; re-run the same command once workers are up "
            f"to resume"
        )
    if _cluster_gone(client, exc):
        return ClusterLost(
            f"lost the Dask scheduler {_address(client)} ({type(exc).__name__}) after {where()}: "
            f"the finished blocks are kept; re-run the same command against a running scheduler "
            f"to resume"
        )
    return None


def run_windowed(
    client,
    task: BlockTask,
    todo: Iterator[int],
    finished: Callable[[tuple[int, float, int]], None],
    where: Callable[[], str],
    window: int | None = None,
    started: Callable[[], None] | None = None,
    no_workers_s: float | None = None,
) -> None:
    """Submit :func:`process_block` for each block of ``todo`` windowed (a few tasks per worker in
    flight, the next submitted as each ends), so the scheduler never holds more than the window
    however many blocks there are; ``finished(result)`` per block. ``task.setup(client)`` runs
    first, under the same guard; ``started()`` once the first window is out. A lost cluster is one
    line (:class:`ClusterLost`, ``where()`` says how far the run got)."""
    from distributed import as_completed

    watch = _NoWorkerWatch(client, NO_WORKERS_S if no_workers_s is None else no_workers_s)
    try:
        watch.start()
        if task.setup is not None:
            task.setup(client)
        window = window or 2 * max(1, sum(client.nthreads().values())) + 2

        def submit(i: int):
            args = task.args(i) if task.args else ()
            return client.submit(process_block, task.work, i, *args, pure=False, key=f"{task.key}-{i}")

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
    except task.data_errors:
        raise  # the data's fault, named by the task
    except Exception as exc:  # noqa: BLE001
        lost = _lost(client, watch, exc, where)
        if lost is not None:
            raise lost from None
        raise
    finally:
        watch.stop()
