"""Pipeline benchmark 3, planning: time and client memory to plan 10^5 and 10^6 blocks
(``BlockPlan``, iterating every block, the task payload, and ``enhance`` itself up to its first
block on a metadata-only input), and listing the done-records of a resumed run.

    python benchmarks/pipeline_planning.py           # default (about 1 min)
    python benchmarks/pipeline_planning.py --quick
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

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline_common import FACTORS, _set_threads, build_model, run_child, section_main


def child_plan(spec: dict) -> dict:
    """Client-side planning cost for n blocks: BlockPlan, every block, task payload, and enhance() to block 1."""
    import pickle
    import tempfile
    import tracemalloc

    import zarr

    from svision_big.execute import Job
    from svision_big.ngff import format_for, multiscales_metadata
    from svision_big.plan import BlockPlan, default_block

    _set_threads(1)
    n_side = spec["n_side"]
    light = build_model(0, light=True)
    real_halo = tuple(spec["halo"])
    block = (128, 128, 128)
    in_shape = tuple(n_side * b // f for b, f in zip(block, FACTORS))
    proc = psutil.Process()
    res = {"in_shape": list(in_shape), "block": list(block)}

    out_shape = tuple(n * f for n, f in zip(in_shape, FACTORS))

    def make_plan():
        return BlockPlan(in_shape, FACTORS, default_block(out_shape, FACTORS, 128), real_halo)

    def walk(plan, limit=None):
        # what execute's client-side generator yields (indices not done), plus the block
        # geometry each task computes from its index on the worker
        done: set[int] = set()
        todo = (i for i in range(len(plan)) if i not in done)
        cnt = vox = 0
        for i in todo:
            vox += plan[i].write_voxels
            cnt += 1
            if limit and cnt >= limit:
                break
        return cnt, vox

    # timings (no tracing: tracemalloc slows Python ~10x)
    t = time.perf_counter()
    plan = make_plan()
    n = len(plan)
    res["blocks"] = n
    res["plan_seconds"] = time.perf_counter() - t
    if spec.get("iterate", True):
        t = time.perf_counter()
        cnt, vox = walk(plan)
        res["iterate_all_blocks_seconds"] = time.perf_counter() - t
        res["iterate_per_block_us"] = res["iterate_all_blocks_seconds"] / n * 1e6
        assert cnt == n and vox == math.prod(plan.out_shape)
    t = time.perf_counter()
    res["overhead"] = plan.overhead()
    res["overhead_seconds"] = time.perf_counter() - t
    job = Job(
        in_url="/x.zarr",
        in_path="0",
        out_url="/y.zarr",
        out_path="0",
        plan=plan,
        spatial_axes=(0, 1, 2),
        outer_axes=(),
        outer_offsets=(),
        models=("0" * 16,),
        model_axis=None,
        out_dtype="uint16",
        done_url="/y.zarr/svision_state/done-0123456789abcdef",
    )
    res["task_payload_bytes"] = len(pickle.dumps((job, n - 1)))
    # memory: Python allocations of planning + walking the first 10^4 blocks (walking keeps nothing)
    del plan
    gc.collect()
    rss0 = proc.memory_info().rss
    tracemalloc.start()
    plan = make_plan()
    walk(plan, limit=10_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    res["tracemalloc_peak_bytes"] = peak
    res["rss_delta_bytes"] = proc.memory_info().rss - rss0

    # enhance() itself on a metadata-only input of this shape, up to the first finished block
    if spec.get("enhance", True):
        from svision_big.pipeline import enhance

        tmp = Path(tempfile.mkdtemp(prefix="svb-plan-", dir=spec.get("workdir")))
        try:
            inp = tmp / "in.ome.zarr"
            fmt = format_for("0.5")
            grp = zarr.open_group(str(inp), mode="w", zarr_format=3)
            fmt.create_array(grp, "0", in_shape, (64, 256, 256), "uint16", ["z", "y", "x"])  # no chunk written
            axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
            ds = [("0", [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])]
            fmt.write_ome_attrs(grp, multiscales_metadata(axes, ds, name="meta-only", version="0.5"))

            class Stop(Exception):
                pass

            first = {}

            def on_block(i):
                first["t"] = time.perf_counter()
                raise Stop

            gc.collect()
            rss0 = proc.memory_info().rss
            tracemalloc.start()
            t = time.perf_counter()
            try:
                enhance(str(inp), str(tmp / "out.ome.zarr"), light, scheduler="sync", progress=False, on_block=on_block)
            except Stop:
                pass
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            res["enhance_to_first_block_seconds"] = first["t"] - t
            res["enhance_tracemalloc_peak_bytes"] = peak
            res["enhance_rss_delta_bytes"] = proc.memory_info().rss - rss0
            res["enhance_light_halo"] = list(light.halo())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # resume: listing the done-records of a run (one empty file per finished block)
    n_rec = spec.get("records", 0)
    if n_rec:
        from svision_big.state import DoneRecords

        tmp = Path(tempfile.mkdtemp(prefix="svb-rec-", dir=spec.get("workdir")))
        try:
            rec = DoneRecords(str(tmp / "done"))
            rec.create()
            t = time.perf_counter()
            for i in range(n_rec):
                rec.mark(i)
            res["records_write_seconds"] = time.perf_counter() - t
            gc.collect()
            rss0 = proc.memory_info().rss
            t = time.perf_counter()
            done = DoneRecords(str(tmp / "done")).load()
            res["records_load_seconds"] = time.perf_counter() - t
            res["records_load_rss_delta_bytes"] = proc.memory_info().rss - rss0
            tracemalloc.start()
            done = DoneRecords(str(tmp / "done")).load()
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert len(done) == n_rec
            res["records"] = n_rec
            res["records_load_tracemalloc_peak_bytes"] = peak
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


def section_planning(cfg: dict, workdir: Path, log) -> dict:
    rows = []
    halo = list(build_model(0).halo())
    for i, n_side in enumerate(cfg["plan_sides"]):
        log(f"planning {n_side**3:,} blocks")
        last = i == len(cfg["plan_sides"]) - 1
        r = run_child(
            {
                "mode": "plan",
                "n_side": n_side,
                "halo": halo,
                "workdir": str(workdir),
                "records": cfg["records"] if last else 0,
                "iterate": n_side**3 <= cfg["iterate_max"],
            }
        )
        r.pop("memory", None)
        rows.append(r)
    return {"rows": rows, "halo": halo}


def report_planning(res: dict) -> list[str]:
    L = []
    pl = res["planning"]
    L.append("### 3. Planning (client side; halo of the real bp=0 model)")
    L.append("")
    L.append(
        "| blocks | input shape | BlockPlan | iterate every block (plan[i]) | overhead() | task payload | Python peak (tracemalloc) | RSS delta | `enhance` to first block (metadata-only input) | its Python peak |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in pl["rows"]:
        L.append(
            f"| {r['blocks']:,} | {'x'.join(map(str, r['in_shape']))} | {r['plan_seconds'] * 1e6:.0f} us | "
            + (
                f"{r['iterate_all_blocks_seconds']:.2f} s ({r['iterate_per_block_us']:.1f} us/block)"
                if "iterate_all_blocks_seconds" in r
                else "not run (--quick)"
            )
            + f" | {r['overhead_seconds'] * 1e3:.1f} ms | "
            f"{r['task_payload_bytes']} B | {r['tracemalloc_peak_bytes'] / 1e6:.2f} MB | {r['rss_delta_bytes'] / 1e6:.1f} MB | "
            f"{r.get('enhance_to_first_block_seconds', float('nan')):.2f} s | {r.get('enhance_tracemalloc_peak_bytes', 0) / 1e6:.1f} MB |"
        )
    L.append("")
    for r in pl["rows"]:
        if r.get("records"):
            L.append(
                f"Resume: listing {r['records']:,} done-records (one empty file per block, local disk) takes "
                f"{r['records_load_seconds']:.2f} s and {r['records_load_tracemalloc_peak_bytes'] / 1e6:.1f} MB of Python memory "
                f"(writing them took {r['records_write_seconds']:.1f} s); per million blocks that is "
                f"{r['records_load_seconds'] * 1e6 / r['records']:.0f} s and "
                f"{r['records_load_tracemalloc_peak_bytes'] * 1e6 / r['records'] / 1e9:.2f} GB."
            )
    L.append("")
    return L


if __name__ == "__main__":
    sys.exit(
        section_main(
            "Pipeline benchmark 3: client-side planning cost for 10^5 and 10^6 blocks.",
            "planning",
            section_planning,
            report_planning,
        )
    )
