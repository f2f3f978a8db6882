"""``svision-big enhance --skip-background`` on a sparse volume, timed as a whole command.

A uint16 volume that is 70% background: beads fill 11 of the 36 blocks (a contiguous "tissue"
region, kept 24 input voxels inside its blocks), the rest is an offset of 100 with read noise
(std ~15) and a few stray hot voxels (one voxel of 400 each: above the threshold on level 0,
below it on the coarse level that decides). The same command is run without and with
``--skip-background`` (fresh process each, default local cluster and blocks, the default
architecture's random-weight model, ``pipeline_common.build_model``), and the outputs compared
block by block: computed blocks must be bit-equal; in skipped blocks the largest difference to
the unskipped output is reported for the fill the pipeline writes (cubic upsampling of the
input) and for the alternative (the operator's output for a uniform input at the background
level).

    flock /tmp/svb-bench.lock python benchmarks/skip_background.py            # network only (bp 0)
    flock /tmp/svb-bench.lock python benchmarks/skip_background.py --bp 0 1   # and network + back-projection

Prints a markdown table, writes JSON to benchmarks/results/skip_background.json.
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
import numpy as np  # noqa: E402

from pipeline_common import DATA_LO, build_model, machine  # noqa: E402

SHAPE = (64, 768, 768)  # input; output 128 x 1536 x 1536 = 302 M voxels, 36 blocks of 128x256x256 at the defaults
BLOCK_IN = 128  # input voxels per default block (256 output voxels at x2) along y and x
TISSUE = [(y, x) for y in range(3) for x in range(4)][:11]  # 11 of the 6 x 6 blocks hold beads
MARGIN = 24  # input voxels between the beads and their blocks' edges
STRAY = [(16, 700, 100), (40, 400, 650), (60, 720, 720)]  # hot voxels in the background (z, y, x)


def make_volume(seed: int = 0) -> np.ndarray:
    from svision_big.synthetic import beads

    rng = np.random.default_rng(seed)
    obj = np.zeros(SHAPE, np.float32)
    for by, bx in TISSUE:
        y0, x0 = by * BLOCK_IN + MARGIN, bx * BLOCK_IN + MARGIN
        side = BLOCK_IN - 2 * MARGIN
        obj[:, y0 : y0 + side, x0 : x0 + side] = beads(
            (SHAPE[0], side, side), n=400, radius=(1.5, 4.0), rng=rng, intensity=(500.0, 2000.0)
        )
    v = DATA_LO + obj
    v += rng.standard_normal(SHAPE, dtype=np.float32) * np.sqrt(v) * 1.5
    for z, y, x in STRAY:
        v[z, y, x] = 400.0
    return np.clip(np.rint(v), 0, 65535).astype(np.uint16)


def run(inp: str, out: Path, model: str, skip: bool) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "svision_big.cli", "enhance", inp, str(out), "--model", model, "--quiet"]
    if skip:
        cmd.append("--skip-background")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"enhance exited {r.returncode}: {r.stderr.strip()}")
    return {"seconds": round(seconds, 2), "report": r.stdout.strip().splitlines()[-1]}


def uniform_response(model, level: float) -> float:
    """The operator's output for a uniform input at ``level`` (raw), away from the faces."""
    from svision_big.operator import enhance_array

    y = enhance_array(np.full((24, 48, 48), level, np.float32), model.spec(), dtype="float32")
    return float(y[24, 48, 48])


def compare(vol: np.ndarray, ref: str, out: str, model, rec: dict) -> dict:
    """Block by block: computed blocks bit-equal? skipped blocks' largest differences, both fills."""
    from svision_big.ngff import open_image

    a, b = open_image(ref).level(0), open_image(out).level(0)
    c = np.float32(np.rint(uniform_response(model, rec["coarse_background"][0])))
    bz, by, bx = 2 * SHAPE[0], 2 * BLOCK_IN, 2 * BLOCK_IN
    skipped = computed = 0
    worst = {"cubic": 0.0, "uniform": 0.0}
    sums = {"cubic": 0.0, "uniform": 0.0}
    voxels = 0
    missed, missed_max = 0, 0.0
    t = rec["threshold"][0]
    for z in range(0, a.shape[0], bz):
        for y in range(0, a.shape[1], by):
            for x in range(0, a.shape[2], bx):
                w = (slice(z, z + bz), slice(y, y + by), slice(x, x + bx))
                aw, bw = np.asarray(a[w]), np.asarray(b[w])
                if np.array_equal(aw, bw):
                    computed += 1
                    continue
                skipped += 1
                ref_w = aw.astype(np.float32)
                for name, fill in (("cubic", bw.astype(np.float32)), ("uniform", c)):
                    d = np.abs(ref_w - fill)
                    worst[name] = max(worst[name], float(d.max()))
                    sums[name] += float(d.sum())
                voxels += ref_w.size
                src = vol[tuple(slice(s.start // 2, s.stop // 2) for s in w)]
                missed += int(np.count_nonzero(src > t))
                missed_max = max(missed_max, float(src.max()))
    return {
        "blocks_computed_bit_equal": computed,
        "blocks_skipped_seen": skipped,
        "max_abs_diff_cubic_fill": worst["cubic"],
        "max_abs_diff_uniform_fill": worst["uniform"],
        "mean_abs_diff_cubic_fill": round(sums["cubic"] / max(1, voxels), 4),
        "mean_abs_diff_uniform_fill": round(sums["uniform"] / max(1, voxels), 4),
        "uniform_fill_value": float(c),
        "input_voxels_above_threshold_in_skipped_blocks": missed,
        "input_max_in_skipped_blocks": missed_max,
    }


def trained_fills(vol: np.ndarray, steps: int) -> dict:
    """The two fills against a model *trained* on this volume (``fit``, in memory, on a region of
    two tissue and four background blocks): the largest and mean differences to the operator's
    output where the input around is background (32+ input voxels beyond the last bead)."""
    from svision_big.harmcheck import cubic_baseline
    from svision_big.operator import enhance_array
    from svision_big.train import fit

    crop = vol[:, 0 : 2 * BLOCK_IN, 3 * BLOCK_IN :]
    t0 = time.perf_counter()
    model = fit(crop, factor=2, steps=steps, quiet=True)
    fit_s = time.perf_counter() - t0
    y = enhance_array(crop, model.spec(), dtype="uint16").astype(np.float32)
    cubic = enhance_array(crop, cubic_baseline(model).spec(), dtype="uint16").astype(np.float32)
    level = float(np.median(vol[:, 5 * BLOCK_IN :, 5 * BLOCK_IN :]))
    u = np.float32(np.rint(uniform_response(model, level)))
    x0 = 2 * (BLOCK_IN - MARGIN + 32)  # output x in the crop beyond the tissue's last bead + 32 input voxels
    bg = (slice(None), slice(None), slice(x0, None))
    dc, du = np.abs(y[bg] - cubic[bg]), np.abs(y[bg] - u)
    return {
        "steps": steps,
        "fit_seconds": round(fit_s, 1),
        "verdict": model.info.get("baseline", {}).get("verdict"),
        "max_abs_diff_cubic_fill": float(dc.max()),
        "max_abs_diff_uniform_fill": float(du.max()),
        "mean_abs_diff_cubic_fill": round(float(dc.mean()), 4),
        "mean_abs_diff_uniform_fill": round(float(du.mean()), 4),
        "uniform_fill_value": float(u),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--bp", type=int, nargs="+", default=[0], help="back-projection iterations of the models (1: two passes)"
    )
    ap.add_argument("--trained", type=int, metavar="STEPS", help="only compare the fills for a model trained so long")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each command (the fastest is reported)")
    ap.add_argument("--workdir", default=str(Path(__file__).resolve().parent / ".cache" / "skip_background"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "skip_background.json"))
    args = ap.parse_args(argv)
    from svision_big.convert import write_ome_zarr

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    vol = make_volume()
    inp = work / f"input_{'x'.join(map(str, SHAPE))}.ome.zarr"  # deterministic: made once
    if not (inp / ".complete-v1").exists():
        shutil.rmtree(inp, ignore_errors=True)
        write_ome_zarr(vol, inp, axes="zyx")
        (inp / ".complete-v1").write_text("ok")
    if args.trained:
        res = trained_fills(vol, args.trained)
        print(json.dumps(res))
        path = Path(args.out)
        results = json.loads(path.read_text()) if path.exists() else {}
        results["trained"] = res
        path.write_text(json.dumps(results, indent=1))
        return 0
    for bp in args.bp:
        measure(vol, str(inp), work, bp, args.repeat, Path(args.out))
    return 0


def measure(vol: np.ndarray, inp: str, work: Path, bp: int, repeat: int, path: Path) -> None:
    """Both commands for one model, compared; one markdown row; the JSON updated."""
    from svision_big.ngff import open_image

    model = build_model(bp=bp)
    model_path = str(model.save(work / f"model_bp{bp}.svb"))
    ref, out = work / "ref.ome.zarr", work / "skip.ome.zarr"
    times = {"off": [], "on": []}
    for _ in range(repeat):
        times["off"].append(run(inp, ref, model_path, skip=False))
        times["on"].append(run(inp, out, model_path, skip=True))
    rec = open_image(str(out)).group.attrs["svision_big"]["skip_background"]
    cmp = compare(vol, str(ref), str(out), model, rec)
    off = min(r["seconds"] for r in times["off"])
    on = min(r["seconds"] for r in times["on"])
    row = {
        "input": list(SHAPE),
        "output_voxels": 8 * int(np.prod(SHAPE)),
        "bp": bp,
        "passes": len(rec["blocks_skipped_per_pass"]),
        "seconds_without": off,
        "seconds_with": on,
        "speedup": round(off / on, 2),
        "blocks": rec["blocks"],
        "blocks_skipped": rec["blocks_skipped"],
        "blocks_skipped_per_pass": rec["blocks_skipped_per_pass"],
        "threshold": rec["threshold"],
        "coarse_level": rec["coarse_level"],
        "coarse_threshold": rec["coarse_threshold"],
        "runs": times,
        **cmp,
    }
    print(
        "| input | passes | without (s) | with (s) | speedup | blocks skipped | computed blocks bit-equal | "
        "max abs diff in skipped blocks, cubic fill | ... uniform fill | input voxels > T missed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {'x'.join(map(str, SHAPE))} uint16 | {row['passes']} | {off:.1f} | {on:.1f} | {row['speedup']:.2f}x | "
        f"{row['blocks_skipped']} of {row['blocks']} (per pass {row['blocks_skipped_per_pass']}) | "
        f"{cmp['blocks_computed_bit_equal']} | {cmp['max_abs_diff_cubic_fill']:.0f} (mean "
        f"{cmp['mean_abs_diff_cubic_fill']:.2f}) | {cmp['max_abs_diff_uniform_fill']:.0f} (mean "
        f"{cmp['mean_abs_diff_uniform_fill']:.2f}) | {cmp['input_voxels_above_threshold_in_skipped_blocks']} "
        f"(max {cmp['input_max_in_skipped_blocks']:.0f}, T {row['threshold'][0]:g}) |"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = machine()
    results[f"bp{bp}"] = row
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
