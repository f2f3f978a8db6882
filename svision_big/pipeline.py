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
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import __version__
from .execute import Job, execute
from .model import Model, load_model
from .ngff import (Image, NgffError, _make_store, format_for, multiscales_metadata, open_image, open_output_group,
                   remove_store, store_exists, upsampled_transform)
from .operator import pass_halo, plan_passes, precision_dtype
from .plan import BlockPlan, default_block
from .pyramid import build_pyramid, pyramid_datasets, pyramid_factors
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
    return m if isinstance(m, Model) else load_model(m)


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
    coarse = np.asarray(arr[sel], dtype=np.float32)
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
          quiet: bool = False, psf_fwhm=None, acquisition: str = "auto") -> Model:
    """Train a model on a sampled region of an OME-Zarr image (one channel, one time point)."""
    image = open_image(input, storage_options)
    spatial = image.spatial_axes
    if len(spatial) not in (2, 3):
        raise NgffError(f"{input}: needs 2 or 3 spatial axes, found {len(spatial)}")
    outer = _outer_selection(image, channel, time_index)
    box, level = training_region(image, outer, budget)
    sel = [outer.get(i, slice(None)) for i in range(image.ndim)]
    for ax, s in zip(spatial, box):
        sel[ax] = s
    sample = np.asarray(image.level(0)[tuple(sel)])
    if not quiet:
        print(f"training on level-0 region {[(s.start, s.stop) for s in box]} ({sample.size:,} voxels, "
              f"found on level {level}), channel {channel}", flush=True)
    model = fit(sample, factor=parse_factors(factor, len(spatial)), steps=steps, seed=seed, quiet=quiet, psf_fwhm=psf_fwhm,
                acquisition=acquisition)
    model.info["source"] = {"url": str(input), "channel": channel, "time": time_index,
                            "region": [[s.start, s.stop] for s in box], "coarse_level": level}
    return model


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
            precision: str = "float32", on_block=None) -> dict:
    """Enhance an OME-Zarr image into a new, upsampled, multiscale OME-Zarr image.

    ``model``: a Model, a model path, or a list of them (one per channel). ``scheduler``: a Dask
    scheduler address, or "sync" to run in this process; otherwise a local cluster of ``workers``.
    ``precision``: the networks' arithmetic, "float32" (the reference) or "bfloat16" (faster on CPUs
    with AVX512-BF16; see ``operator.precision_dtype``).
    """
    input, output = os.fspath(input), os.fspath(output)
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
        if isinstance(block, int):
            block = default_block(out_spatial, factors, block)
        block = tuple(int(b) for b in block)
        chunk_block = block
    plans = _pass_plans(passes, specs, in_shape, block, tuple(outer_shape), given is None)
    plan = plans[-1]
    halos = [list(pl.halo) for pl in plans]
    fmt = format_for(ngff or image.fmt.version)
    out_dtype = np.dtype(dtype or image.dtype).name
    if shards and fmt.zarr_format == 2:
        raise NgffError("sharding needs NGFF 0.5 (zarr v3)")

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
    })
    provenance = {
        "package": "svision-big", "version": __version__, "fingerprint": fp, "model_hash": list(model_hashes),
        "factors": list(factors), "halo": list(plan.halo), "block": list(block), "input": input,
        "passes": [{"kind": p.kind, "stage": p.stage, "block": list(pl.block), "halo": list(pl.halo)}
                   for p, pl in zip(passes, plans)],
        "normalisation": [{"lo": m.norm.lo, "hi": m.norm.hi, "floor": m.norm.floor} for m in models],
        "settings": [m.settings() for m in models], "channel": channel, "dtype": out_dtype,
        "precision": precision,
    }

    resuming = _prepare_output(output, output_storage_options, fp, overwrite)
    group = open_output_group(output, fmt, output_storage_options, mode="a")
    if resuming and group.attrs.get("svision_big", {}).get("state") == "complete":
        return {"output": output, "state": "already complete", "fingerprint": fp, "blocks": len(plan), "computed": 0}
    work = f"{STATE_DIR}/work-{fp}"
    paths = [f"{work}/p{k}" for k in range(len(passes) - 1)] + ["0"]
    if not resuming:
        group.attrs["svision_big"] = {**provenance, "state": "writing level 0"}
        for k, pl in enumerate(plans[:-1]):
            inner, shard = _scratch_layout(pl.block, block)
            _create_intermediate(output, output_storage_options, paths[k], full_shape(pl.out_shape), full_chunks(inner),
                                 None if shard is None else full_chunks(shard))
        fmt.create_array(group, "0", tuple(out_shape), tuple(chunks), out_dtype, image.axis_names,
                         shards=shard_shape, compression=compression)
    base = dict(in_url=input, in_path=image.paths[0], out_url=output, spatial_axes=tuple(spatial),
                outer_axes=tuple(outer_axes), outer_offsets=tuple(offsets), models=model_hashes,
                model_axis=outer_axes.index(cax) if (cax is not None and len(models) > 1) else None,
                out_dtype=out_dtype, in_options=storage_options, out_options=output_storage_options, device=device,
                precision=precision)
    jobs = []
    for k, (p, pl) in enumerate(zip(passes, plans)):
        from_image = p.ref < 0
        jobs.append(Job(**{**base, "in_url": input if from_image else output,
                           "in_path": image.paths[0] if from_image else paths[p.ref]},
                        out_path=paths[k], plan=pl, done_url=_join(output, STATE_DIR, f"done-{fp}", f"p{k}"),
                        step=p, in_raw=from_image, out_raw=k == len(passes) - 1,
                        companion_path=paths[k - 1] if p.companion else None))
    cl, owned = _open_cluster(client, workers, scheduler)
    try:
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
        stats["seconds"] = round(total_s, 3)
        stats["voxels_per_second"] = last["output_voxels"] / total_s if total_s > 0 else 0.0
        t0 = time.perf_counter()
        group.attrs["svision_big"] = {**provenance, "state": "building pyramid"}
        levels = _finish(group, fmt, image, out_shape, factors, tuple(chunks), shard_shape, out_dtype, compression, cl,
                         [m.norm for m in models])
        stats["pyramid_seconds"] = round(time.perf_counter() - t0, 3)
    finally:
        for o in owned:
            o.close()
    _remove_intermediate(output, output_storage_options, work)
    group.attrs["svision_big"] = {**provenance, "state": "complete", "levels": levels}
    stats.update(output=output, fingerprint=fp, halo=list(plan.halo), block=list(block), levels=levels)
    return stats


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


def _prepare_output(output: str, options: dict | None, fp: str, overwrite: bool) -> bool:
    """True to resume an output made with the same fingerprint; never silently replace anything else."""
    if not store_exists(output, options):
        return False
    prev = None
    try:
        import zarr

        prev = zarr.open_group(_make_store(output, options, read_only=True), mode="r").attrs.get("svision_big")
    except Exception:
        prev = None
    if isinstance(prev, dict) and prev.get("fingerprint") == fp:
        return True
    if prev is None and _only_state(output, options):
        return False  # holds nothing but models that `run` saved for this output
    if not overwrite:
        why = (f"was made with other settings (fingerprint {prev.get('fingerprint')}, now {fp})"
               if isinstance(prev, dict) else "is not an svision-big output")
        raise NgffError(f"{output} already exists and {why}: pass --overwrite to replace it")
    remove_store(output, options)
    return False


def _only_state(output: str, options: dict | None) -> bool:
    import fsspec.core

    fs, root = fsspec.core.url_to_fs(output, **(options or {}))
    try:
        names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return True
    return set(names) <= {STATE_DIR}


def _finish(group, fmt, image: Image, out_shape, factors, chunks, shards, dtype, compression, client, norms) -> list[str]:
    """Pyramid from the stored level 0, then the OME metadata (last)."""
    spatial = image.spatial_axes
    coarsest = image.level(image.nlevels - 1).shape
    pf = pyramid_factors(tuple(out_shape), spatial, min_shape=64, until_shape=tuple(coarsest))
    paths = build_pyramid(group, fmt, image.axis_names, "0", spatial, pf, chunks, dtype, client=client,
                          shards=shards, compression=compression)
    full = [1] * image.ndim
    for ax, f in zip(spatial, factors):
        full[ax] = f
    s0, t0 = upsampled_transform(image.scales[0], image.translations[0], full)
    datasets = pyramid_datasets(s0, t0, spatial, pf, paths)
    ome = multiscales_metadata(image.axes, datasets, name=image.name, version=fmt.version,
                               extra={"type": "mean", "metadata": {"method": "svision_big enhance, block-mean pyramid",
                                                                   "version": __version__}})
    if image.omero:
        ome["omero"] = image.omero
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
    precision_dtype(kwargs.get("precision", "float32"), kwargs.get("device") or _default_device())  # before training
    if _same_or_nested(input, output):
        raise NgffError(f"the output {output} must not be the input or lie inside it (or contain it)")
    image = open_image(input, storage_options)
    cax = _channel_axis(image)
    channels = [channel] if channel is not None else (list(range(image.shape[cax])) if cax is not None else [0])
    key = _fingerprint({"input": input, "factor": str(factor), "steps": steps, "seed": seed, "budget": budget,
                        "shape": list(image.shape), "version": __version__, "acquisition": acquisition,
                        "psf_fwhm": None if psf_fwhm is None else list(np.atleast_1d(psf_fwhm))})
    import fsspec.core

    fs, root = fsspec.core.url_to_fs(_join(output, STATE_DIR, f"models-{key}"), **(output_storage_options or {}))
    if store_exists(output, output_storage_options) and not fs.exists(root):
        _prepare_output(output, output_storage_options, "-", overwrite)  # refuses unless --overwrite
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
                  storage_options=storage_options, quiet=quiet, acquisition=acquisition, psf_fwhm=psf_fwhm)
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(path, m.to_bytes())
        models.append(m)
    return enhance(input, output, models if len(models) > 1 else models[0], channel=channel, storage_options=storage_options,
                   output_storage_options=output_storage_options, progress=not quiet, overwrite=overwrite, **kwargs)
