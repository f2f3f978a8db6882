"""Pipeline benchmark 4, blocks and halo: each pass of the operator (network; back-projection at
2 and 10 iterations) on one interior block per size, in its own process, cropped and cast as a
task does (seconds, output voxels/s per core, peak RSS): the default blocks are chosen from this
table. Then ``BlockPlan.overhead()`` per pass at the default block and against block size, and
the work the network's unpadded convolutions repeat on halo sides.

    python benchmarks/pipeline_blocks.py             # default (about 5 min)
    python benchmarks/pipeline_blocks.py --quick
    python benchmarks/pipeline_blocks.py --only halo # the halo table alone (seconds, no child processes)
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: spinning threads on a shared 2-core machine cost orders of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pipeline_common import FACTORS, _mv, _set_threads, build_model, run_child


def child_blocks(spec: dict) -> dict:
    """One pass of the operator on one interior block of output side ``size`` (read region = block + the
    pass's own halo), one thread: seconds, output voxels/s counted on the *write* region (so the halo's
    recomputation is charged), and the process's peak RSS (the parent samples it)."""
    _set_threads(1)
    import torch

    from svision_big.halo import pass_halo
    from svision_big.passes import plan_passes, run_pass

    model = build_model(spec["bp"])
    mspec = model.spec()
    p = [q for q in plan_passes(mspec) if q.kind == spec["kind"]][0]
    halo = pass_halo(mspec, p)
    size = spec["size"]
    read = [size // f + 2 * h for f, h in zip(p.factors, halo)]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(read, generator=g) * 0.3
    comp = torch.rand([n * f for n, f in zip(read, p.factors)], generator=g) * 0.3 if p.companion else None
    run_pass(mspec, p, x[:20, :20, :20], comp[:40, :40, :40] if comp is not None else None)  # warm up
    from svision_big.passes import output_offset
    from svision_big.values import cast_output

    faces = ((False, False),) * 3  # an interior block: every side is halo
    off = output_offset(mspec, p, faces)
    crop = tuple(slice(h * f - o, h * f - o + size) for h, o, f in zip(halo, off, p.factors))
    reps, t0 = 0, time.perf_counter()
    while True:  # as execute.run_block: the pass, then crop to the owned region and cast
        y = run_pass(mspec, p, x, comp, faces)[crop].contiguous()
        cast_output(mspec.norm.inverse(y).numpy(), "uint16")
        del y
        reps += 1
        if time.perf_counter() - t0 >= spec.get("min_seconds", 0.0):
            break
    sec = (time.perf_counter() - t0) / reps
    write = size**3
    return {
        "kind": p.kind,
        "bp": spec["bp"],
        "size": size,
        "halo": list(halo),
        "read": read,
        "seconds": sec,
        "write_voxels_per_second": write / sec,
        "read_voxels_per_second": math.prod(n * f for n, f in zip(read, p.factors)) / sec,
    }


def section_blocks(cfg: dict, log) -> dict:
    """Each pass's speed and memory against block size, to choose the default blocks from numbers:
    bigger blocks repeat less halo but run slower per voxel on this CPU (caches) and need more memory."""
    rows = []
    for kind, bp in (("net", 0), ("bp", 2), ("bp", 10)):
        for size in cfg["block_sizes"][kind if kind == "net" else f"bp{bp}"]:
            log(f"blocks: {kind} pass (bp {bp}), block {size}^3")
            r = run_child({"mode": "blocks", "kind": kind, "bp": bp, "size": size, "min_seconds": cfg["block_seconds"]})
            r["peak_rss_bytes"] = r.pop("memory")["peak_total_bytes"]
            rows.append(r)
    return {"rows": rows}


def section_halo(cfg: dict, blocks: dict | None = None) -> dict:
    """Per pass (network, back-projection): halo and ``BlockPlan.overhead()`` at the default block and
    against block size, on a 34 G-voxel output, with the peak RSS measured in the blocks section."""
    from svision_big.halo import pass_halo
    from svision_big.passes import plan_passes
    from svision_big.pipeline import _default_pass_block
    from svision_big.plan import BlockPlan

    big_in = (1024, 4096, 4096)
    out_shape = tuple(n * f for n, f in zip(big_in, FACTORS))
    rows = []
    sizes = (128, 192, 256, 320, 384, 512)
    for bp in (0, 2, 5, 10):
        spec = build_model(bp).spec()
        for p in plan_passes(spec):
            halo = pass_halo(spec, p)
            d = min(_default_pass_block(p, halo), min(out_shape))
            row = {
                "bp": bp,
                "pass": p.kind,
                "halo": list(halo),
                "default_block": d,
                "default_overhead": BlockPlan(big_in, FACTORS, (d,) * 3, halo).overhead(),
                "by_block": [BlockPlan(big_in, FACTORS, (s,) * 3, halo).overhead() for s in sizes],
            }
            rows.append(row)
    # the network pass runs unpadded convolutions on halo sides: layer l computes only the write
    # region plus the radius the layers after it still need. Work-weighted by each layer's FLOPs:
    net = build_model(0).spec().stages[0].net
    layers, cum = [], 0
    for conv, _ in net.layers():
        r = conv.padding[0]
        cum += r
        flops = 2 * conv.in_channels * conv.out_channels * conv.kernel_size[0] ** 3
        layers.append((flops, net.conv_radius() - cum))

    def valid_overhead(size):
        w = size // FACTORS[0]
        work = sum(fl * (w + 2 * rest) ** 3 for fl, rest in layers)
        return work / sum(fl * w**3 for fl, _ in layers) - 1.0

    for row in rows:
        if row["pass"] == "net":
            row["valid_conv_by_block"] = [valid_overhead(s) for s in sizes]
            row["valid_conv_default"] = valid_overhead(row["default_block"])
    fused = {bp: list(build_model(bp).halo()) for bp in (0, 10)}
    single = {bp: BlockPlan(big_in, FACTORS, (128,) * 3, fused[bp]).overhead() for bp in fused}
    return {
        "volume_input": list(big_in),
        "rows": rows,
        "sizes": list(sizes),
        "single_pass_halo": fused,
        "single_pass_overhead_128": single,
    }


def run_blocks(cfg: dict, workdir: Path, log, only=("blocks", "halo")) -> dict:
    res = {}
    if "blocks" in only:
        res["blocks"] = section_blocks(cfg, log)
    if "halo" in only:
        res["halo"] = section_halo(cfg, res.get("blocks"))
    return res


def report_blocks(res: dict) -> list[str]:
    L = []
    if "blocks" not in res:
        return L
    L.append("### Each pass against block size (one thread, one interior block, cropped and cast as a task does)")
    L.append("")
    L.append("| pass | output block | halo | read side | seconds | output voxels/s per core | peak RSS |")
    L.append("|---|---|---|---|---|---|---|")
    for r in res["blocks"]["rows"]:
        L.append(
            f"| {r['kind']} (bp {r['bp']}) | {r['size']}^3 | {r['halo'][0]} | {r['read'][0]} | {r['seconds']:.2f} | "
            f"{_mv(r['write_voxels_per_second'])} | {r['peak_rss_bytes'] / 2**30:.2f} GB |"
        )
    L.append("")
    return L


def report_halo(res: dict) -> list[str]:
    L = []
    if "halo" not in res:
        return L
    h = res["halo"]
    L.append(
        "### 4. Halo overhead per pass (input voxels run through the pass more than once, fraction), "
        f"input {'x'.join(map(str, h['volume_input']))}"
    )
    L.append("")
    L.append("| model | pass | halo | " + " | ".join(f"{s}^3" for s in h["sizes"]) + " | at its default block |")
    L.append("|---|---|---|" + "---|" * (len(h["sizes"]) + 1))
    for r in h["rows"]:
        L.append(
            f"| bp {r['bp']} | {r['pass']} (input voxels read) | {r['halo'][0]} | "
            + " | ".join(f"{100 * o:.0f}%" for o in r["by_block"])
            + f" | {100 * r['default_overhead']:.0f}% ({r['default_block']}^3) |"
        )
        if "valid_conv_by_block" in r:
            L.append(
                f"| bp {r['bp']} | net, work computed (unpadded convolutions on halo sides, FLOP-weighted) | "
                f"{r['halo'][0]} | "
                + " | ".join(f"{100 * o:.0f}%" for o in r["valid_conv_by_block"])
                + f" | **{100 * r['valid_conv_default']:.0f}%** ({r['default_block']}^3) |"
            )
    L.append("")
    L.append(
        "Before passes (one sweep, network recomputed over back-projection's halo) at 128^3: "
        + ", ".join(
            f"bp {bp} halo {h['single_pass_halo'][bp][0]}: {100 * o:.0f}%"
            for bp, o in h["single_pass_overhead_128"].items()
        )
        + "."
    )
    L.append("")
    return L


def main(argv=None) -> int:
    from pipeline_common import finish, machine_line, parse_args, start

    args = parse_args(
        "Pipeline benchmark 4: each pass against block size, and halo overhead.",
        "pipeline_blocks",
        argv,
        extra=lambda ap: ap.add_argument("--only", default="blocks,halo", help="comma list: blocks,halo"),
    )

    def report(r):
        return "\n".join([machine_line(r), ""] + report_blocks(r) + report_halo(r))

    if args.report:
        with open(args.report) as fh:
            print(report(json.load(fh)))
        return 0
    res, cfg, workdir, log, t0 = start(args)
    res.update(run_blocks(cfg, workdir, log, tuple(args.only.split(","))))
    finish(res, args, t0, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
