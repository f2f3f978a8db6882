"""The command a user runs, timed as a whole: ``svision-big enhance IN OUT --model M`` at its
defaults, from process start to metadata written, with the peak RSS of the whole process tree
(CLI, scheduler, workers) and the startup: seconds from process start to the first pass's first
progress line (cluster up, input opened, plans made), and to the first finished block.

    python benchmarks/whole_command.py                 # 50 M output voxels (96x256x256 -> x2)
    python benchmarks/whole_command.py --sizes 64M,512M  # 8x apart, both whole 256^3 output blocks
    python benchmarks/whole_command.py --sizes 512M,4G   # 8x apart again, both mostly interior blocks (long)
    python benchmarks/whole_command.py --scale         # also 400 M and 3.2 G output voxels (long)

Each row also gives the rate against the in-memory operator (``operator.enhance_array`` on one
default block, 128^3 -> 256^3, all cores, same precision); with 64M and 512M both run, the
ratio of their peaks says how flat memory is.

Random-weight model of the default architecture (``svision_big.testing.make_model``, ensemble 8,
no back-projection): speed does not depend on the weights. Prints a markdown table, writes JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_common import TreeSampler, build_model, machine, make_input  # noqa: E402

SIZES = {
    "50M": (96, 256, 256),
    "64M": (128, 256, 256),
    "400M": (192, 512, 512),
    "512M": (256, 512, 512),
    "3.2G": (384, 1024, 1024),
    "4G": (512, 1024, 1024),  # 8x 512M, both in whole default blocks: the memory-flatness pair
}


def in_memory_rate(model_path: str, precision: str) -> float:
    """Output voxels/s of the in-memory operator on one default block (best of 2), in a fresh
    process with every core: the ceiling the whole command is measured against."""
    code = (
        "import os, time, numpy as np, torch\n"
        "from svision_big.model import load_model\n"
        "from svision_big.operator import enhance_array, resolve_precision\n"
        "torch.set_num_threads(len(os.sched_getaffinity(0)))\n"
        f"spec = load_model({model_path!r}).spec('cpu', resolve_precision({precision!r}))\n"
        "x = np.random.default_rng(0).random((128, 128, 128), dtype=np.float32)\n"
        "enhance_array(x[:16, :32, :32], spec)\n"
        "best = 1e9\n"
        "for _ in range(2):\n"
        "    t0 = time.perf_counter(); enhance_array(x, spec); best = min(best, time.perf_counter() - t0)\n"
        "print(8 * x.size / best)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def import_seconds() -> float:
    """Seconds for a fresh interpreter to import the CLI (best of 3)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import svision_big.cli"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def run_enhance(inp: str, out: Path, model: str, precision: str) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "svision_big.cli", "enhance", inp, str(out), "--model", model, "--progress", "json"]
    cmd += ["--precision", precision]
    t0, wall0 = time.perf_counter(), time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler([proc.pid])
    sampler.start()
    first_line = first_block = None
    passes = []
    for line in proc.stdout:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") != "progress":
            continue
        if first_line is None:
            first_line = rec["time"] - wall0
        if first_block is None and rec.get("done", 0) >= 1 and rec.get("unit") == "blocks":
            first_block = rec["time"] - wall0
        if rec.get("done") == rec.get("total"):
            passes.append({"label": rec["label"], "elapsed_s": rec["elapsed_s"], "total": rec["total"]})
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    mem = sampler.stop()
    if rc != 0:
        raise SystemExit(f"enhance exited {rc}")
    return {
        "seconds": round(seconds, 2),
        "first_progress_s": None if first_line is None else round(first_line, 2),
        "first_block_s": None if first_block is None else round(first_block, 2),
        "peak_tree_gb": round(mem["peak_total_bytes"] / 2**30, 3),
        "processes": mem["processes"],
        "passes": passes,
    }


def main(argv=None) -> int:
    from svision_big.operator import resolve_precision

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", action="store_true", help="also 400 M and 3.2 G output voxels")
    ap.add_argument("--sizes", help=f"comma-separated, from {', '.join(SIZES)} (default 50M)")
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--ensemble", type=int, default=8, choices=[8, 4, 1], help="variants the model runs")
    ap.add_argument(
        "--interpolation",
        default="bspline",
        choices=["bspline", "keys"],
        help="what the residual corrects (trained models: bspline; its reach sets the halo)",
    )
    ap.add_argument("--workdir", default=str(Path(__file__).resolve().parent / ".cache" / "whole_command"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "whole_command.json"))
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(bp=0, ensemble=args.ensemble, interpolation=args.interpolation)
    model_path = model.save(work / f"model_e{args.ensemble}_{args.interpolation}.svb")
    rows = []
    imp = import_seconds()
    ref = in_memory_rate(model_path, args.precision)
    names = args.sizes.split(",") if args.sizes else ["50M", "400M", "3.2G"] if args.scale else ["50M"]
    for name in names:
        shape = SIZES[name]
        inp, _ = make_input(work, shape)
        res = run_enhance(inp, work / f"out_{name}.ome.zarr", model_path, args.precision)
        voxels = 8 * shape[0] * shape[1] * shape[2]
        rate = voxels / res["seconds"]
        res.update(
            size=name,
            input=list(shape),
            output_voxels=voxels,
            rate_mvox_s=round(rate / 1e6, 3),
            of_in_memory=round(rate / ref, 3),
        )
        rows.append(res)
        shutil.rmtree(work / f"out_{name}.ome.zarr", ignore_errors=True)
    print(f"import svision_big.cli: {imp:.2f} s (best of 3)")
    print(f"in-memory operator, one 256^3 output block, {args.precision}: {ref / 1e6:.2f} M output voxels/s\n")
    print(
        f"precision {args.precision} (this machine runs {resolve_precision(args.precision)}), ensemble {args.ensemble}, "
        f"residual on {args.interpolation} (halo {model.halo()} input voxels)\n"
    )
    print(
        "| output voxels | input | whole command (s) | M output voxels/s | of in-memory | first progress line (s) "
        "| first block done (s) | peak RSS, process tree (GB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {'x'.join(map(str, r['input']))} | {r['seconds']:.1f} | {r['rate_mvox_s']:.2f} | "
            f"{r['of_in_memory']:.2f} | {r['first_progress_s']} | {r['first_block_s']} | {r['peak_tree_gb']:.2f} |"
        )
    peaks = {r["size"]: r["peak_tree_gb"] for r in rows}
    flat = None
    if "64M" in peaks and "512M" in peaks:
        flat = round(peaks["512M"] / peaks["64M"], 3)
        print(f"\npeak memory 512M / 64M (8x the volume, whole blocks both): {flat:.3f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    used = resolve_precision(args.precision)
    result = {
        "machine": machine(),
        "precision": args.precision,
        "precision_used": used,
        "interpolation": args.interpolation,
        "halo": list(model.halo()),
        "import_s": imp,
        "in_memory_voxels_s": ref,
    }
    Path(args.out).write_text(json.dumps({**result, "flatness": flat, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
