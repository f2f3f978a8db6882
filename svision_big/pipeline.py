"""Out-of-core pipeline on OME-Zarr images: train on a sampled region, enhance block by block.

Data flows one way: input store -> block (read + halo) -> operator -> output store. Level 0
of the output is written block by block (resumable through done-records), the pyramid is then
built from the stored level 0, and the OME metadata is written last, so an output only claims
to be an image once it is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import __version__
from . import background as bgd
from .checkpoint import Checkpoints
from .engine import limit_arenas
from .execute import Job, execute
from .halo import pass_halo
from .harmcheck import check_choice
from .model import Model, ModelFileError, load_model
from .ngff import (
    Image,
    NgffError,
    format_for,
    multiscales_metadata,
    open_image,
    open_output_group,
    store_exists,
    upsampled_transform,
    viewer_metadata,
)
from .noisecheck import denoise_mode
from .operator import (
    DEFAULT_PRECISION,
    IMAGE,
    Pass,
    output_name,
    plan_passes,
    precision_dtype,
    readers,
    resolve_precision,
)
from .plan import BlockPlan, default_block, on_axes
from .pyramid import build_levels, pyramid_datasets, pyramid_factors
from .settings import parse_factors
from .state import OutputState
from .store import location, same_or_nested
from .train import fit

DEFAULT_TRAIN_VOXELS = 4_000_000
# Output chunks for viewers, and each pass's default block (output voxels per axis, whole chunks).
# Bigger blocks repeat less halo and the streamed network runs as fast per voxel at any size, so
# its block is as large as a single-threaded worker's memory allows; back-projection runs as fast
# in smaller blocks, at half the memory. `python benchmarks/pipeline.py --only blocks` measures them.
DEFAULT_CHUNK = 128
DEFAULT_PASS_BLOCK = {"net": 256, "bp": 128, "final": 128}
# A back-projection pass whose halo is no wider than the network's (2 iterations or fewer at x2)
# takes the network's block instead: its compute is negligible, so what it costs is reading the
# staged float32 output, and smaller blocks re-read a larger share of halo, in more tasks.
NARROW_BP_HALO = 8
# The smallest volume `fit` trains on: every spatial axis at least 5 voxels (the noise estimate's
# lag-2 second differences need 5).
MIN_TRAIN_EDGE = 5
# Blocks smaller than twice the halo on a split axis repeat more work than they do (a few voxels
# per block can mean hours of halo). They are refused (unless ``force``) once the repeated work
# passes this many input voxels (a few core-minutes), so small test volumes may still be cut into
# many small blocks.
MAX_REPEATED_VOXELS = 2**24


def _default_pass_block(kind: str, halo: tuple[int, ...]) -> int:
    if kind != "net" and max(halo, default=0) <= NARROW_BP_HALO:
        return DEFAULT_PASS_BLOCK["net"]
    return DEFAULT_PASS_BLOCK[kind]


# --------------------------------------------------------------------------- helpers


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _outer_axes(image: Image) -> list[int]:
    return [i for i in range(image.ndim) if i not in image.spatial_axes]


def _channel_axis(image: Image) -> int | None:
    for i, a in enumerate(image.axes):
        if a.get("type") == "channel" or a["name"] == "c":
            return i
    return None


def _as_model(m: Model | str | os.PathLike) -> Model:
    if isinstance(m, Model):
        return m
    path = os.fspath(m)
    if "://" not in path and os.path.isdir(path):  # open() would print a raw errno
        raise ValueError(f"model file {path} is a directory, not an svision-big model file")
    if "://" not in path and os.path.exists(path) and not os.access(path, os.R_OK):
        raise ValueError(f"model file {path} cannot be read (permission denied)")
    return load_model(path)


def _check_workers(workers: int | None) -> None:
    """A LocalCluster of -1 workers hung (killed at 300 s); 0 silently meant one per core."""
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        raise ValueError(f"--workers {workers}: need at least 1 worker")


def _check_training_args(steps: int | None, budget: int, seed: int = 0) -> None:
    """Before any data is read: a budget of 0 voxels never stopped shrinking the training box."""
    if not 0 <= seed < 2**63:  # `--seed 10**21` was "Overflow when unpacking long long" from torch
        raise ValueError(f"--seed {seed}: use a whole number from 0 to 2^63 - 1")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps {steps}: need at least 1 training step")
    if budget < 1:
        raise ValueError(f"--budget {budget}: need a positive number of voxels to train on")


def _check_device(device: str | None, client=None) -> None:
    """A device this machine (or, with a client, every worker) cannot use fails here, as one line,
    before anything is written: `--device cuda` without CUDA was an AssertionError deep in torch."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if kind not in ("cpu", "cuda", "mps", "xpu"):  # `meta` passed and failed once the output existed
        raise ValueError(f"--device {device}: cannot compute real values (use cpu, cuda, cuda:1, mps)")
    if client is None:
        why = _device_problem(device)
    else:
        found = client.run(_device_problem, device)
        why = next((f"worker {w}: {v}" for w, v in found.items() if v), None)
    if why:
        raise ValueError(f"--device {device}: not usable here ({why})")


def _device_problem(device: str) -> str | None:
    """None when a tensor can be made on ``device`` in this process, else why not (one line)."""
    import torch

    try:
        torch.zeros(1, device=device)
    except Exception as exc:  # AssertionError without CUDA, RuntimeError for a missing index, ...
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


def _output_dtype(dtype: str | None, image_dtype) -> str:
    """The output's dtype name; `--dtype bogus` was a TypeError from numpy."""
    try:
        dt = np.dtype(dtype) if dtype is not None else np.dtype(image_dtype)
    except TypeError:
        raise ValueError(f"--dtype {dtype}: not a data type (e.g. uint8, uint16, float32)") from None
    if dt.kind not in "uif":
        if dtype is None:
            raise ValueError(f"the input's dtype is {dt.name}: pass --dtype with an integer or floating-point type")
        raise ValueError(f"--dtype {dtype}: the output needs an integer or floating-point type, not {dt.name}")
    return dt.name


F32_MAX = float(np.finfo(np.float32).max)


def _coarse_peak(image: Image, max_voxels: int = 2**24) -> tuple[int, float] | None:
    """(level, largest finite magnitude) of the coarsest level, or None where it is too large to read."""
    level = image.nlevels - 1
    arr = image.level(level)
    if math.prod(arr.shape) > max_voxels:
        return None
    a = np.abs(image.read(level).astype(np.float64))
    a = a[np.isfinite(a)]
    return level, float(a.max()) if a.size else 0.0


def _check_range(image: Image, input: str, dtype: str) -> None:
    """Values the float32 working precision or a float output type cannot hold are refused before
    anything is written (a float64 input near 1e300 came out all NaN/Inf; --dtype float16 on int32
    data wrote 99.98% Inf)."""
    got = _coarse_peak(image) if np.dtype(image.dtype).itemsize >= 4 or np.dtype(dtype).kind == "f" else None
    if got is None:
        return
    level, peak = got
    if peak > F32_MAX:
        raise NgffError(
            f"{input}: values up to {peak:.3g} on level {level} exceed float32's range ({F32_MAX:.3g}), the "
            f"working precision: rescale the input"
        )
    out = np.dtype(dtype)
    if out.kind == "f" and peak > float(np.finfo(out).max):
        raise ValueError(
            f"--dtype {out.name} holds values up to {float(np.finfo(out).max):.6g}, but {input} reaches "
            f"{peak:.6g} (level {level}): choose float32 or an integer type"
        )


def _check_nonfinite(mode: str) -> None:
    from .inputcheck import NONFINITE

    if mode not in NONFINITE:
        raise ValueError(f"--nonfinite {mode}: use one of {', '.join(NONFINITE)}")


def _check_coarse_finite(image: Image, input: str, max_voxels: int = 2**24) -> None:
    """NaN/Inf in a float input, found on its coarsest level (a mean pyramid carries them up)
    before anything is written; the blocks check every voxel they read as well."""
    if np.dtype(image.dtype).kind != "f":
        return
    level = image.nlevels - 1
    arr = image.level(level)
    if math.prod(arr.shape) > max_voxels:
        return
    n = int(np.count_nonzero(~np.isfinite(image.read(level))))
    if n:
        raise NgffError(
            f"{input}: {n:,} NaN/Inf voxels on level {level} of {math.prod(arr.shape):,}: a network "
            f"spreads them over the output; pass --nonfinite fill to read them as the fill value"
        )


def _output_options(input: str, output: str, storage_options: dict | None, output_storage_options: dict | None):
    """The output's fsspec options: its own, else the input's when both live on the same kind of
    remote store (so an S3 output inherits --storage-options)."""
    if output_storage_options is not None:
        return output_storage_options
    proto = lambda u: u.split("://", 1)[0] if "://" in u and not u.startswith("file://") else None  # noqa: E731
    return storage_options if proto(output) is not None and proto(output) == proto(input) else None


def _check_reachable(url: str, options: dict | None, what: str) -> None:
    """A remote store that cannot be reached fails here, as one line, before any training or write
    (not as a botocore traceback after training)."""
    if "://" not in url or url.startswith("file://"):
        return  # a local folder is made as needed
    import fsspec.core

    try:
        fs, path = fsspec.core.url_to_fs(url, **(options or {}))
        if not fs.exists(path):
            bucket = path.strip("/").split("/", 1)[0]
            if bucket and bucket != path.strip("/") and not fs.exists(bucket):
                raise NgffError(f"the {what} {url}: {bucket} does not exist on that store")
    except NgffError:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp, gcsfs ... each have their own
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NgffError(
            f"cannot reach the {what} store {url}: {cause} (check --{'output-' if what == 'output' else ''}"
            f"storage-options)"
        ) from None


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


# --------------------------------------------------------------------------- training on a sample


def _box_size(shape: tuple[int, ...], budget: int) -> list[int]:
    """Shrink the longest axes first until the box holds at most ``budget`` voxels (thin z stays whole)."""
    size = list(shape)
    while math.prod(size) > budget:
        i = int(np.argmax(size))
        size[i] = max(1, int(size[i] * 0.9))
    return size


def training_region(
    image: Image, outer: dict[int, int], budget: int = DEFAULT_TRAIN_VOXELS, coarse_voxels: int = 2_000_000
) -> tuple[tuple[slice, ...], int]:
    """Where to train: a level-0 box of at most ``budget`` voxels centred on the most signal,
    found on a coarse pyramid level so the whole volume is never read. Returns (box, level used)."""
    spatial = image.spatial_axes
    shape0 = [image.shape[a] for a in spatial]
    level = image.nlevels - 1
    for i in range(image.nlevels):
        if math.prod(image.level(i).shape[a] for a in spatial) <= coarse_voxels:
            level = i
            break
    sel = tuple(outer.get(i, slice(None)) for i in range(image.ndim))
    with np.errstate(over="ignore"):  # beyond float32 is Inf, zeroed here: fit refuses such a volume in one line
        coarse = np.nan_to_num(image.read(level, sel).astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    ratio = [s0 / max(1, sc) for s0, sc in zip(shape0, coarse.shape)]
    size = _box_size(tuple(shape0), budget)
    box_c = [max(1, int(round(s / r))) for s, r in zip(size, ratio)]
    lo, hi = np.percentile(coarse, [1.0, 99.9])
    score = ((coarse - lo) / max(hi - lo, 1e-12) > 0.2).astype(np.float32)
    if score.any():
        from scipy import ndimage  # training only: enhance does not pay for the import

        dens = ndimage.uniform_filter(score, size=box_c, mode="constant")
        centre = np.unravel_index(int(np.argmax(dens)), dens.shape)
    else:
        centre = tuple(n // 2 for n in coarse.shape)
    box = []
    for c, r, s, n in zip(centre, ratio, size, shape0):
        start = int(np.clip(round((c + 0.5) * r - s / 2), 0, n - s))
        box.append(slice(start, start + s))
    return tuple(box), level


def train(
    input: str | os.PathLike,
    factor,
    steps: int | None = None,
    channel: int = 0,
    time_index: int = 0,
    seed: int = 0,
    budget: int = DEFAULT_TRAIN_VOXELS,
    storage_options: dict | None = None,
    quiet: bool = False,
    psf_fwhm=None,
    acquisition: str = "auto",
    nonfinite: str = "error",
    denoise: str = "auto",
    operator: str = "auto",
    ensemble: int | str = "auto",
    checkpoint_dir=None,
) -> Model:
    """Train a model on a sampled region of an OME-Zarr image (one channel, one time point).
    ``nonfinite``: NaN/Inf in the sample stop training, naming how many ("error"), or are replaced
    by the array's fill value ("fill"). ``checkpoint_dir``: where training saves its state every few
    steps and resumes from (``train.fit``)."""
    _check_training_args(steps, budget, seed)
    _check_nonfinite(nonfinite)
    denoise_mode(denoise)
    check_choice(operator, ensemble)
    image = open_image(input, storage_options)
    spatial = image.spatial_axes
    if len(spatial) not in (2, 3):
        raise NgffError(f"{input}: needs 2 or 3 spatial axes, found {len(spatial)}")
    if channel not in (None, 0) and _channel_axis(image) is None:
        raise NgffError(f"--channel {channel}: {input} has no channel axis")
    parse_factors(factor, len(spatial))  # a bad factor fails before any data is read
    _check_trainable(image, budget, input)
    outer = _outer_selection(image, channel, time_index)
    box, level = training_region(image, outer, budget)
    sel = on_axes([outer.get(i, slice(None)) for i in range(image.ndim)], spatial, box)
    sample = image.read(0, tuple(sel))
    sample = _finite_sample(sample, image, input, box, nonfinite, quiet)
    if not quiet:
        print(
            f"training on level-0 region {[(s.start, s.stop) for s in box]} ({sample.size:,} voxels, "
            f"found on level {level}), channel {channel}",
            flush=True,
        )
    model = fit(
        sample,
        factor=stored_order(image, parse_factors(factor, len(spatial))),
        steps=steps,
        seed=seed,
        quiet=quiet,
        psf_fwhm=stored_order(image, psf_fwhm) if isinstance(psf_fwhm, (tuple, list)) else psf_fwhm,
        acquisition=acquisition,
        denoise=denoise,
        operator=operator,
        ensemble=ensemble,
        checkpoint_dir=checkpoint_dir,
    )
    model.info["source"] = {
        "url": str(input),
        "channel": channel,
        "time": time_index,
        "region": [[s.start, s.stop] for s in box],
        "coarse_level": level,
    }
    return model


def _finite_sample(sample: np.ndarray, image: Image, input: str, box, nonfinite: str, quiet: bool) -> np.ndarray:
    """NaN/Inf in the training sample: training failed after 40-70 s with "min() arg is an empty
    sequence". Say so, and how many, or (``fill``) replace them and say how many."""
    if sample.dtype.kind != "f":
        return sample
    bad = ~np.isfinite(sample)
    n = int(np.count_nonzero(bad))
    if not n:
        return sample
    region = "x".join(f"{s.start}:{s.stop}" for s in box)
    if nonfinite != "fill":
        raise NgffError(
            f"{input}: the training region [{region}] holds {n:,} NaN/Inf voxels of {sample.size:,}: "
            f"svision-big cannot train on them; pass --nonfinite fill to read them as the fill value"
        )
    from .inputcheck import fill_value

    sample = np.where(bad, fill_value(image.level(0)), sample)
    if not quiet:
        print(f"training: {n:,} NaN/Inf voxels in the training region read as the fill value", flush=True)
    return sample


def _check_trainable(image: Image, budget: int, input: str) -> None:
    """Refuse, naming the minimum, a volume (or a budget's box) too small to train on: a 3x5x5
    volume was an IndexError inside numpy after reading the data."""
    shape = tuple(image.shape[a] for a in image.spatial_axes)
    if min(shape) < MIN_TRAIN_EDGE:
        raise NgffError(
            f"{input}: a volume of {'x'.join(map(str, shape))} voxels is too small to train on: "
            f"every spatial axis needs at least {MIN_TRAIN_EDGE} voxels"
        )
    box = _box_size(shape, budget)
    if min(box) < MIN_TRAIN_EDGE:
        need = budget
        while min(_box_size(shape, need)) < MIN_TRAIN_EDGE:
            need *= 2
        raise ValueError(
            f"--budget {budget}: a training box of {'x'.join(map(str, box))} voxels is too small "
            f"(every axis needs at least {MIN_TRAIN_EDGE}): use a budget of at least {need}"
        )


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


# --------------------------------------------------------------------------- enhance


@dataclass(frozen=True)
class EnhanceSettings:
    """Everything ``enhance`` is asked besides its input, output and model(s); see ``enhance``."""

    # what the output is
    block: tuple[int, ...] | int | None = None  # output voxels per task of the last pass; None: the defaults
    dtype: str | None = None  # None: the input's
    ngff: str | None = None  # NGFF version; None: the input's
    shards: bool = False
    compression: bool = True
    channel: int | None = None  # None: every channel
    precision: str = DEFAULT_PRECISION
    nonfinite: str = "error"
    strict: bool = False
    skip_background: bool | float | str | None = None  # None/False: off; True/"auto": the default rule; a raw threshold
    # what the run may do
    overwrite: bool | str = False  # "any": also an output svision-big did not write
    force: bool = False
    break_lock: bool = False
    # where and how it runs
    device: str | None = None
    client: Any = None
    workers: int | None = None
    scheduler: str | None = None
    storage_options: dict | None = None
    output_storage_options: dict | None = None
    progress: bool = True
    on_block: Callable[[int], None] | None = None
    provenance_extra: dict | None = None  # recorded beside the provenance (``run``: its key and model files)


@dataclass(frozen=True)
class _Outer:
    """The non-spatial axes (t, c) of a run: positions, sizes processed, the chosen channel's offset."""

    axes: tuple[int, ...]
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    model_axis: int | None  # which outer axis selects the model (one model per channel)


@dataclass(frozen=True)
class _Layout:
    """The passes, their block plans, and the output's level 0 (full axes)."""

    passes: tuple[Pass, ...]
    plans: list[BlockPlan]
    block: tuple[int, ...]  # the last pass's block (output voxels per spatial axis)
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    fmt: Any = None  # the output's NgffFormat and dtype name, once `_output_format` has checked them
    dtype: str = ""


def _full_shape(image: Image, outer: _Outer, spatial_shape) -> tuple[int, ...]:
    return tuple(on_axes(on_axes(image.shape, image.spatial_axes, spatial_shape), outer.axes, outer.shape))


def _full_chunks(image: Image, spatial_chunks) -> tuple[int, ...] | None:
    return None if spatial_chunks is None else tuple(on_axes([1] * image.ndim, image.spatial_axes, spatial_chunks))


def _open_cluster(client, workers: int | None, scheduler: str | None):
    """(client, things to close). No flag: one in-process worker with a task thread per core.

    Threads, not processes: the network, the codecs and numpy release the GIL, so threads keep both
    cores busy, while a process cluster spawns interpreters that import torch again and receive the
    models by pickle before the first task. Measured on 2 cores (96x256x256 x2, ensemble 8, random
    default model, ``python benchmarks/whole_command.py``): see benchmarks/README.md."""
    if client is not None:
        return client, []
    if scheduler == "sync":
        return None, []
    from distributed import Client, LocalCluster

    if scheduler:
        c = Client(scheduler)
        return c, [c]
    n = workers or _usable_cores()
    limit_arenas(n)
    quiet = _QuietWorkerLog()
    cluster = LocalCluster(n_workers=1, threads_per_worker=n, processes=False, dashboard_address=None)
    c = Client(cluster)
    return c, [c, cluster, _TorchThreads(), quiet]


class _QuietWorkerLog:
    """While the in-process cluster lives, two kinds of its worker's records are dropped, because the
    run reports the same event in one line: "Compute Failed" (8-10 lines: key, state, task,
    exception, traceback; the exception reaches the run) and, after Ctrl-C or SIGTERM, "Async
    instruction ... ended with CancelledError" (one per running task; the run says "interrupted").
    Other worker records still print; a remote cluster's workers log in their own processes."""

    LOGGERS = ("distributed.worker", "distributed.worker.state_machine")

    def __init__(self) -> None:
        import logging

        self.loggers = [logging.getLogger(n) for n in self.LOGGERS]
        for lg in self.loggers:
            lg.addFilter(self)

    @staticmethod
    def filter(record) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Compute Failed") or "ended with CancelledError" in msg)

    def close(self) -> None:
        for lg in self.loggers:
            lg.removeFilter(self)


def _usable_cores() -> int:
    """The cores this process may run on (a container's or a job's share, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _TorchThreads:
    """The caller's torch thread count, given back when the in-process cluster closes (its worker's
    tasks run one torch thread each)."""

    def __init__(self) -> None:
        import torch

        self.n = torch.get_num_threads()

    def close(self) -> None:
        import torch

        torch.set_num_threads(self.n)


def _default_device() -> str:
    """What workers pick without ``device`` (execute._device), as seen from the client."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def enhance(
    input: str | os.PathLike,
    output: str | os.PathLike,
    model,
    *,
    client=None,
    workers: int | None = None,
    scheduler: str | None = None,
    block: tuple[int, ...] | int | None = None,
    dtype: str | None = None,
    ngff: str | None = None,
    overwrite: bool | str = False,
    shards: bool = False,
    compression: bool = True,
    channel: int | None = None,
    storage_options: dict | None = None,
    output_storage_options: dict | None = None,
    progress: bool = True,
    device: str | None = None,
    precision: str = DEFAULT_PRECISION,
    on_block=None,
    force: bool = False,
    break_lock: bool = False,
    nonfinite: str = "error",
    strict: bool = False,
    provenance_extra: dict | None = None,
    skip_background: bool | float | str | None = None,
) -> dict:
    """Enhance an OME-Zarr image into a new, upsampled, multiscale OME-Zarr image.

    ``model``: a Model, a model path, or a list of them (one per channel). ``scheduler``: a Dask
    scheduler address, or "sync" to run in this process; otherwise a local cluster of ``workers``.
    ``precision``: the networks' arithmetic, "float32" (the default and reference:
    ``operator.DEFAULT_PRECISION``), "bfloat16" (faster on CPUs with AVX512-BF16; see
    ``operator.precision_dtype``) or "auto" (bfloat16 where the CPU has it natively, else float32:
    ``operator.resolve_precision``; the provenance records the choice). ``force``: run blocks too small for their
    halo. ``break_lock``: take the output's lock even from a live run or another host. ``nonfinite``:
    NaN/Inf in a float input stop the run ("error") or read as the fill value ("fill", counted in
    the provenance). ``strict``: a missing input chunk stops the run (else: counted, warned about).
    ``skip_background``: True (or "auto") writes blocks whose input lies in the background (decided on
    a coarse pyramid level, threshold from the model's normalisation) as their cubic upsampling,
    without the network; a number is the threshold in raw input units (``docs/sparse.md``).
    The output is locked (``state.OutputLock``) from before its first write to the end. The keywords
    are those of :class:`EnhanceSettings`; ``enhance_with`` takes them as one.
    """
    return enhance_with(
        input,
        output,
        model,
        EnhanceSettings(
            block=block,
            dtype=dtype,
            ngff=ngff,
            shards=shards,
            compression=compression,
            channel=channel,
            precision=precision,
            nonfinite=nonfinite,
            strict=strict,
            skip_background=skip_background,
            overwrite=overwrite,
            force=force,
            break_lock=break_lock,
            device=device,
            client=client,
            workers=workers,
            scheduler=scheduler,
            storage_options=storage_options,
            output_storage_options=output_storage_options,
            progress=progress,
            on_block=on_block,
            provenance_extra=provenance_extra,
        ),
    )


def enhance_with(input: str | os.PathLike, output: str | os.PathLike, model, settings: EnhanceSettings) -> dict:
    """``enhance`` with its settings as one :class:`EnhanceSettings`."""
    input, output = os.fspath(input), os.fspath(output)
    s = _check_request(input, output, settings)
    image = open_image(input, s.storage_options)
    models = _models_for(image, model, input)
    outer = _outer_layout(image, s.channel, len(models), input)
    lay = _output_format(image, input, output, _layout(image, models, outer, s), s)
    skip = _background(image, models, outer, lay, s)
    fp, provenance = _identity(input, image, models, lay, s, skip)
    state = OutputState(output, s.output_storage_options)
    lock = state.lock(s.break_lock)
    verdict = state.checked_verdict(fp, s.overwrite, lock, provenance["input_digest"], provenance["identity"])
    if verdict == "replace":
        _check_models_outside(model, output)
    if (
        verdict == "resume" and state.provenance().get("state") == "complete" and not state.has_leftovers()
    ):  # reads only: no lock, no cluster
        return _already_complete(output, fp, lay)
    cl, owned = _open_cluster(s.client, s.workers, s.scheduler)  # a wrong --scheduler fails before any write
    held = None
    try:
        if cl is not None and s.client is None and s.scheduler not in (None, "sync"):
            _check_device(s.device, cl)  # the workers of a cluster given by address
        held = lock.acquire()  # before the output's first write, until its last
        group, resuming = _prepare_output(state, image, outer, lay, fp, provenance, s)
        if group is None:
            return _already_complete(output, fp, lay)
        jobs = _jobs(input, output, image, models, outer, lay, state, fp, s, skip)
        if s.progress:
            _announce(models[0].factors, output, resuming, lay, skip)
        stats, notes = _run_passes(jobs, models, cl, state, s, input, skip)
        return _finish_output(
            group,
            state,
            image,
            models,
            lay,
            fp,
            {**provenance, **(s.provenance_extra or {}), **notes},
            stats,
            cl,
            s,
            output,
        )
    finally:
        _close(owned, held)


def _check_request(input: str, output: str, s: EnhanceSettings) -> EnhanceSettings:
    """What can be checked before the input is opened (and, in ``run``, before training); returns the
    settings with the output's storage options resolved."""
    _check_workers(s.workers)
    _check_nonfinite(s.nonfinite)
    s = replace(s, skip_background=bgd.parse_threshold(s.skip_background))  # a bad threshold fails first
    s = replace(s, output_storage_options=_output_options(input, output, s.storage_options, s.output_storage_options))
    if s.client is None and s.scheduler in (None, "sync"):
        _check_device(s.device)  # a remote cluster's workers are asked once it is open
    device = s.device or _default_device()
    s = replace(s, precision=resolve_precision(s.precision, device))  # "auto": what this machine runs fastest
    precision_dtype(s.precision, device)  # a bad name fails before anything is opened
    if same_or_nested(input, output):
        raise NgffError(f"the output {output} must not be the input or lie inside it (or contain it)")
    return s


def _check_channel(image: Image, channel: int | None, input: str) -> None:
    cax = _channel_axis(image)
    if channel not in (None, 0) and cax is None:
        raise NgffError(f"--channel {channel}: {input} has no channel axis")
    if cax is not None and channel is not None and not 0 <= channel < image.shape[cax]:
        raise NgffError(f"channel {channel} is out of range: the image has {image.shape[cax]}")


def _check_models_outside(model, output: str) -> None:
    """Replacing the output must not delete the model file this run reads (``--model OUT/x.svb``)."""
    for m in model if isinstance(model, (list, tuple)) else [model]:
        if isinstance(m, (str, os.PathLike)) and same_or_nested(os.fspath(m), output):
            raise NgffError(
                f"the model {os.fspath(m)} lies inside the output {output}, which --overwrite would delete: "
                f"move the model out of it first"
            )


def _models_for(image: Image, model, input: str) -> list[Model]:
    """The model(s), loaded, and checked against each other and the image."""
    models = [_as_model(m) for m in (model if isinstance(model, (list, tuple)) else [model])]
    factors = models[0].factors
    if any(m.factors != factors for m in models):
        raise ValueError("all per-channel models must share the same factors")
    if len(image.spatial_axes) != len(factors):
        raise NgffError(f"the model is {len(factors)}D but {input} has {len(image.spatial_axes)} spatial axes")
    if any(m.norm.ceiling is not None for m in models):
        got = _coarse_peak(image)
        models = [_own_ceiling(m, None if got is None else got[1], input) for m in models]
    return models


def _own_ceiling(model: Model, peak: float | None, input: str) -> Model:
    """A saturation ceiling belongs to the data the model was trained on, not to the model: where the
    input being enhanced goes above it (its coarsest level's peak), the ceiling is not this input's
    and is dropped, with a note (a channel saturating at 4095 clipped 99.3% of another channel; a
    model trained on a uint8 export clipped 97.8% of uint16 data to 255). The model's hash, and so the
    fingerprint, changes with it."""
    c = model.norm.ceiling
    if c is None or peak is None or peak <= c:
        return model
    print(
        f"svision-big: note: the model's saturation ceiling {c:g} is not {input}'s (it reaches {peak:g}): not applied",
        file=sys.stderr,
        flush=True,
    )
    return Model(
        stages=model.stages,
        norm=replace(model.norm, ceiling=None),
        factors=model.factors,
        final=model.final,
        final_bp_iters=model.final_bp_iters,
        info={**model.info, "ceiling_dropped": c},
    )


def _outer_layout(image: Image, channel: int | None, n_models: int, input: str) -> _Outer:
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
    return _Outer(tuple(axes), shape, offsets, axes.index(cax) if (cax is not None and n_models > 1) else None)


def _blocks(given, passes, specs, out_spatial, factors) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the last pass's block, the output's chunk), output voxels per spatial axis: the ``given``
    size (one for every axis, or one per axis) for both, else chunks for viewers and blocks of
    whole chunks as large as the pass's kind pays for."""
    if given is None:
        chunk = default_block(out_spatial, factors, DEFAULT_CHUNK)
        last_halo = tuple(max(h) for h in zip(*(pass_halo(sp, passes[-1]) for sp in specs)))
        block = default_block(out_spatial, factors, _default_pass_block(passes[-1].kind, last_halo))
        return _whole_chunks(block, chunk, out_spatial), chunk
    _check_block(given, len(out_spatial))
    if not isinstance(given, (int, np.integer)) and len(given) == 1:
        given = given[0]  # one size for every axis, as ``--block 128``
    if isinstance(given, (int, np.integer)):
        given = default_block(out_spatial, factors, int(given))
    block = tuple(int(b) for b in given)
    return block, block


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


def _layout(image: Image, models: list[Model], outer: _Outer, s: EnhanceSettings) -> _Layout:
    """Passes, block plans, and level 0's shape, chunks and shards."""
    spatial = image.spatial_axes
    factors = models[0].factors
    in_shape = tuple(image.shape[a] for a in spatial)
    out_spatial = tuple(n * f for n, f in zip(in_shape, factors))
    specs = [m.spec() for m in models]
    passes = plan_passes(specs)
    given = s.block if s.block is None or isinstance(s.block, (int, np.integer)) else stored_order(image, s.block)
    block, chunk = _blocks(given, passes, specs, out_spatial, factors)
    plans = _pass_plans(passes, specs, in_shape, block, outer.shape, s.block is None)
    if s.block is not None and not s.force:
        _check_block_halo(plans, block, out_spatial, factors, math.prod(outer.shape))
    chunks = _full_chunks(image, chunk)
    shards = None
    if s.shards:
        shards = chunks
        chunks = tuple(c if ax not in spatial else _inner_chunk(c) for ax, c in enumerate(chunks))
    return _Layout(passes, plans, block, _full_shape(image, outer, out_spatial), chunks, shards)


def _output_format(image: Image, input: str, output: str, lay: _Layout, s: EnhanceSettings) -> _Layout:
    """The layout with the output's NGFF format and dtype, once every check that needs no write passed."""
    fmt = format_for(s.ngff or image.fmt.version)
    dtype = _output_dtype(s.dtype, image.dtype)
    if s.shards and fmt.zarr_format == 2:
        raise NgffError("sharding needs NGFF 0.5 (zarr v3)")
    if s.nonfinite == "error":
        _check_coarse_finite(image, input)  # most NaN/Inf inputs fail here, before anything is written
    _check_range(image, input, dtype)
    _check_reachable(output, s.output_storage_options, "output")
    return replace(lay, fmt=fmt, dtype=dtype)


def _background(image: Image, models: list[Model], outer: _Outer, lay: _Layout, s: EnhanceSettings):
    """``--skip-background``: which blocks of every pass are written without the network (None: off)."""
    if s.skip_background is None:
        return None
    return bgd.decide(image, s.skip_background, models, outer, lay.passes, lay.plans)


def _identity(
    input: str, image: Image, models: list[Model], lay: _Layout, s: EnhanceSettings, skip=None
) -> tuple[str, dict]:
    """(fingerprint, provenance). The provenance records the run; the fingerprint hashes what makes
    two runs write the same output (a match resumes, a mismatch refuses), under the key names
    older versions hashed, so that their outputs still resume."""
    rec = {
        "package": "svision-big",
        "version": __version__,
        "fingerprint": None,
        "model_hash": [m.hash for m in models],
        "factors": list(models[0].factors),
        "halo": list(lay.plans[-1].halo),
        "block": list(lay.block),
        "input": os.path.abspath(input) if "://" not in input else input,
        "passes": [
            {"kind": p.kind, "stage": p.stage, "block": list(pl.block), "halo": list(pl.halo)}
            for p, pl in zip(lay.passes, lay.plans)
        ],
        "normalisation": [
            {"lo": m.norm.lo, "hi": m.norm.hi, "floor": m.norm.floor, "ceiling": m.norm.ceiling} for m in models
        ],
        "settings": [m.settings() for m in models],
        "channel": s.channel,
        "dtype": lay.dtype,
        "precision": s.precision,
        "nonfinite": s.nonfinite,
        "strict": s.strict,
        "skip_background": skip.provenance() if skip is not None else {"enabled": False},
        "input_digest": input_digest(image),  # a resume compares it (OutputState.verdict)
    }
    parts = {
        **{k: rec[k] for k in ("input", "block", "dtype", "channel")},
        "models": rec["model_hash"],
        "passes": [list(q.values()) for q in rec["passes"]],
        "input_shape": list(image.shape),
        "input_dtype": str(image.dtype),
        "input_path": image.paths[0],
        "ngff": lay.fmt.version,
        "chunks": list(lay.chunks),
        "shards": lay.shards,
        "compression": s.compression,
    }
    optional = {  # hashed only when not the default: older outputs keep their fingerprints
        "precision": (s.precision, "float32"),
        "nonfinite": (s.nonfinite, "error"),
        "skip_background": (skip.identity() if skip is not None else None, None),
    }
    rec["fingerprint"] = _fingerprint({**parts, **{k: v for k, (v, default) in optional.items() if v != default}})
    # what the fingerprint hashes, defaults included: a refusal names the settings that differ (OutputState.verdict)
    rec["identity"] = json.loads(json.dumps({**parts, **{k: v for k, (v, _) in optional.items()}}, default=str))
    return rec["fingerprint"], rec


DIGEST_CHUNKS = 8  # level-0 chunks the input's content digest reads, spread over the array
DIGEST_COARSE_VOXELS = 2**20  # the coarsest level enters the digest whole up to this size


def input_digest(image: Image) -> str:
    """A cheap digest of the input's identity and content: level 0's array metadata, the coarsest level
    (a mean pyramid carries a change anywhere up to it) and ``DIGEST_CHUNKS`` level-0 chunks spread
    evenly. A resume after the input changed mixed two inputs (19.8% of voxels matched a clean run).
    None where a chunk it reads cannot be decoded: the blocks name that chunk, and a resume after the
    repair is not refused for it (``OutputState.verdict``)."""
    try:
        return _digest(image)
    except Exception:  # noqa: BLE001 - a corrupt chunk: zarr, numcodecs, fsspec each raise their own
        return None


def _digest(image: Image) -> str:
    h = hashlib.sha256()
    arr = image.level(0)
    meta = {"shape": arr.shape, "chunks": arr.chunks, "dtype": str(arr.dtype), "fill": str(arr.fill_value)}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    coarse = image.level(image.nlevels - 1)
    if math.prod(coarse.shape) <= DIGEST_COARSE_VOXELS:
        h.update(np.ascontiguousarray(image.read(image.nlevels - 1)).tobytes())
    grid = [-(-n // c) for n, c in zip(arr.shape, arr.chunks)]
    for flat in sorted({int(i) for i in np.linspace(0, math.prod(grid) - 1, DIGEST_CHUNKS)}):
        idx = np.unravel_index(flat, grid)
        h.update(
            np.ascontiguousarray(
                image.read(0, tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, arr.chunks)))
            ).tobytes()
        )
    return h.hexdigest()[:16]


def _already_complete(output: str, fp: str, lay: _Layout) -> dict:
    return {
        "output": output,
        "state": "already complete",
        "fingerprint": fp,
        "blocks": len(lay.plans[-1]),
        "computed": 0,
    }


def _prepare_output(
    state: OutputState, image: Image, outer: _Outer, lay: _Layout, fp: str, provenance: dict, s: EnhanceSettings
):
    """Under the lock: set up a new output (or clear and set up again), or reopen one to resume.
    Returns (group, resuming), or (None, True) when the output turns out complete."""
    verdict = state.verdict(fp, s.overwrite, provenance["input_digest"], provenance["identity"])  # under the lock
    if verdict in ("replace", "restart"):
        state.clear()
    scratch = [
        (
            state.scratch_path(fp, k),
            _full_shape(image, outer, pl.out_shape),
            *(_full_chunks(image, c) for c in _scratch_layout(pl.block, lay.block)),
        )
        for k, pl in enumerate(lay.plans[:-1])
    ]

    def level0(group):
        lay.fmt.create_array(
            group,
            "0",
            lay.shape,
            lay.chunks,
            lay.dtype,
            _axis_names(image),
            shards=lay.shards,
            compression=s.compression,
        )

    if verdict != "resume":
        return state.set_up(
            lay.fmt, fp, {**provenance, **(s.provenance_extra or {})}, scratch, level0, after_step=_after_setup_step
        ), False
    group = open_output_group(state.output, lay.fmt, state.options, mode="a")
    if group.attrs.get("svision_big", {}).get("state") == "complete":
        state.clean(keep_models=True)
        return None, True
    state.ensure_arrays(group, scratch, level0)
    return group, True


def _after_setup_step(step: str) -> None:
    """Called after each step of setting up a new output. Nothing happens here: tests replace it to
    kill a run at each step and check the re-run completes."""


def _jobs(
    input: str,
    output: str,
    image: Image,
    models: list[Model],
    outer: _Outer,
    lay: _Layout,
    state: OutputState,
    fp: str,
    s: EnhanceSettings,
    skip=None,
) -> list[Job]:
    """One job per pass: where it reads each of its inputs, where it writes, where its done-records go."""
    last = len(lay.passes) - 1
    where = {
        IMAGE: (input, image.paths[0]),
        output_name(last): (output, "0"),
        **{output_name(k): (output, state.scratch_path(fp, k)) for k in range(last)},
    }
    coarse = _coarse_levels(image)
    base = dict(
        out_url=output,
        spatial_axes=tuple(image.spatial_axes),
        outer_axes=outer.axes,
        outer_offsets=outer.offsets,
        models=tuple(m.hash for m in models),
        model_axis=outer.model_axis,
        out_dtype=lay.dtype,
        in_options=s.storage_options,
        out_options=s.output_storage_options,
        device=s.device,
        precision=s.precision,
        nonfinite=s.nonfinite,
        strict=s.strict,
    )
    return [
        Job(
            **base,
            in_url=where[p.source][0],
            in_path=where[p.source][1],
            out_path=where[output_name(k)][1],
            plan=pl,
            done_url=state.done_url(fp, k),
            pass_=p,
            in_raw=p.source == IMAGE,
            out_raw=k == last,
            companion_path=where[p.companion][1] if p.companion else None,
            fill=bgd.Fill(input, image.paths[0], tuple(models[0].factors)) if skip is not None and k == last else None,
            coarse_levels=coarse if p.source == IMAGE else (),
        )
        for k, (p, pl) in enumerate(zip(lay.passes, lay.plans))
    ]


def _coarse_levels(image: Image) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """The input's levels above level 0 that open, with the per-axis ratio of level 0's shape to theirs
    (what tells an absent chunk's emptiness, ``chunks.empty_on_coarser_levels``). They are a help,
    not a need: a level that does not open ends the list, it does not fail the run."""
    shape0 = image.level(0).shape
    out = []
    for i in range(1, image.nlevels):
        try:
            shape = image.level(i).shape
        except NgffError:
            break
        out.append((image.paths[i], tuple(n0 / max(1, n) for n0, n in zip(shape0, shape))))
    return tuple(out)


def _announce(factors, output: str, resuming: bool, lay: _Layout, skip=None) -> None:
    print(
        f"enhance: factors {factors}, {'resuming' if resuming else 'new output'} {output}; {len(lay.passes)} pass(es):",
        flush=True,
    )
    for k, (p, pl) in enumerate(zip(lay.passes, lay.plans)):
        bg = f", {skip.counts()[k]} in the background (no network)" if skip is not None else ""
        print(
            f"  {p.label}: {len(pl)} blocks of {pl.block} output voxels, halo {pl.halo} input voxels "
            f"(halo overhead {pl.overhead():.0%}){bg}",
            flush=True,
        )
    if skip is not None:
        print(
            f"  --skip-background: threshold {', '.join(f'{t:g}' for t in skip.thresholds)} "
            f"({'auto' if skip.auto else 'given'}), decided on input level {skip.level}",
            flush=True,
        )


def _run_passes(
    jobs: list[Job], models: list[Model], cl, state: OutputState, s: EnhanceSettings, input: str, skip=None
) -> tuple[dict, dict]:
    """Every pass in turn, each staged output removed once no remaining pass reads it. Returns the
    stats, and the notes the provenance records about the input as read."""
    passes = [j.pass_ for j in jobs]
    last = len(jobs) - 1
    stats: dict = {"passes": []}
    for k, (p, job) in enumerate(zip(passes, jobs)):
        q = execute(
            job,
            {m.hash: m for m in models},
            client=cl,
            progress=s.progress,
            on_block=s.on_block if k == last else None,
            label=f"pass {k + 1}/{len(jobs)} {p.label}",
            background=None if skip is None else skip.flat(k),
        )
        stats["passes"].append({"kind": p.kind, "stage": p.stage, **q})
        for j in range(min(k + 1, last)):
            if all(i <= k for i in readers(passes, j)):
                state.remove(jobs[j].out_path)
    final = stats["passes"][-1]
    total_s = sum(q["seconds"] for q in stats["passes"])
    stats.update({k: final[k] for k in ("blocks", "skipped", "computed", "todo_at_start", "output_voxels")})
    # the level-0 pass above (the API's meaning); every pass here: a resume skips earlier passes too
    stats["total"] = {k: sum(q[k] for q in stats["passes"]) for k in ("blocks", "skipped", "computed")}
    if skip is not None:  # blocks written without the network: the last pass's (its output), and every pass's
        stats["background"] = final.get("background", 0)
        stats["total"]["background"] = sum(q.get("background", 0) for q in stats["passes"])
    notes = _run_notes(stats["passes"])
    if notes.get("input_missing_chunks"):
        print(
            f"svision-big: warning: {notes['input_missing_chunks']} chunks of {input} are missing and were read "
            f"as the fill value (e.g. {', '.join(notes['input_missing_examples'])}); --strict makes this an error",
            file=sys.stderr,
            flush=True,
        )
    stats.update({k: notes[k] for k in ("input_nonfinite", "input_missing_chunks") if k in notes})
    stats["seconds"] = round(total_s, 3)
    stats["voxels_per_second"] = final["output_voxels"] / total_s if total_s > 0 else 0.0
    return stats, notes


def _finish_output(
    group,
    state: OutputState,
    image: Image,
    models: list[Model],
    lay: _Layout,
    fp: str,
    provenance: dict,
    stats: dict,
    cl,
    s: EnhanceSettings,
    output: str,
) -> dict:
    """The pyramid from the stored level 0, the state removed, the output marked complete (last)."""
    t0 = time.perf_counter()
    group.attrs["svision_big"] = {**provenance, "state": "building pyramid"}
    levels, built = _finish(
        group,
        lay.fmt,
        image,
        lay.shape,
        models[0].factors,
        lay.chunks,
        lay.shards,
        lay.dtype,
        s.compression,
        cl,
        s.channel,
        url=output,
        storage_options=s.output_storage_options,
        done_url=lambda level: state.level_done_url(fp, level),
        progress=s.progress,
    )
    stats["pyramid_seconds"] = round(time.perf_counter() - t0, 3)
    stats["pyramid"] = built
    state.remove(state.work_dir(fp))
    group.attrs["svision_big"] = {**provenance, "state": "complete", "levels": levels}
    state.clean(keep_models=True)  # `run` keeps its models in the output itself
    stats.update(output=output, fingerprint=fp, halo=list(lay.plans[-1].halo), block=list(lay.block), levels=levels)
    return stats


def _close(owned: list, held) -> None:
    """Close the clusters this run opened, then release the lock, also when Ctrl-C or SIGTERM lands
    during the shutdown (it left the lock in a complete output)."""
    try:
        for o in owned:
            try:
                o.close()
            except Exception:  # noqa: BLE001 - a cluster whose scheduler is gone cannot be closed cleanly
                pass
    finally:
        if held is not None:
            held.release()


def _run_notes(passes: list[dict]) -> dict:
    """What provenance records about the input as read (non-finite values, missing chunks)."""
    notes: dict = {}
    for key in ("nonfinite", "missing_chunks"):
        n = max((q.get(key, 0) for q in passes), default=0)  # every pass that reads the input sees all of it
        if n:
            notes[f"input_{key}"] = n
    examples = next((q["missing_examples"] for q in passes if q.get("missing_examples")), None)
    if examples:
        notes["input_missing_examples"] = examples
    return notes


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
            blk = default_block(out, p.factors, _default_pass_block(p.kind, halo))
        else:
            blk = tuple(max(f, min(b, n) - min(b, n) % f) for b, n, f in zip(block, out, p.factors))
        if k == len(passes) - 1 and out != tuple(n * f for n, f in zip(in_shape, specs[0].factors)):
            raise AssertionError("the last pass must produce the output shape")
        plans.append(BlockPlan(ref, p.factors, blk, halo, outer_shape))
    return plans


MIN_SCRATCH_INNER = 16  # smaller inner chunks cost more per-chunk overhead than they save in reads


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


# What an svision-big output consists of (paths relative to the output): the image group, its


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


def _axis_names(image: Image) -> list[str]:
    """The spec's lower-case axis names (iohub's "T C Z Y X" made outputs ngff-zarr rejects)."""
    return [n.lower() for n in image.axis_names]


def _finish(
    group,
    fmt,
    image: Image,
    out_shape,
    factors,
    chunks,
    shards,
    dtype,
    compression,
    client,
    channel: int | None = None,
    **pyramid,
) -> tuple[list[str], list[dict]]:
    """Pyramid from the stored level 0 (resumable level by level and unit by unit with
    ``pyramid``'s ``done_url``: see :func:`pyramid.build_levels`), then the OME metadata (last),
    with a display window for viewers taken from the coarsest level written. Returns the level
    paths and each built level's counts."""
    spatial = image.spatial_axes
    coarsest = image.level(image.nlevels - 1).shape
    pf = pyramid_factors(tuple(out_shape), spatial, min_shape=64, until_shape=tuple(coarsest))
    built = build_levels(
        group,
        fmt,
        _axis_names(image),
        "0",
        spatial,
        pf,
        chunks,
        dtype,
        client=client,
        shards=shards,
        compression=compression,
        **pyramid,
    )
    paths = [q["path"] for q in built]
    full = on_axes([1] * image.ndim, spatial, factors)
    s0, t0 = upsampled_transform(image.scales[0], image.translations[0], full)
    datasets = pyramid_datasets(s0, t0, spatial, pf, paths)
    ome = multiscales_metadata(
        image.axes,
        datasets,
        name=image.name,
        version=fmt.version,
        extra={
            "type": "mean",
            "metadata": {"method": "svision_big enhance, block-mean pyramid", "version": __version__},
        },
    )
    ome = viewer_metadata(ome, image, group[paths[-1] if paths else "0"], fmt.version, factors, channel)
    fmt.write_ome_attrs(group, ome)
    return ["0", *paths], built


# --------------------------------------------------------------------------- run = train + enhance


def run(
    input: str | os.PathLike,
    output: str | os.PathLike,
    factor,
    *,
    steps: int | None = None,
    seed: int = 0,
    channel: int | None = None,
    budget: int = DEFAULT_TRAIN_VOXELS,
    storage_options: dict | None = None,
    output_storage_options: dict | None = None,
    quiet: bool = False,
    overwrite: bool | str = False,
    acquisition: str = "auto",
    psf_fwhm=None,
    denoise: str = "auto",
    operator: str = "auto",
    ensemble: int | str = "auto",
    **kwargs,
) -> dict:
    """Train one model per channel on sampled regions, then enhance (``kwargs``: the other
    :class:`EnhanceSettings`). Trained models are kept in the output's state folder, so re-running
    after a crash reuses them instead of training again."""
    input, output = os.fspath(input), os.fspath(output)
    # every check that needs no model runs before training (minutes) and before any write
    _check_training_args(steps, budget, seed)
    denoise_mode(denoise)
    check_choice(operator, ensemble)
    s = _check_request(
        input,
        output,
        EnhanceSettings(
            channel=channel,
            storage_options=storage_options,
            output_storage_options=output_storage_options,
            progress=not quiet,
            overwrite=overwrite,
            **kwargs,
        ),
    )
    image = _check_run_input(input, output, factor, budget, s)
    cax = _channel_axis(image)
    channels = [channel] if channel is not None else (list(range(image.shape[cax])) if cax is not None else [0])
    run_identity = {
        "input": list(location(input)),  # ./in and in are one input: the run resumes
        "factor": str(factor),
        "steps": steps,
        "seed": seed,
        "budget": budget,
        "shape": list(image.shape),
        "version": __version__,
        "acquisition": acquisition,
        "psf_fwhm": None if psf_fwhm is None else list(np.atleast_1d(psf_fwhm)),
    }
    choices = {"denoise": denoise, "operator": operator, "ensemble": str(ensemble)}
    key = _fingerprint({**run_identity, **{k: c for k, c in choices.items() if c != "auto"}})  # "auto": older keys
    # recorded, "auto" included: a refusal names what differs
    run_identity = json.loads(json.dumps({**run_identity, **choices}, default=str))
    state = OutputState(output, s.output_storage_options)
    kept = {c: state.model_file(c, len(channels)) for c in channels}
    lock = state.lock(s.break_lock)
    prev = state.provenance()
    if prev.get("run_key") == key and prev.get("state") == "complete":  # this run finished earlier
        if state.has_leftovers():
            with lock:
                state.finish_run(key, kept)
        return {
            "output": output,
            "state": "already complete",
            "fingerprint": prev.get("fingerprint"),
            "computed": 0,
            "models": [_join(output, n) for n in kept.values()],
        }
    fs, root = state.models_root(key)
    fresh = store_exists(output, s.output_storage_options) and not fs.exists(root)  # not an earlier run of this one
    if fresh:
        state.checked_verdict("-", overwrite, lock, identity=run_identity, kind="run")  # refused unless --overwrite
    held = lock.acquire()  # training writes models into the output: the lock covers it, and enhance re-enters it
    try:
        if fresh:
            if state.verdict("-", overwrite, identity=run_identity, kind="run") == "replace":
                state.clear()
            overwrite = False
        train_kw = dict(
            steps=steps,
            seed=seed,
            budget=budget,
            storage_options=storage_options,
            quiet=quiet,
            acquisition=acquisition,
            psf_fwhm=psf_fwhm,
            nonfinite=s.nonfinite,
            denoise=denoise,
            operator=operator,
            ensemble=ensemble,
        )
        models = [_channel_model(fs, root, input, factor, c, train_kw) for c in channels]
        stats = enhance_with(
            input,
            output,
            models if len(models) > 1 else models[0],
            replace(
                s,
                overwrite=overwrite,
                provenance_extra={"run_key": key, "run_identity": run_identity, "model_files": sorted(kept.values())},
            ),
        )
        state.finish_run(key, kept)
        stats["models"] = [_join(output, n) for n in kept.values()]
        return stats
    finally:
        held.release()


def _check_run_input(input: str, output: str, factor, budget: int, s: EnhanceSettings) -> Image:
    """The input opened, and every check on it and the settings that needs no model (before training)."""
    image = open_image(input, s.storage_options)
    spatial = image.spatial_axes
    if len(spatial) not in (2, 3):
        raise NgffError(f"{input}: needs 2 or 3 spatial axes, found {len(spatial)}")
    parse_factors(factor, len(spatial))
    _check_channel(image, s.channel, input)
    _check_trainable(image, budget, input)
    _check_block(s.block, len(spatial))
    _check_range(image, input, _output_dtype(s.dtype, image.dtype))  # before training (minutes)
    if s.ngff is not None:
        format_for(s.ngff)
    _check_reachable(output, s.output_storage_options, "output")  # before training (minutes), not after
    return image


def _channel_model(fs, root: str, input: str, factor, channel: int, train_kw: dict) -> Model:
    """The model for one channel: the one trained earlier for this run (in the state folder), else
    trained now and saved there."""
    path = f"{root}/c{channel}.svb"
    if fs.exists(path):
        try:
            m = Model.from_bytes(fs.cat_file(path), where=path)
            if not train_kw["quiet"]:
                print(f"channel {channel}: reusing the model trained earlier ({path})", flush=True)
            return m
        except ModelFileError as exc:  # a model an older version left half-written (a full disk): train again
            print(f"svision-big: note: {exc}; training channel {channel} again", file=sys.stderr, flush=True)
            fs.rm(path)
    ckpt = Checkpoints(f"{root}/c{channel}.ckpt", fs=fs)  # an interrupted training resumes from here
    m = train(input, factor, channel=channel, checkpoint_dir=ckpt, **train_kw)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{path}.part", m.to_bytes())  # whole, then renamed: a full disk leaves no half model
    fs.mv(f"{path}.part", path)
    ckpt.clear()
    return m
