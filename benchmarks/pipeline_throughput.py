"""Pipeline benchmark 1, throughput: ``enhance`` end to end against the in-memory operator,
``dask.array.map_overlap`` and the physical limit.

At factor 2 with the full operator (default architecture, 8-variant ensemble, back-projection
0/2/10 iterations): end-to-end ``svision_big.pipeline.enhance`` (local cluster of 2
single-thread workers; read, infer, write, pyramid), also in bfloat16, next to
- the in-memory operator on the same voxels (``enhance_array`` on whole slabs, no halo
  recomputation, no I/O, 2 processes at once, before and after: load drift cancels),
- the obvious hand-written alternative: ``dask.array.map_overlap`` (depth = the model's halo,
  ``boundary='none'``) with the same operator, written with ``to_zarr`` into an array of the
  same chunks and codec,
- the physical limit: floating-point operations per output voxel (counted from the
  architecture and the tap tables) over the convolution rate this machine reaches (a large
  dense ``conv3d``, measured alone and in 2 processes at once).

    python benchmarks/pipeline_throughput.py            # default (about 15 min on 2 cores)
    python benchmarks/pipeline_throughput.py --quick    # smoke run (about 1 min)
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: spinning threads on a shared 2-core machine cost orders of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gc
import math
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline_common import (  # noqa: E402
    FACTORS,
    _mv,
    _set_threads,
    build_model,
    flops_per_output_voxel,
    fresh,
    make_input,
    run_child,
    run_children,
    section_main,
)


def child_convrate(spec: dict) -> dict:
    """Dense conv3d rate (GFLOP/s) on one thread: a large well-shaped layer, and the model's own layers."""
    import torch

    _set_threads(1)

    def bench(f, min_seconds=None):
        if min_seconds is None:
            min_seconds = spec.get("min_seconds", 1.0)
        f()
        best = float("inf")
        t_end = time.perf_counter() + min_seconds
        reps = 0
        while reps < 3 or time.perf_counter() < t_end:
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
            reps += 1
        return best

    out = {}
    with torch.inference_mode():
        c, n = 16, spec.get("n", 64)
        conv = torch.nn.Conv3d(c, c, 3, padding=1)
        x = torch.randn(1, c, n, n, n)
        t = bench(lambda: conv(x))
        out["large_conv_gflops"] = 2 * c * c * 27 * n**3 / t / 1e9
        if spec.get("layers"):
            model = build_model(0)
            net = model.spec().stages[0].net
            r = spec.get("layer_n", 64)
            h = torch.randn(1, 1, r, r, r)
            flops = secs = 0.0
            per = []
            for layer in list(net.body) + [net.expand]:
                if isinstance(layer, torch.nn.Conv3d):
                    fl = (
                        2 * layer.in_channels // layer.groups * layer.out_channels * math.prod(layer.kernel_size) * r**3
                    )
                    hh = h
                    tt = bench(lambda layer=layer, hh=hh: layer(hh), min_seconds=spec.get("min_seconds", 1.0) / 4)
                    per.append(
                        {
                            "layer": f"{layer.in_channels}->{layer.out_channels} k{layer.kernel_size[0]} g{layer.groups}",
                            "gflops": round(fl / tt / 1e9, 1),
                            "ms": round(tt * 1e3, 1),
                        }
                    )
                    flops += fl
                    secs += tt
                h = layer(h)
            out["model_layers"] = per
            out["model_layers_gflops"] = flops / secs / 1e9
    return out


# --------------------------------------------------------------- lever: resize without gathers


def child_inmem(spec: dict) -> dict:
    """The in-memory operator on a slab of the input (no halo recomputation, no I/O in the timing)."""
    from svision_big.ngff import open_image
    from svision_big.operator import enhance_array

    _set_threads(1)
    model = build_model(spec["bp"], spec.get("light", False))
    opspec = model.spec()
    img = open_image(spec["input"])
    sel = tuple(slice(a, b) for a, b in spec["region"])
    x = np.asarray(img.level(0)[sel])
    enhance_array(x[:8, :8, :8], opspec, np.uint16)  # warm-up (allocator, oneDNN primitives)
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    t = time.perf_counter()
    y = enhance_array(x, opspec, np.uint16)
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "in_shape": list(x.shape),
        "out_voxels": int(y.size),
        "seconds": secs,
        "voxels_per_second": y.size / secs,
        "rss_before": rss0,
        "peak_rss": peak,
        "bytes_per_input_voxel": (peak - rss0) / x.size,
    }


def child_map_overlap(spec: dict) -> dict:
    """What a user would write: map_overlap(depth=halo, boundary='none') + to_zarr (same chunks and codec)."""
    import dask.array as da
    from distributed import Client, LocalCluster

    from svision_big.model import load_model
    from svision_big.ngff import format_for, open_image, open_output_group

    model = load_model(spec["model"])
    halo = model.halo()
    img = open_image(spec["input"])
    in_block = tuple(b // f for b, f in zip(spec["block"], FACTORS))
    cluster = LocalCluster(
        n_workers=spec.get("workers", 2), threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = Client(cluster)
    try:
        t0 = time.perf_counter()
        x = da.from_zarr(img.level(0), chunks=in_block)
        f = FACTORS

        def run(b, block_info=None):
            import torch

            torch.set_num_threads(1)
            info = block_info[None]
            loc, nch = info["chunk-location"], info["num-chunks"]
            y = model.enhance(b, dtype=np.uint16)
            sl = tuple(
                slice(0 if l == 0 else fi * h, None if l == n - 1 else -fi * h)
                for l, n, fi, h in zip(loc, nch, f, halo)
            )
            return y[sl]

        out_chunks = tuple(tuple(c * fi for c in cs) for cs, fi in zip(x.chunks, f))
        y = x.map_overlap(
            run, depth=dict(enumerate(halo)), boundary="none", trim=False, chunks=out_chunks, dtype=np.uint16
        )
        n_tasks = len(dict(y.__dask_graph__()))
        fmt = format_for("0.5")
        g = open_output_group(spec["output"], fmt, mode="a")
        arr = fmt.create_array(g, "0", y.shape, spec["block"], "uint16", ["z", "y", "x"])
        y.to_zarr(arr, compute=True)
        secs = time.perf_counter() - t0
    finally:
        client.close()
        cluster.close()
    nblocks = x.npartitions
    return {
        "seconds": secs,
        "output_voxels": int(math.prod(y.shape)),
        "voxels_per_second": math.prod(y.shape) / secs,
        "graph_tasks": n_tasks,
        "blocks": nblocks,
        "tasks_per_block": n_tasks / nblocks,
        "halo": list(halo),
    }


def section_throughput(cfg: dict, workdir: Path, log) -> dict:
    from svision_big.plan import default_block

    res = {}
    shape = tuple(cfg["throughput_in"])
    _, gen = make_input(workdir, shape)
    res["input_shape"] = list(shape)
    res["output_shape"] = [n * f for n, f in zip(shape, FACTORS)]
    res["input_generation_seconds"] = round(gen, 1)
    res["block"] = list(default_block(tuple(res["output_shape"]), FACTORS, 256))

    # physical limit: conv rate alone and in 2 processes at once
    log("conv rate: 1 process")
    one = run_child({"mode": "convrate", "layers": True, "n": 64, "min_seconds": cfg["conv_seconds"]})
    log("conv rate: 2 processes at once")
    two = run_children([{"mode": "convrate", "n": 64, "min_seconds": cfg["conv_seconds"]}] * 2)
    res["conv"] = {
        "one_process_gflops": one["large_conv_gflops"],
        "model_layers": one["model_layers"],
        "model_layers_gflops": one["model_layers_gflops"],
        "two_processes_gflops": [r["large_conv_gflops"] for r in two],
        # the best the machine showed: 2 processes at once, or twice the lone process (shared machine)
        "machine_gflops": max(sum(r["large_conv_gflops"] for r in two), 2 * one["large_conv_gflops"]),
    }

    rows = []
    for bp, in_shape, slab in cfg["throughput_bps"]:
        model = build_model(bp)
        mpath = workdir / f"model_bp{bp}.svb"
        model.save(mpath)
        fl = flops_per_output_voxel(model)
        limit = res["conv"]["machine_gflops"] * 1e9 / fl["total_per_output_voxel"]
        row = {
            "bp": bp,
            "halo": list(model.halo()),
            "flops": fl,
            "physical_limit_voxels_per_second": limit,
            # enhance's own default (block None); map_overlap gets the same block
            "block": list(default_block(tuple(n * f for n, f in zip(in_shape, FACTORS)), FACTORS, 256)),
        }
        src, _ = make_input(workdir, tuple(in_shape))
        row["input_shape"] = list(in_shape)
        row["output_voxels"] = math.prod(in_shape) * math.prod(FACTORS)
        block = tuple(row["block"])
        # in-memory operator: 2 processes at once, each on a slab of whole input (no halo)
        zs, ys, xs = slab
        assert zs <= in_shape[0] and ys <= in_shape[1] and 2 * xs <= in_shape[2], "in-memory slabs must fit the volume"
        regions = [[[0, zs], [0, ys], [k * xs, (k + 1) * xs]] for k in range(2)]

        def inmem(bp=bp, src=src, regions=regions, zs=zs, ys=ys, xs=xs):
            log(f"bp={bp}: in-memory operator, 2 processes, slabs {zs}x{ys}x{xs}")
            im = run_children([{"mode": "inmem", "input": src, "bp": bp, "region": r} for r in regions])
            return {
                "per_process": [
                    {k: r[k] for k in ("seconds", "out_voxels", "voxels_per_second", "bytes_per_input_voxel")}
                    for r in im
                ],
                "voxels_per_second": sum(r["voxels_per_second"] for r in im),
                "load_avg_1min": im[0]["memory_all_children"]["load_avg_1min"],
            }

        def enhance_run(tag, *, bp=bp, src=src, in_shape=in_shape, mpath=mpath, block=block, **extra):
            log(f"bp={bp}: enhance end to end{tag}, input {in_shape}")
            out = fresh(workdir / f"out_bp{bp}.ome.zarr")
            e = run_child({"mode": "enhance", "input": src, "output": out, "model": str(mpath), "block": None, **extra})
            shutil.rmtree(out, ignore_errors=True)
            return {
                **{
                    k: e[k]
                    for k in (
                        "seconds",
                        "pyramid_seconds",
                        "wall",
                        "blocks",
                        "output_voxels",
                        "stored_bytes",
                        "worker_env",
                    )
                    if k in e
                },
                "level0_voxels_per_second": e["voxels_per_second"],
                "voxels_per_second": e["output_voxels"] / (e["seconds"] + e["pyramid_seconds"]),
                "peak_rss_total_bytes": e["memory"]["peak_total_bytes"],
                "peak_rss_largest_process_bytes": e["memory"]["peak_per_process_bytes"][0],
                "processes": e["memory"]["processes"],
                "load_avg_1min": e["memory"]["load_avg_1min"],
            }

        # A-B-A order (in-memory, enhance, alternatives, enhance, in-memory): other tenants' load drifts
        runs_im = [inmem()]
        runs_e = [enhance_run("")]
        if bp in cfg["bf16_bps"]:
            row["enhance_bf16"] = enhance_run(", networks in bfloat16", precision="bfloat16")
        if bp in cfg["malloc_bps"]:
            row["enhance_no_malloc_trim"] = enhance_run(", workers without MALLOC_TRIM_THRESHOLD_", no_malloc_trim=True)
        if bp in cfg["map_overlap_bps"]:
            log(f"bp={bp}: dask map_overlap + to_zarr")
            out = fresh(workdir / f"mo_bp{bp}.zarr")
            m = run_child(
                {"mode": "map_overlap", "input": src, "output": out, "model": str(mpath), "block": list(block)}
            )
            row["map_overlap"] = {
                k: m[k] for k in ("seconds", "voxels_per_second", "graph_tasks", "blocks", "tasks_per_block")
            }
            row["map_overlap"]["peak_rss_total_bytes"] = m["memory"]["peak_total_bytes"]
            row["map_overlap"]["load_avg_1min"] = m["memory"]["load_avg_1min"]
            shutil.rmtree(out, ignore_errors=True)
        if bp in cfg["aba"]:
            if bp in cfg["malloc_bps"] or bp in cfg["map_overlap_bps"] or bp in cfg["bf16_bps"]:
                runs_e.append(enhance_run(" (again)"))
            runs_im.append(inmem())
        row["inmem"] = {
            **runs_im[0],
            "runs": runs_im,
            "voxels_per_second": float(np.mean([r["voxels_per_second"] for r in runs_im])),
        }
        row["enhance"] = {
            **runs_e[0],
            "runs": runs_e,
            "voxels_per_second": float(np.mean([r["voxels_per_second"] for r in runs_e])),
            "level0_voxels_per_second": float(np.mean([r["level0_voxels_per_second"] for r in runs_e])),
        }
        rows.append(row)
    res["rows"] = rows
    return res


def report_throughput(res: dict) -> list[str]:
    L = []
    tp = res["throughput"]
    conv = tp["conv"]
    L.append("### 1. Throughput (factor 2, full operator, default architecture, random weights; output voxels/s)")
    L.append("")
    L.append(
        f"Conv rate reached (dense 16->16 k3 conv3d on 64^3, 1 thread): {conv['one_process_gflops']:.1f} GFLOP/s "
        f"alone; {' + '.join(f'{g:.1f}' for g in conv['two_processes_gflops'])} = {conv['machine_gflops']:.1f} GFLOP/s "
        f"in 2 processes at once; the physical limit below uses the larger of that and twice the lone rate: "
        f"{conv['machine_gflops']:.1f} GFLOP/s. The model's own layers reach {conv['model_layers_gflops']:.1f} GFLOP/s "
        f"(1 thread): " + ", ".join(f"{l['layer']} {l['gflops']}" for l in conv["model_layers"]) + "."
    )
    L.append("")
    rows = tp["rows"]
    L.append(
        "| output voxels/s (M/s) | "
        + " | ".join(
            f"bp {r['bp']} (halo {r['halo'][0]}): {'x'.join(map(str, r['input_shape']))} -> "
            f"{'x'.join(str(n * 2) for n in r['input_shape'])}, {r['enhance']['blocks']} blocks of {'x'.join(map(str, r['block']))}"
            for r in rows
        )
        + " |"
    )
    L.append("|---|" + "---|" * len(rows))

    def line(label, f):
        cells = []
        for r in rows:
            try:
                cells.append(f(r))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("not run")
        L.append(f"| {label} | " + " | ".join(cells) + " |")

    line(
        "physical limit: FLOP/voxel over the machine's measured conv rate",
        lambda r: (
            f"{_mv(r['physical_limit_voxels_per_second'])} ({r['flops']['total_per_output_voxel']:,.0f} FLOP/voxel)"
        ),
    )

    def runs(r, k):
        rr = r[k].get("runs") or [r[k]]
        return "" if len(rr) < 2 else " (runs " + ", ".join(_mv(x["voxels_per_second"]) for x in rr) + ")"

    line(
        "in-memory operator, whole slabs, 2 processes x 1 thread (before and after)",
        lambda r: f"{_mv(r['inmem']['voxels_per_second'])}{runs(r, 'inmem')}",
    )
    line(
        "**`enhance` end to end** (read, infer, write, pyramid)",
        lambda r: (
            f"**{_mv(r['enhance']['voxels_per_second'])}**{runs(r, 'enhance')}; "
            f"{r['enhance']['seconds']:.0f} s + pyramid {r['enhance']['pyramid_seconds']:.1f} s"
        ),
    )
    line("`enhance` level 0 only", lambda r: _mv(r["enhance"]["level0_voxels_per_second"]))
    line(
        "`enhance --precision bfloat16` end to end (networks in bfloat16; opt-in)",
        lambda r: (
            f"{_mv(r['enhance_bf16']['voxels_per_second'])} ({r['enhance_bf16']['seconds']:.0f} s + "
            f"{r['enhance_bf16']['pyramid_seconds']:.1f} s); {r['enhance_bf16']['voxels_per_second'] / r['enhance']['voxels_per_second']:.2f}x float32"
        ),
    )
    line(
        "`enhance` end to end, workers without MALLOC_TRIM_THRESHOLD_",
        lambda r: (
            f"{_mv(r['enhance_no_malloc_trim']['voxels_per_second'])} ({r['enhance_no_malloc_trim']['seconds']:.0f} s + "
            f"{r['enhance_no_malloc_trim']['pyramid_seconds']:.1f} s)"
        ),
    )
    line(
        "`map_overlap` + `to_zarr` (level 0 only)",
        lambda r: (
            f"{_mv(r['map_overlap']['voxels_per_second'])} ({r['map_overlap']['seconds']:.0f} s, "
            f"{r['map_overlap']['tasks_per_block']:.1f} tasks/block)"
        ),
    )
    line(
        "end to end / in-memory (target >= 0.8)",
        lambda r: f"{r['enhance']['voxels_per_second'] / r['inmem']['voxels_per_second']:.2f}",
    )
    line(
        "level 0 / map_overlap (target > 1)",
        lambda r: f"{r['enhance']['level0_voxels_per_second'] / r['map_overlap']['voxels_per_second']:.2f}",
    )
    line(
        "end to end (with pyramid) / map_overlap (without)",
        lambda r: f"{r['enhance']['voxels_per_second'] / r['map_overlap']['voxels_per_second']:.2f}",
    )
    line(
        "without / with MALLOC_TRIM_THRESHOLD_",
        lambda r: f"{r['enhance_no_malloc_trim']['voxels_per_second'] / r['enhance']['voxels_per_second']:.2f}",
    )
    line(
        "end to end / physical limit",
        lambda r: f"{r['enhance']['voxels_per_second'] / r['physical_limit_voxels_per_second']:.3f}",
    )
    line(
        "end to end / target 2.6 M/s",
        lambda r: (
            f"{r['enhance']['voxels_per_second'] / 2.6e6:.3f} ({'met' if r['enhance']['voxels_per_second'] >= 2.6e6 else 'missed'})"
        ),
    )

    def loads(r):
        parts = []
        for k in ("inmem", "enhance", "enhance_bf16", "enhance_no_malloc_trim", "map_overlap"):
            if k in r:
                for x in r[k].get("runs") or [r[k]]:
                    parts.append(f"{k} {'/'.join(f'{v:.1f}' for v in x['load_avg_1min'])}")
        return "; ".join(parts)

    line("1-min load average (other tenants) at start/end of each run", loads)
    L.append("")
    fl = tp["rows"][0]["flops"]["stage0"]
    L.append(
        f"FLOP count (per output voxel): network {fl['network_per_output_voxel']:,.0f} per variant "
        f"(convolutions {fl['conv_flops_per_lowres_voxel']:,} per low-res voxel / 8), x {fl['variants']} variants, + residual cubic "
        f"upsample {fl['residual_cubic_per_output_voxel']:.0f} once = {fl['ensemble_per_output_voxel']:,.0f}; "
        f"back-projection {fl['bp_per_iteration_per_output_voxel']:.0f} per iteration."
    )
    L.append("")
    return L


if __name__ == "__main__":
    sys.exit(
        section_main(
            "Pipeline benchmark 1: throughput of enhance against in-memory, map_overlap and the physical limit.",
            "throughput",
            section_throughput,
            report_throughput,
        )
    )
