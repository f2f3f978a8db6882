"""Pipeline benchmark 2, memory: peak resident memory of the whole process tree (client +
scheduler + nannies + workers, psutil RSS sampled every 0.1 s) of ``enhance`` for volumes 1x, 8x,
64x in voxels, with the stand-in operator (halo 0, almost no compute: what grows with the volume
is scheduling, done-records, I/O and the pyramid), and the per-block pipeline cost.

    python benchmarks/pipeline_memory.py            # default (about 4 min)
    python benchmarks/pipeline_memory.py --quick
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: spinning threads on a shared 2-core machine cost orders of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline_common import FACTORS, _gb, _mv, build_model, fresh, make_input, run_child, section_main  # noqa: E402


def section_memory(cfg: dict, workdir: Path, log, throughput: dict | None = None) -> dict:

    rows = []
    for label, mult, in_shape, light in cfg["memory_runs"]:
        src, gen = make_input(workdir, tuple(in_shape))
        model = build_model(0, light=light)
        mpath = workdir / f"model_{'light' if light else 'bp0'}.svb"
        model.save(mpath)
        out_shape = [n * f for n, f in zip(in_shape, FACTORS)]
        block = None  # enhance's default
        log(f"memory: {label} {'stand-in' if light else 'real'} operator, input {in_shape} -> output {out_shape}")
        out = fresh(workdir / f"mem_{label}_{'light' if light else 'real'}.ome.zarr")
        e = run_child({"mode": "enhance", "input": src, "output": out, "model": str(mpath), "block": block})
        shutil.rmtree(out, ignore_errors=True)
        rows.append(
            {
                "volume": label,
                "multiple": mult,
                "operator": "stand-in (light)" if light else "real (bp 0)",
                "input_shape": list(in_shape),
                "output_shape": out_shape,
                "output_gb_uint16": math.prod(out_shape) * 2 / 1e9,
                "blocks": e["blocks"],
                "seconds": e["seconds"],
                "pyramid_seconds": e["pyramid_seconds"],
                "wall": e["wall"],
                "stored_gb": e["stored_bytes"] / 1e9,
                "input_generation_seconds": round(gen, 1),
                "peak_rss_total_bytes": e["memory"]["peak_total_bytes"],
                "peak_rss_largest_process_bytes": e["memory"]["peak_per_process_bytes"][0],
                "peak_rss_per_process_bytes": e["memory"]["peak_per_process_bytes"],
                "processes": e["memory"]["processes"],
                "load_avg_1min": e["memory"]["load_avg_1min"],
                "voxels_per_second": e["output_voxels"] / (e["seconds"] + e["pyramid_seconds"]),
            }
        )
    over = []
    for r in rows:  # the stand-in runs above, as shipped
        if r["operator"].startswith("stand-in") and any(o[0] == r["volume"] for o in cfg.get("overhead_runs", [])):
            over.append(
                {
                    "volume": r["volume"],
                    "how": "2 workers (as shipped; the memory run above)",
                    "blocks": r["blocks"],
                    "seconds": r["seconds"],
                    "pyramid_seconds": r["pyramid_seconds"],
                    "blocks_per_second": r["blocks"] / r["seconds"],
                    "load_avg_1min": r["load_avg_1min"],
                }
            )
    for label, in_shape, how in cfg.get("overhead_runs", []):
        src, _ = make_input(workdir, tuple(in_shape))
        mpath = workdir / "model_light.svb"
        build_model(0, light=True).save(mpath)
        log(f"pipeline overhead: stand-in operator, {label}, {how}")
        out = fresh(workdir / "overhead.ome.zarr")
        extra = (
            {"scheduler": "sync"}
            if how == "in-process (scheduler='sync'), 1 thread"
            else ({"no_malloc_trim": True} if how.startswith("2 workers without") else {})
        )
        e = run_child({"mode": "enhance", "input": src, "output": out, "model": str(mpath), **extra})
        shutil.rmtree(out, ignore_errors=True)
        over.append(
            {
                "volume": label,
                "how": how,
                "blocks": e["blocks"],
                "seconds": e["seconds"],
                "pyramid_seconds": e["pyramid_seconds"],
                "blocks_per_second": e["blocks"] / e["seconds"],
                "load_avg_1min": e["memory"]["load_avg_1min"],
            }
        )
    return {"rows": rows, "overhead": over}


def add_flatness(mem: dict, throughput: dict | None = None) -> dict:
    """Put the throughput run's real-operator 1x point first (same settings), and the largest over
    the smallest peak per operator."""
    if throughput:
        r0 = throughput["rows"][0]
        e = r0["enhance"]
        mem["rows"].insert(
            0,
            {
                "volume": "1x (throughput run)",
                "multiple": 1,
                "operator": "real (bp 0)",
                "input_shape": r0["input_shape"],
                "output_shape": [n * 2 for n in r0["input_shape"]],
                "output_gb_uint16": r0["output_voxels"] * 2 / 1e9,
                "blocks": e["blocks"],
                "seconds": e["seconds"],
                "pyramid_seconds": e["pyramid_seconds"],
                "wall": e["wall"],
                "peak_rss_total_bytes": e["peak_rss_total_bytes"],
                "peak_rss_largest_process_bytes": e["peak_rss_largest_process_bytes"],
                "processes": e["processes"],
                "voxels_per_second": e["voxels_per_second"],
            },
        )
    flat = {}
    for op in {r["operator"] for r in mem["rows"]}:
        peaks = [r["peak_rss_total_bytes"] for r in mem["rows"] if r["operator"] == op]
        if len(peaks) > 1:
            flat[op] = max(peaks) / min(peaks)
    mem["flatness"] = flat
    return mem


def run_memory(cfg: dict, workdir: Path, log) -> dict:
    return add_flatness(section_memory(cfg, workdir, log))


def report_memory(res: dict) -> list[str]:
    L = []
    mem = res["memory"]
    L.append(
        "### 2. Memory: peak RSS of the whole process tree (client + scheduler + 2 nannies + 2 workers), default block"
    )
    L.append("")
    L.append(
        "| volume | operator | input -> output (uint16) | blocks | peak RSS, sum of processes | largest process | level 0 + pyramid | throughput |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    for r in mem["rows"]:
        L.append(
            f"| {r['volume']} | {r['operator']} | {'x'.join(map(str, r['input_shape']))} -> {'x'.join(map(str, r['output_shape']))} "
            f"({r['output_gb_uint16']:.2f} GB) | {r['blocks']} | {_gb(r['peak_rss_total_bytes']):.2f} GB | "
            f"{_gb(r['peak_rss_largest_process_bytes']):.2f} GB | {r['seconds']:.0f} s + {r['pyramid_seconds']:.0f} s | "
            f"{_mv(r['voxels_per_second'])} M/s |"
        )
    for k, v in mem.get("flatness", {}).items():
        L.append(f"\nFlatness ({k}): largest / smallest peak = {v:.3f}")
    L.append("")
    if mem.get("overhead"):
        L.append(
            "Per-block pipeline cost with the stand-in operator (almost no compute: read, cast, compress, write, "
            "done-record, scheduling):"
        )
        L.append("")
        L.append("| volume | how | blocks | level 0 | blocks/s | 1-min load start/end |")
        L.append("|---|---|---|---|---|---|")
        for r in mem["overhead"]:
            L.append(
                f"| {r['volume']} | {r['how']} | {r['blocks']} | {r['seconds']:.1f} s | {r['blocks_per_second']:.1f} | "
                f"{'/'.join(str(v) for v in r['load_avg_1min'])} |"
            )
        L.append("")
    return L


if __name__ == "__main__":
    sys.exit(
        section_main(
            "Pipeline benchmark 2: peak memory of the whole process tree against volume size.",
            "memory",
            run_memory,
            report_memory,
        )
    )
