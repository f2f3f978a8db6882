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
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import __version__
from .execute import Job, execute
from .model import Model, load_model
from .ngff import (viewer_metadata, Image, NgffError, _make_store, foreign_file, format_for, multiscales_metadata, open_image,
                   open_output_group, store_exists, upsampled_transform)
from .operator import pass_halo, plan_passes, precision_dtype
from .plan import BlockPlan, default_block
from .pyramid import build_pyramid, pyramid_datasets, pyramid_factors
from .state import LOCK_NAME, OutputLock
from .train import fit, parse_factors

STATE_DIR = "svision_state"
DEFAULT_TRAIN_VOXELS = 4_000_000
# Output chunks for viewers, and each pass's block (output voxels per axis, whole chunks), chosen
# from `python benchmarks/pipeline.py --only blocks` (benchmarks/README): bigger blocks repeat less
# halo and the streamed network runs as fast per voxel at any size, so its block is as large as
# ~0.6 GB per single-thread worker allows: 256^3, 1.55 M output voxels/s per core (128^3: 1.28).
# Back-projection runs as fast or faster in 128^3 blocks (windowed: bp 10 2.13 M/s per core
# against 2.15 at 256^3, bp 2 45 against 19) at half the memory (bp 10: 0.52 against 1.06 GB).
DEFAULT_BLOCK = 128  # a user's integer block, and the default chunk
DEFAULT_CHUNK = 128
DEFAULT_PASS_BLOCK = {"net": 256, "bp": 128, "final": 128}
# A back-projection pass whose halo is no wider than the network's (2 iterations or fewer at x2)
# takes the network's block instead: its compute is negligible (bp 2, 128^3: 0.04 s), so what it
# costs is reading the staged float32 output, and 128^3 blocks read 78% extra against 34% at
# 256^3, in 8x as many tasks (bp 2 end to end 0.87 -> 0.95 of bp 0); at 256^3 it needs 0.58 GB in
# one thread against the network pass's 0.46-0.51, and a bp 2 tree peaks at 1.94-1.99 GB.
NARROW_BP_HALO = 8
# The smallest volume `fit` trains on: every spatial axis at least 5 voxels (the noise estimate's
# lag-2 second differences need 5; measured: 3 or 4 voxels on any axis failed with an IndexError
# inside numpy, 5 trained for x2, x4, x(2,1,1), x(4,2,2) and 2D x2/x4, clean and noisy).
MIN_TRAIN_EDGE = 5
# Blocks smaller than twice the halo on a split axis repeat more work than they do: `--block 2,2,2`
# planned 65,536 blocks at a halo overhead of 3.6 million percent and ran for hours. They are
# refused (unless ``force``) once the repeated work passes this many input voxels (a few
# core-minutes), so small test volumes may still be cut into many small blocks.
MAX_REPEATED_VOXELS = 2 ** 24


def _default_pass_block(kind: str, halo: tuple[int, ...]) -> int:
    if kind != "net" and max(halo, default=0) <= NARROW_BP_HALO:
        return DEFAULT_PASS_BLOCK["net"]
    return DEFAULT_PASS_BLOCK[kind]


# --------------------------------------------------------------------------- helpers


def _same_or_nested(a: str, b: str) -> bool:
    """True when two local paths are the same store or one lies inside the other."""
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/") or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    return ra == rb or ra.startswith(rb + os.sep) or rb.startswith(ra + os.sep)


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


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


def _check_training_args(steps: int | None, budget: int) -> None:
    """Before any data is read: a budget of 0 voxels never stopped shrinking the training box."""
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
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
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
        raise ValueError(f"--dtype {dtype or dt.name}: the output needs an integer or floating-point type, not {dt.name}")
    return dt.name


def _check_nonfinite(mode: str) -> None:
    from .execute import NONFINITE

    if mode not in NONFINITE:
        raise ValueError(f"--nonfinite {mode}: use one of {', '.join(NONFINITE)}")


def _check_coarse_finite(image: Image, input: str, max_voxels: int = 2 ** 24) -> None:
    """NaN/Inf in a float input, found on its coarsest level (a mean pyramid carries them up)
    before anything is written; the blocks check every voxel they read as well."""
    if np.dtype(image.dtype).kind != "f":
        return
    level = image.nlevels - 1
    arr = image.level(level)
    if math.prod(arr.shape) > max_voxels:
        return
    n = int(np.count_nonzero(~np.isfinite(np.asarray(arr[...]))))
    if n:
        raise NgffError(f"{input}: {n:,} NaN/Inf voxels on level {level} of {math.prod(arr.shape):,}: a network "
                        f"spreads them over the output; pass --nonfinite fill to read them as the fill value")


def _output_options(input: str, output: str, storage_options: dict | None, output_storage_options: dict | None):
    """The output's fsspec options: its own, else the input's when both live on the same kind of
    remote store (issue 11: an S3 output did not inherit --storage-options)."""
    if output_storage_options is not None:
        return output_storage_options
    proto = lambda u: u.split("://", 1)[0] if "://" in u and not u.startswith("file://") else None  # noqa: E731
    return storage_options if proto(output) is not None and proto(output) == proto(input) else None


def _check_reachable(url: str, options: dict | None, what: str) -> None:
    """A remote store that cannot be reached fails here, as one line, before any training or write
    (a wrong endpoint was a 136-line botocore traceback after 24 s of training)."""
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
        raise NgffError(f"cannot reach the {what} store {url}: {cause} (check --{'output-' if what == 'output' else ''}"
                        f"storage-options)") from None


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


def training_region(image: Image, outer: dict[int, int], budget: int = DEFAULT_TRAIN_VOXELS,
                    coarse_voxels: int = 2_000_000) -> tuple[tuple[slice, ...], int]:
    """Where to train: a level-0 box of at most ``budget`` voxels centred on the most signal,
    found on a coarse pyramid level so the whole volume is never read. Returns (box, level used)."""
    spatial = image.spatial_axes
    shape0 = [image.shape[a] for a in spatial]
    level = image.nlevels - 1
    for i in range(image.nlevels):
        if math.prod(image.level(i).shape[a] for a in spatial) <= coarse_voxels:
            level = i
            break
    arr = image.level(level)
    sel = tuple(outer.get(i, slice(None)) for i in range(image.ndim))
    coarse = np.nan_to_num(np.asarray(arr[sel], dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    ratio = [s0 / max(1, sc) for s0, sc in zip(shape0, coarse.shape)]
    size = _box_size(tuple(shape0), budget)
    box_c = [max(1, int(round(s / r))) for s, r in zip(size, ratio)]
    lo, hi = np.percentile(coarse, [1.0, 99.9])
    score = ((coarse - lo) / max(hi - lo, 1e-12) > 0.2).astype(np.float32)
    if score.any():
        dens = ndimage.uniform_filter(score, size=box_c, mode="constant")
        centre = np.unravel_index(int(np.argmax(dens)), dens.shape)
    else:
        centre = tuple(n // 2 for n in coarse.shape)
    box = []
    for c, r, s, n in zip(centre, ratio, size, shape0):
        start = int(np.clip(round((c + 0.5) * r - s / 2), 0, n - s))
        box.append(slice(start, start + s))
    return tuple(box), level


def train(input: str | os.PathLike, factor, steps: int | None = None, channel: int = 0, time_index: int = 0,
          seed: int = 0, budget: int = DEFAULT_TRAIN_VOXELS, storage_options: dict | None = None,
          quiet: bool = False, psf_fwhm=None, acquisition: str = "auto", nonfinite: str = "error") -> Model:
    """Train a model on a sampled region of an OME-Zarr image (one channel, one time point).
    ``nonfinite``: NaN/Inf in the sample stop training, naming how many ("error"), or are replaced
    by the array's fill value ("fill")."""
    _check_training_args(steps, budget)
    _check_nonfinite(nonfinite)
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
    sel = [outer.get(i, slice(None)) for i in range(image.ndim)]
    for ax, s in zip(spatial, box):
        sel[ax] = s
    sample = np.asarray(image.level(0)[tuple(sel)])
    sample = _finite_sample(sample, image, input, box, nonfinite, quiet)
    if not quiet:
        print(f"training on level-0 region {[(s.start, s.stop) for s in box]} ({sample.size:,} voxels, "
              f"found on level {level}), channel {channel}", flush=True)
    model = fit(sample, factor=parse_factors(factor, len(spatial)), steps=steps, seed=seed, quiet=quiet, psf_fwhm=psf_fwhm,
                acquisition=acquisition)
    model.info["source"] = {"url": str(input), "channel": channel, "time": time_index,
                            "region": [[s.start, s.stop] for s in box], "coarse_level": level}
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
        raise NgffError(f"{input}: the training region [{region}] holds {n:,} NaN/Inf voxels of {sample.size:,}: "
                        f"svision-big cannot train on them; pass --nonfinite fill to read them as the fill value")
    from .execute import _fill

    sample = np.where(bad, _fill(image.level(0)), sample)
    if not quiet:
        print(f"training: {n:,} NaN/Inf voxels in the training region read as the fill value", flush=True)
    return sample


def _check_trainable(image: Image, budget: int, input: str) -> None:
    """Refuse, naming the minimum, a volume (or a budget's box) too small to train on: a 3x5x5
    volume was an IndexError inside numpy after reading the data."""
    shape = tuple(image.shape[a] for a in image.spatial_axes)
    if min(shape) < MIN_TRAIN_EDGE:
        raise NgffError(f"{input}: a volume of {'x'.join(map(str, shape))} voxels is too small to train on: "
                        f"every spatial axis needs at least {MIN_TRAIN_EDGE} voxels")
    box = _box_size(shape, budget)
    if min(box) < MIN_TRAIN_EDGE:
        need = budget
        while min(_box_size(shape, need)) < MIN_TRAIN_EDGE:
            need *= 2
        raise ValueError(f"--budget {budget}: a training box of {'x'.join(map(str, box))} voxels is too small "
                         f"(every axis needs at least {MIN_TRAIN_EDGE}): use a budget of at least {need}")


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
    block: tuple[int, ...] | None = None
    dtype: str | None = None
    ngff: str | None = None
    shards: bool = False
    compression: bool = True
    channel: int | None = None  # None = every channel


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _open_cluster(client, workers: int | None, scheduler: str | None):
    """(client, things to close). No flag: a LocalCluster of one single-threaded worker per core."""
    if client is not None:
        return client, []
    if scheduler == "sync":
        return None, []
    from distributed import Client, LocalCluster

    if scheduler:
        c = Client(scheduler)
        return c, [c]
    import dask

    n = workers or os.cpu_count() or 1
    # distributed's nanny sets MALLOC_TRIM_THRESHOLD_=65536, which makes every tensor over 128 KiB a
    # fresh mmap: measured 1.53x slower end to end (benchmarks/README, bottleneck 2); drop it
    env = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
           if k != "MALLOC_TRIM_THRESHOLD_"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
    c = Client(cluster)
    return c, [c, cluster]


def _default_device() -> str:
    """What workers pick without ``device`` (execute._device), as seen from the client."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def enhance(input: str | os.PathLike, output: str | os.PathLike, model, *, client=None, workers: int | None = None,
            scheduler: str | None = None, block: tuple[int, ...] | int | None = None, dtype: str | None = None,
            ngff: str | None = None, overwrite: bool = False, shards: bool = False, compression: bool = True,
            channel: int | None = None, storage_options: dict | None = None,
            output_storage_options: dict | None = None, progress: bool = True, device: str | None = None,
            precision: str = "float32", on_block=None, force: bool = False, break_lock: bool = False,
            nonfinite: str = "error", strict: bool = False, provenance_extra: dict | None = None) -> dict:
    """Enhance an OME-Zarr image into a new, upsampled, multiscale OME-Zarr image.

    ``model``: a Model, a model path, or a list of them (one per channel). ``scheduler``: a Dask
    scheduler address, or "sync" to run in this process; otherwise a local cluster of ``workers``.
    ``precision``: the networks' arithmetic, "float32" (the reference) or "bfloat16" (faster on CPUs
    with AVX512-BF16; see ``operator.precision_dtype``). ``force``: run blocks too small for their
    halo. ``break_lock``: take the output's lock even from a live run or another host. ``nonfinite``:
    NaN/Inf in a float input stop the run ("error") or read as the fill value ("fill", counted in
    the provenance). ``strict``: a missing input chunk stops the run (else: counted, warned about).
    The output is locked (``state.OutputLock``) from before its first write to the end.
    """
    input, output = os.fspath(input), os.fspath(output)
    _check_workers(workers)
    _check_nonfinite(nonfinite)
    output_storage_options = _output_options(input, output, storage_options, output_storage_options)
    if client is None and scheduler in (None, "sync"):
        _check_device(device)  # a remote cluster's workers are asked once it is open
    precision_dtype(precision, device or _default_device())  # a bad name fails before anything is opened
    if _same_or_nested(input, output):
        raise NgffError(f"the output {output} must not be the input or lie inside it (or contain it)")
    image = open_image(input, storage_options)
    spatial = image.spatial_axes
    models = [_as_model(m) for m in (model if isinstance(model, (list, tuple)) else [model])]
    factors = models[0].factors
    if any(m.factors != factors for m in models):
        raise ValueError("all per-channel models must share the same factors")
    if len(spatial) != len(factors):
        raise NgffError(f"the model is {len(factors)}D but {input} has {len(spatial)} spatial axes")
    cax = _channel_axis(image)
    if channel not in (None, 0) and cax is None:
        raise NgffError(f"--channel {channel}: {input} has no channel axis")
    outer_axes = _outer_axes(image)
    outer_shape, offsets = [], []
    for ax in outer_axes:
        if ax == cax and channel is not None:
            if not 0 <= channel < image.shape[ax]:
                raise NgffError(f"channel {channel} is out of range: the image has {image.shape[ax]}")
            outer_shape.append(1)
            offsets.append(channel)
        else:
            outer_shape.append(image.shape[ax])
            offsets.append(0)
    n_channels = image.shape[cax] if cax is not None and channel is None else 1
    if len(models) not in (1, n_channels):
        raise ValueError(f"{len(models)} models for {n_channels} channels: give one, or one per channel")
    in_shape = tuple(image.shape[a] for a in spatial)
    out_spatial = tuple(n * f for n, f in zip(in_shape, factors))
    given = block
    specs = [m.spec() for m in models]
    passes = plan_passes(specs)
    if block is None:  # chunks for viewers; blocks (whole chunks) as large as the measurements say pays
        chunk_block = default_block(out_spatial, factors, DEFAULT_CHUNK)
        last_halo = tuple(max(h) for h in zip(*(pass_halo(s, passes[-1]) for s in specs)))
        block = _whole_chunks(default_block(out_spatial, factors, _default_pass_block(passes[-1].kind, last_halo)),
                              chunk_block, out_spatial)
    else:
        _check_block(block, len(spatial))
        if not isinstance(block, (int, np.integer)) and len(block) == 1:
            block = block[0]  # one size for every axis, as ``--block 128``
        if isinstance(block, (int, np.integer)):
            block = default_block(out_spatial, factors, int(block))
        block = tuple(int(b) for b in block)
        chunk_block = block
    plans = _pass_plans(passes, specs, in_shape, block, tuple(outer_shape), given is None)
    plan = plans[-1]
    if given is not None and not force:
        _check_block_halo(plans, block, out_spatial, factors, math.prod(outer_shape))
    fmt = format_for(ngff or image.fmt.version)
    out_dtype = _output_dtype(dtype, image.dtype)
    if shards and fmt.zarr_format == 2:
        raise NgffError("sharding needs NGFF 0.5 (zarr v3)")
    if nonfinite == "error":
        _check_coarse_finite(image, input)  # most NaN/Inf inputs fail here, before anything is written
    _check_reachable(output, output_storage_options, "output")

    def full_shape(spatial_shape):
        shape = list(image.shape)
        for ax, n in zip(spatial, spatial_shape):
            shape[ax] = n
        for ax, n in zip(outer_axes, outer_shape):
            shape[ax] = n
        return tuple(shape)

    def full_chunks(blk):
        chunks = [1] * image.ndim
        for ax, b in zip(spatial, blk):
            chunks[ax] = b
        return chunks

    out_shape = list(full_shape(out_spatial))
    chunks = full_chunks(chunk_block)
    shard_shape = None
    if shards:
        shard_shape = tuple(chunks)
        chunks = [c if ax not in spatial else _inner_chunk(c) for ax, c in enumerate(chunks)]

    model_hashes = tuple(m.hash for m in models)
    fp = _fingerprint({
        "models": model_hashes, "input": os.path.abspath(input) if "://" not in input else input,
        "input_shape": list(image.shape), "input_dtype": str(image.dtype), "input_path": image.paths[0],
        "block": list(block), "passes": [[p.kind, p.stage, list(pl.block), list(pl.halo)] for p, pl in zip(passes, plans)],
        "dtype": out_dtype, "ngff": fmt.version, "channel": channel,
        "chunks": list(chunks), "shards": shard_shape, "compression": compression,
        **({"precision": precision} if precision != "float32" else {}),  # float32 keeps older fingerprints
        **({"nonfinite": nonfinite} if nonfinite != "error" else {}),  # so does reading NaN as an error
    })
    provenance = {
        "package": "svision-big", "version": __version__, "fingerprint": fp, "model_hash": list(model_hashes),
        "factors": list(factors), "halo": list(plan.halo), "block": list(block),
        "input": os.path.abspath(input) if "://" not in input else input,
        "passes": [{"kind": p.kind, "stage": p.stage, "block": list(pl.block), "halo": list(pl.halo)}
                   for p, pl in zip(passes, plans)],
        "normalisation": [{"lo": m.norm.lo, "hi": m.norm.hi, "floor": m.norm.floor} for m in models],
        "settings": [m.settings() for m in models], "channel": channel, "dtype": out_dtype,
        "precision": precision, "nonfinite": nonfinite, "strict": strict,
    }

    lock = OutputLock(_join(output, STATE_DIR, LOCK_NAME), output_storage_options, break_lock, what=output)
    if _checked(lambda: _output_verdict(output, output_storage_options, fp, overwrite), lock) == "resume" and \
            _state_of(output, output_storage_options) == "complete" and \
            not _leftover_state(output, output_storage_options):  # reads only: no lock, no cluster
        return {"output": output, "state": "already complete", "fingerprint": fp, "blocks": len(plan), "computed": 0}
    cl, owned = _open_cluster(client, workers, scheduler)  # a wrong --scheduler fails before any write
    held = None
    try:
        if cl is not None and client is None and scheduler not in (None, "sync"):
            _check_device(device, cl)  # the workers of a cluster given by address
        held = lock.acquire()  # before the output's first write, until its last
        verdict = _output_verdict(output, output_storage_options, fp, overwrite)  # again: under the lock
        if verdict in ("replace", "restart"):
            _clear_output(output, output_storage_options)
        resuming = verdict == "resume"
        work = f"{STATE_DIR}/work-{fp}"
        paths = [f"{work}/p{k}" for k in range(len(passes) - 1)] + ["0"]
        scratch = [(paths[k], full_shape(pl.out_shape), *_scratch_layout(pl.block, block)) for k, pl in enumerate(plans[:-1])]

        def level0(group):
            fmt.create_array(group, "0", tuple(out_shape), tuple(chunks), out_dtype, _axis_names(image),
                             shards=shard_shape, compression=compression)

        if resuming:
            group = open_output_group(output, fmt, output_storage_options, mode="a")
            if group.attrs.get("svision_big", {}).get("state") == "complete":
                _clean_state(output, output_storage_options, keep=("models-",))
                return {"output": output, "state": "already complete", "fingerprint": fp, "blocks": len(plan),
                        "computed": 0}
            _ensure_arrays(output, output_storage_options, group, scratch, full_chunks, level0)
        else:
            group = _set_up(output, output_storage_options, fmt, fp, {**provenance, **(provenance_extra or {})},
                            scratch, full_chunks, level0)
        base = dict(in_url=input, in_path=image.paths[0], out_url=output, spatial_axes=tuple(spatial),
                    outer_axes=tuple(outer_axes), outer_offsets=tuple(offsets), models=model_hashes,
                    model_axis=outer_axes.index(cax) if (cax is not None and len(models) > 1) else None,
                    out_dtype=out_dtype, in_options=storage_options, out_options=output_storage_options, device=device,
                    precision=precision, nonfinite=nonfinite, strict=strict)
        jobs = []
        for k, (p, pl) in enumerate(zip(passes, plans)):
            from_image = p.ref < 0
            jobs.append(Job(**{**base, "in_url": input if from_image else output,
                               "in_path": image.paths[0] if from_image else paths[p.ref]},
                            out_path=paths[k], plan=pl, done_url=_join(output, STATE_DIR, f"done-{fp}", f"p{k}"),
                            step=p, in_raw=from_image, out_raw=k == len(passes) - 1,
                            companion_path=paths[k - 1] if p.companion else None))
        if progress:
            print(f"enhance: factors {factors}, {'resuming' if resuming else 'new output'} {output}; "
                  f"{len(passes)} pass(es):", flush=True)
            for p, pl in zip(passes, plans):
                print(f"  {p.label}: {len(pl)} blocks of {pl.block} output voxels, halo {pl.halo} input voxels "
                      f"(halo overhead {pl.overhead():.0%})", flush=True)
        stats: dict = {"passes": []}
        for k, (p, job) in enumerate(zip(passes, jobs)):
            s = execute(job, {m.hash: m for m in models}, client=cl, progress=progress,
                        on_block=on_block if k == len(passes) - 1 else None,
                        label=f"pass {k + 1}/{len(passes)} {p.label}")
            stats["passes"].append({"kind": p.kind, "stage": p.stage, **s})
            for j in range(k + 1):  # intermediates no remaining pass reads
                if j < len(passes) - 1 and not any(q.ref == j or (q.companion and i - 1 == j)
                                                   for i, q in enumerate(passes) if i > k):
                    _remove_intermediate(output, output_storage_options, paths[j])
        last = stats["passes"][-1]
        total_s = sum(q["seconds"] for q in stats["passes"])
        stats.update({k: last[k] for k in ("blocks", "skipped", "computed", "todo_at_start", "output_voxels")})
        # the level-0 pass above (the API's meaning); every pass here: a resume skips earlier passes too
        stats["total"] = {k: sum(q[k] for q in stats["passes"]) for k in ("blocks", "skipped", "computed")}
        notes = _run_notes(stats["passes"])
        if notes.get("input_missing_chunks"):
            print(f"svision-big: warning: {notes['input_missing_chunks']} chunks of {input} are missing and were read "
                  f"as the fill value (e.g. {', '.join(notes['input_missing_examples'])}); --strict makes this an error",
                  file=sys.stderr, flush=True)
        stats.update({k: notes[k] for k in ("input_nonfinite", "input_missing_chunks") if k in notes})
        stats["seconds"] = round(total_s, 3)
        stats["voxels_per_second"] = last["output_voxels"] / total_s if total_s > 0 else 0.0
        t0 = time.perf_counter()
        group.attrs["svision_big"] = {**provenance, **(provenance_extra or {}), **notes, "state": "building pyramid"}
        levels = _finish(group, fmt, image, out_shape, factors, tuple(chunks), shard_shape, out_dtype, compression, cl,
                         [m.norm for m in models], channel)
        stats["pyramid_seconds"] = round(time.perf_counter() - t0, 3)
        _remove_intermediate(output, output_storage_options, work)
        group.attrs["svision_big"] = {**provenance, **(provenance_extra or {}), **notes, "state": "complete",
                                      "levels": levels}
        _clean_state(output, output_storage_options, keep=("models-",))  # `run` keeps its models in the output itself
        stats.update(output=output, fingerprint=fp, halo=list(plan.halo), block=list(block), levels=levels)
        return stats
    finally:
        for o in owned:
            try:
                o.close()
            except Exception:  # noqa: BLE001 - a cluster whose scheduler is gone cannot be closed cleanly
                pass
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


def _after_setup_step(step: str) -> None:
    """Called after each step of setting up a new output. Nothing happens here: tests replace it to
    kill a run at each step and check the re-run completes (issue 14: a run killed after the
    provenance, before the arrays, never resumed)."""


SETUP_MARKER = "setup"  # svision_state/setup: written first, so a half set-up output is known as ours


def _set_up(output: str, options: dict | None, fmt, fp: str, provenance: dict, scratch, full_chunks, level0):
    """Create a new output: marker, group, scratch arrays, level 0, then the provenance (last).
    Killed before the provenance, the output holds only svision-big files and the marker, and the
    next run starts its setup again (``_output_verdict``: "restart"); killed after it, every array
    exists and the run resumes."""
    import fsspec.core

    fs, marker = fsspec.core.url_to_fs(_join(output, STATE_DIR, SETUP_MARKER), **(options or {}))
    fs.makedirs(marker.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(marker, fp.encode())
    _after_setup_step("marker")
    group = open_output_group(output, fmt, options, mode="a")
    _after_setup_step("group")
    for path, shape, inner, shard in scratch:
        _create_intermediate(output, options, path, shape, full_chunks(inner), None if shard is None else full_chunks(shard))
        _after_setup_step(f"scratch {path.rsplit('/', 1)[-1]}")
    level0(group)
    _after_setup_step("level 0")
    group.attrs["svision_big"] = {**provenance, "state": "writing level 0"}
    _after_setup_step("provenance")
    return group


def _ensure_arrays(output: str, options: dict | None, group, scratch, full_chunks, level0) -> None:
    """On resume, create any array the output lacks (an output set up by an older version, killed
    between its provenance and its arrays, failed every re-run with ArrayNotFoundError). An
    existing array is never re-created: its chunks are the work already done."""
    import zarr

    for path, shape, inner, shard in scratch:
        try:
            zarr.open_array(_make_store(_join(output, path), options, read_only=True), mode="r")
        except Exception:
            _create_intermediate(output, options, path, shape, full_chunks(inner),
                                 None if shard is None else full_chunks(shard))
    try:
        zarr.open_array(_make_store(output, options, read_only=True), path="0", mode="r")
    except Exception:
        level0(group)


def _state_entries(output: str, options: dict | None) -> list[str]:
    """Names in the output's state folder, the lock left out."""
    import fsspec.core

    fs, root = fsspec.core.url_to_fs(_join(output, STATE_DIR), **(options or {}))
    try:
        fs.invalidate_cache(root)
        return [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False)
                if n.rstrip("/").rsplit("/", 1)[-1] != LOCK_NAME]
    except FileNotFoundError:
        return []


def _leftover_state(output: str, options: dict | None) -> bool:
    """True when a complete output still holds run state (a run killed while cleaning up)."""
    return bool(_state_entries(output, options))


def _clean_state(output: str, options: dict | None, keep: tuple[str, ...] = ()) -> None:
    """Remove the done-records, scratch arrays and setup marker of a complete output (issue 11: they
    were 65 of 106 objects of a 32-block S3 run), keeping the lock (released by its owner) and the
    entries named in ``keep``; the folder goes once it is empty."""
    import fsspec.core

    fs, root = fsspec.core.url_to_fs(_join(output, STATE_DIR), **(options or {}))
    for name in _state_entries(output, options):
        if name not in keep and not any(name.startswith(k) for k in keep):
            fs.rm(f"{root.rstrip('/')}/{name}", recursive=True)
    fs.invalidate_cache(root)


def _whole_chunks(block: tuple[int, ...], chunk: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Round a block down to whole chunks per axis (one writer per chunk), unless it spans the axis."""
    return tuple(b if b >= n else max(c, b - b % c) for b, c, n in zip(block, chunk, shape))


def _pass_plans(passes, specs, in_shape, block, outer_shape, defaults: bool = True) -> list[BlockPlan]:
    """One plan per pass, on that pass's low-res input; the last pass writes the output in ``block``s,
    earlier passes use their kind's default block (``defaults``) or the same block size."""
    shapes: list[tuple[int, ...]] = []
    plans = []
    for k, p in enumerate(passes):
        ref = in_shape if p.ref < 0 else shapes[p.ref]
        out = tuple(n * f for n, f in zip(ref, p.factors))
        shapes.append(out)
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
    and halo: with whole-block 256^3 chunks an interior block + 14-voxel halo decoded 27 chunks
    (20x the voxels it needed); reading 284^3 from 256^3 float32 chunks took 0.72 s, from 64^3
    inner chunks of 256^3 shards 0.13 s (one thread, local disk). Blocks without such a divisor
    fall back to plain chunks no bigger than either block (one writer per chunk)."""
    inner = tuple(_inner_chunk(b) for b in writer)
    if all(c >= min(MIN_SCRATCH_INNER, b) for c, b in zip(inner, writer)):
        return inner, tuple(writer)
    return tuple(math.gcd(a, b) for a, b in zip(writer, last)), None


def _create_intermediate(url: str, options: dict | None, path: str, shape, chunks, shards=None) -> None:
    """A float32 scratch array (zarr v3, uncompressed: written once and read once) in the output's state folder."""
    import zarr

    # a store rooted at the array itself: no group metadata lands in the output (a v2 image stays pure v2)
    zarr.create_array(_make_store(_join(url, path), options, read_only=False), shape=tuple(shape), chunks=tuple(chunks),
                      shards=None if shards is None else tuple(shards), dtype="float32", fill_value=0.0,
                      compressors=None, overwrite=True, zarr_format=3)


def _remove_intermediate(url: str, options: dict | None, path: str) -> None:
    import fsspec.core

    fs, root = fsspec.core.url_to_fs(_join(url, path), **(options or {}))
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _inner_chunk(b: int) -> int:
    """Inner chunk of a shard: the largest divisor of the block at most 64 voxels."""
    for c in range(min(64, b), 0, -1):
        if b % c == 0:
            return c
    return b


# What an svision-big output consists of (paths relative to the output): the image group, its
# pyramid levels and their chunks, and the state folder. `--overwrite` deletes only these; any other
# file (a thesis.docx beside zarr.json) makes it refuse, and delete nothing.
_OUR_FILES = re.compile(r"""(?x)^(?:
    zarr\.json | \.zgroup | \.zattrs                                             # the image group
  | \d+/(?:zarr\.json | \.zarray | \.zattrs | c | (?:c[/.])?\d+(?:[/.]\d+)*)      # levels and their chunks
  | svision_state/(?:
        lock(?:\.[0-9a-f]+)?                                  # the lock (and a killed run's private copy)
      | setup                                                 # the setup marker
      | done-[0-9a-f]+/p\d+/\d+(?:\.json)?                    # done-records (and their notes)
      | work-[0-9a-f]+/p\d+/(?:zarr\.json | c(?:/\d+)*)        # staged pass outputs
      | models-[0-9a-f]+/c\d+\.svb                            # models `run` trained for this output
    )
  | svision_model(?:_c\d+)?\.svb                             # ... and where they stay once it is complete
)$""")


def _our_file(rel: str) -> bool:
    return bool(_OUR_FILES.match(rel))


def _state_of(output: str, options: dict | None) -> str | None:
    """The ``state`` an svision-big output records (None when there is none)."""
    try:
        import zarr

        prev = zarr.open_group(_make_store(output, options, read_only=True), mode="r").attrs.get("svision_big")
    except Exception:
        return None
    return prev.get("state") if isinstance(prev, dict) else None


def _output_verdict(output: str, options: dict | None, fp: str, overwrite: bool) -> str:
    """"new", "resume" (same fingerprint) or "replace" (``overwrite``, and it holds nothing but an
    svision-big output); refuses anything else. Reads only: nothing is written or deleted here."""
    if not store_exists(output, options):
        return "new"
    prev = None
    try:
        import zarr

        prev = zarr.open_group(_make_store(output, options, read_only=True), mode="r").attrs.get("svision_big")
    except Exception:
        prev = None
    if isinstance(prev, dict) and prev.get("fingerprint") == fp:
        return "resume"
    if prev is None and _only_state(output, options):
        return "new"  # holds nothing but svision-big state: a lock, models that `run` saved for this output
    if prev is None and SETUP_MARKER in _state_entries(output, options) and \
            foreign_file(output, options, allowed=_our_file) is None:
        return "restart"  # a run killed while setting it up: no block was computed yet, start the setup again
    if not overwrite:
        why = (f"was made with other settings (fingerprint {prev.get('fingerprint')}, now {fp})"
               if isinstance(prev, dict) else "is not an svision-big output")
        raise NgffError(f"{output} already exists and {why}: pass --overwrite to replace it")
    import fsspec.core

    fs, root = fsspec.core.url_to_fs(output, **(options or {}))
    if not fs.isdir(root):
        raise NgffError(f"{output} exists and is not a folder: refusing to replace it")
    stray = foreign_file(output, options, allowed=_our_file)
    if stray is not None:
        raise NgffError(f"{output} holds {stray}, which is not part of an svision-big output: refusing to "
                        f"delete anything (move it elsewhere, or choose another output)")
    return "replace"


def _checked(verdict, lock: OutputLock) -> str:
    """Run a read-only output check; when it refuses while another run holds the lock (say, that
    run is half-way through creating the output), report the lock, the real cause."""
    try:
        return verdict()
    except NgffError:
        owner = lock.owner()
        if owner is not None:
            raise lock._refusal(owner) from None
        raise


def _clear_output(output: str, options: dict | None) -> None:
    """Delete an svision-big output's contents, keeping its lock (held by this run) and the models
    `run` trained for it (keyed by their settings). ``_output_verdict`` has checked that nothing
    else is in it."""
    import fsspec.core

    fs, root = fsspec.core.url_to_fs(output, **(options or {}))
    root = root.rstrip("/")
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name != STATE_DIR:
            fs.rm(entry, recursive=True)
            continue
        for inner in fs.ls(entry, detail=False):
            base = inner.rstrip("/").rsplit("/", 1)[-1]
            if base != LOCK_NAME and not base.startswith("models-"):
                fs.rm(inner, recursive=True)
    fs.invalidate_cache(root)


def _only_state(output: str, options: dict | None) -> bool:
    import fsspec.core

    fs, root = fsspec.core.url_to_fs(output, **(options or {}))
    try:
        names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return True
    return set(names) <= {STATE_DIR}


def _check_block_halo(plans: list[BlockPlan], block: tuple[int, ...], out_spatial: tuple[int, ...],
                      factors: tuple[int, ...], n_outer: int) -> None:
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
        f"use at least --block {','.join(map(str, suggest))}, leave --block out for the default, or pass --force")


def _axis_names(image: Image) -> list[str]:
    """The spec's lower-case axis names (iohub's "T C Z Y X" made outputs ngff-zarr rejects)."""
    return [n.lower() for n in image.axis_names]


def _finish(group, fmt, image: Image, out_shape, factors, chunks, shards, dtype, compression, client, norms,
            channel: int | None = None) -> list[str]:
    """Pyramid from the stored level 0, then the OME metadata (last), with a display window
    for viewers taken from the coarsest level written."""
    spatial = image.spatial_axes
    coarsest = image.level(image.nlevels - 1).shape
    pf = pyramid_factors(tuple(out_shape), spatial, min_shape=64, until_shape=tuple(coarsest))
    paths = build_pyramid(group, fmt, _axis_names(image), "0", spatial, pf, chunks, dtype, client=client,
                          shards=shards, compression=compression)
    full = [1] * image.ndim
    for ax, f in zip(spatial, factors):
        full[ax] = f
    s0, t0 = upsampled_transform(image.scales[0], image.translations[0], full)
    datasets = pyramid_datasets(s0, t0, spatial, pf, paths)
    ome = multiscales_metadata(image.axes, datasets, name=image.name, version=fmt.version,
                               extra={"type": "mean", "metadata": {"method": "svision_big enhance, block-mean pyramid",
                                                                   "version": __version__}})
    ome = viewer_metadata(ome, image, group[paths[-1] if paths else "0"], fmt.version, factors, channel)
    fmt.write_ome_attrs(group, ome)
    return ["0", *paths]


# --------------------------------------------------------------------------- run = train + enhance


def run(input: str | os.PathLike, output: str | os.PathLike, factor, *, steps: int | None = None, seed: int = 0,
        channel: int | None = None, budget: int = DEFAULT_TRAIN_VOXELS, storage_options: dict | None = None,
        output_storage_options: dict | None = None, quiet: bool = False, overwrite: bool = False,
        acquisition: str = "auto", psf_fwhm=None, **kwargs) -> dict:
    """Train one model per channel on sampled regions, then enhance. Trained models are kept in the
    output's state folder, so re-running after a crash reuses them instead of training again."""
    input, output = os.fspath(input), os.fspath(output)
    # every check that needs no model runs before training (minutes) and before any write
    _check_workers(kwargs.get("workers"))
    _check_training_args(steps, budget)
    _check_nonfinite(kwargs.get("nonfinite", "error"))
    output_storage_options = _output_options(os.fspath(input), os.fspath(output), storage_options,
                                             output_storage_options)
    if kwargs.get("client") is None and kwargs.get("scheduler") in (None, "sync"):
        _check_device(kwargs.get("device"))
    precision_dtype(kwargs.get("precision", "float32"), kwargs.get("device") or _default_device())
    if _same_or_nested(input, output):
        raise NgffError(f"the output {output} must not be the input or lie inside it (or contain it)")
    image = open_image(input, storage_options)
    spatial = image.spatial_axes
    if len(spatial) not in (2, 3):
        raise NgffError(f"{input}: needs 2 or 3 spatial axes, found {len(spatial)}")
    parse_factors(factor, len(spatial))
    cax = _channel_axis(image)
    if channel not in (None, 0) and cax is None:
        raise NgffError(f"--channel {channel}: {input} has no channel axis")
    if cax is not None and channel is not None and not 0 <= channel < image.shape[cax]:
        raise NgffError(f"channel {channel} is out of range: the image has {image.shape[cax]}")
    _check_trainable(image, budget, input)
    _check_block(kwargs.get("block"), len(spatial))
    _output_dtype(kwargs.get("dtype"), image.dtype)
    if kwargs.get("ngff") is not None:
        format_for(kwargs["ngff"])
    _check_reachable(output, output_storage_options, "output")  # before training (minutes), not after
    channels = [channel] if channel is not None else (list(range(image.shape[cax])) if cax is not None else [0])
    key = _fingerprint({"input": input, "factor": str(factor), "steps": steps, "seed": seed, "budget": budget,
                        "shape": list(image.shape), "version": __version__, "acquisition": acquisition,
                        "psf_fwhm": None if psf_fwhm is None else list(np.atleast_1d(psf_fwhm))})
    import fsspec.core

    fs, root = fsspec.core.url_to_fs(_join(output, STATE_DIR, f"models-{key}"), **(output_storage_options or {}))
    kept = {c: MODEL_FILE if len(channels) == 1 else f"svision_model_c{c}.svb" for c in channels}
    lock = OutputLock(_join(output, STATE_DIR, LOCK_NAME), output_storage_options, kwargs.get("break_lock", False),
                      what=output)
    prev = _provenance_of(output, output_storage_options)
    if prev.get("run_key") == key and prev.get("state") == "complete":  # this run finished earlier
        if _leftover_state(output, output_storage_options):
            with lock:
                _keep_models(fs, root, output, output_storage_options, kept)
                _clean_state(output, output_storage_options, keep=("models-",) if KEEP_STATE_MODELS else ())
        return {"output": output, "state": "already complete", "fingerprint": prev.get("fingerprint"),
                "computed": 0, "models": [_join(output, n) for n in kept.values()]}
    fresh = store_exists(output, output_storage_options) and not fs.exists(root)  # not an earlier run of this one
    if fresh:
        _checked(lambda: _output_verdict(output, output_storage_options, "-", overwrite), lock)  # refuses unless --overwrite
    held = lock.acquire()  # training writes models into the output: the lock covers it, and enhance re-enters it
    try:
        if fresh:
            if _output_verdict(output, output_storage_options, "-", overwrite) == "replace":
                _clear_output(output, output_storage_options)
            overwrite = False
        models = []
        for c in channels:
            path = f"{root}/c{c}.svb"
            if fs.exists(path):
                models.append(Model.from_bytes(fs.cat_file(path), where=path))
                if not quiet:
                    print(f"channel {c}: reusing the model trained earlier ({path})", flush=True)
                continue
            m = train(input, factor, steps=steps, channel=c, seed=seed, budget=budget,
                      storage_options=storage_options, quiet=quiet, acquisition=acquisition, psf_fwhm=psf_fwhm,
                      nonfinite=kwargs.get("nonfinite", "error"))
            fs.makedirs(root, exist_ok=True)
            fs.pipe_file(path, m.to_bytes())
            models.append(m)
        stats = enhance(input, output, models if len(models) > 1 else models[0], channel=channel,
                        storage_options=storage_options, output_storage_options=output_storage_options,
                        progress=not quiet, overwrite=overwrite,
                        provenance_extra={"run_key": key, "model_files": sorted(kept.values())}, **kwargs)
        _keep_models(fs, root, output, output_storage_options, kept)
        _clean_state(output, output_storage_options, keep=("models-",) if KEEP_STATE_MODELS else ())
        stats["models"] = [_join(output, n) for n in kept.values()]
        return stats
    finally:
        held.release()


MODEL_FILE = "svision_model.svb"  # where `run` keeps the model it trained (per channel: svision_model_c<c>.svb)
# False: a finished output keeps its models only there (moved out of svision_state/models-<key>/,
# where `run` keeps them while it works so that a resumed run reuses them). True copies them.
KEEP_STATE_MODELS = False


def _keep_models(fs, root: str, output: str, options: dict | None, kept: dict[int, str]) -> None:
    """Move the models `run` trained from the state folder to their documented place in the output."""
    import fsspec.core

    out_root = fsspec.core.url_to_fs(output, **(options or {}))[1].rstrip("/")
    for c, name in kept.items():
        src = f"{root}/c{c}.svb"
        if fs.exists(src):
            (fs.copy if KEEP_STATE_MODELS else fs.mv)(src, f"{out_root}/{name}")


def _provenance_of(output: str, options: dict | None) -> dict:
    """The svision_big attributes of an output ({} when there are none or it cannot be read)."""
    try:
        import zarr

        prev = zarr.open_group(_make_store(output, options, read_only=True), mode="r").attrs.get("svision_big")
    except Exception:
        return {}
    return prev if isinstance(prev, dict) else {}
