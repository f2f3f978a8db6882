"""Why noisy data trail cubic: the noise estimate against the truth, and what the held-aside check
prefers against what the truth prefers.

For each noisy x2 case of ``benchmarks/quality.py`` (same simulation, seed 0) it prints:

* per intensity bin, the noise variance ``svision_big.noise`` estimates from the observation
  and the true variance (observation minus its noise-free recording), and both fitted models;
* one trained x2 stage (default budget, noise matching as ``fit`` decides), with its learned
  correction scaled by a (output = cubic + a x correction) and 0 or 1 back-projection
  iterations: the mean squared error on the held-aside check crops against PSNR/SSIM against
  the truth.

    python benchmarks/noisy_check.py            # ~2 min on 2 cores
    python benchmarks/noisy_check.py --out F.json

Writes the rows as JSON to ``--out`` (default ``benchmarks/results/noisy_check.json``).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import quality as Q  # noqa: E402
from svision_big.degrade import Degradation  # noqa: E402
from svision_big.noise import noise_bins  # noqa: E402
from svision_big.operator import OperatorSpec, StageOp, back_project, enhance_array, predict  # noqa: E402
from svision_big.synthetic import downsample_mean, make_volume  # noqa: E402

T = importlib.import_module("svision_big.train")  # the module (the package exports a function of that name)
noisecheck = importlib.import_module("svision_big.noisecheck")
CASES = [("x2-mixed-noisy", "mixed"), ("x2-filaments-noisy", "filaments")]
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)


def scaled(net, a: float):
    """The same network with its correction multiplied by ``a`` (the expansion conv is its last linear step)."""
    n = copy.deepcopy(net)
    with torch.no_grad():
        n.expand.weight.mul_(a)
        n.expand.bias.mul_(a)
    return n


def noise_rows(obs: np.ndarray, truth: np.ndarray, norm) -> dict:
    v = norm.forward(torch.from_numpy(obs.astype(np.float32))).numpy()
    clean = (downsample_mean(truth, (2, 2, 2)) - norm.lo) / (norm.hi - norm.lo)
    res = v - clean
    b = noise_bins(v)
    bins = []
    for x, var in zip(b.x, b.var):
        sel = np.abs(clean - x) < 0.02 + 0.1 * x  # voxels whose noise-free value is near the bin's
        bins.append({"intensity": float(x), "estimated_var": float(var), "true_var": float(res[sel].var())})
    a = np.stack([clean.ravel(), np.ones(clean.size)], 1)
    gain, offset = np.linalg.lstsq(a, (res.ravel() - res.mean()) ** 2, rcond=None)[0]
    est = b.least_squares()
    return {"bins": bins, "estimated": [est.gain, est.offset], "true": [float(gain), float(offset)]}


def run_case(name: str, kind: str) -> dict:
    factors = (2, 2, 2)
    acq = make_volume(kind, (24, 96, 96), 2, psf_fwhm=Q.psf_for(factors), seed=0, **Q.CONDITIONS["noisy"])
    truth, obs = acq.truth, acq.observed
    dr = float(truth.max() - truth.min())
    norm = T.measure_normalisation(obs)
    v = norm.forward(torch.from_numpy(obs.astype(np.float32))).numpy()
    nm = noisecheck.choose_noise(v, "auto")
    deg = Degradation(factors, None, None if nm is None else (nm.gain, nm.offset))
    t0 = time.perf_counter()
    net, val, _ = T.train_stage(v, deg, T.TrainConfig(quiet=True))
    checks = T._check_pairs(val, deg)
    row = {
        "case": name,
        "noise": noise_rows(obs, truth, norm),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "cubic": Q.quality(truth, Q.cubic(obs, factors), dr),
        "scales": [],
    }
    for a in SCALES:
        na = scaled(net, a)
        entry = {"a": a}
        for bp in (0, 1):
            with torch.inference_mode():
                errs = []
                for lr, hr in checks:
                    y = predict(na, lr, True).clamp_(min=norm.floor_n)
                    errs.append(torch.mean((back_project(y, lr, deg, bp, norm.floor_n) - hr) ** 2).item())
            out = enhance_array(obs, OperatorSpec((StageOp(na, deg, bp, True),), norm), dtype="float32")
            entry[f"bp{bp}"] = {"check_mse": float(np.mean(errs)), **Q.quality(truth, out, dr)}
        row["scales"].append(entry)
    return row


def markdown(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        n = r["noise"]
        lines += [
            f"#### {r['case']}",
            "",
            "| mean intensity (normalised) | " + " | ".join(f"{b['intensity']:.3f}" for b in n["bins"]) + " |",
            "|---|" + "---|" * len(n["bins"]),
            "| estimated variance | " + " | ".join(f"{b['estimated_var']:.5f}" for b in n["bins"]) + " |",
            "| true variance | " + " | ".join(f"{b['true_var']:.5f}" for b in n["bins"]) + " |",
            "",
            f"Fitted var = gain x I + offset: estimated gain {n['estimated'][0]:.4f}, offset {n['estimated'][1]:.6f}; "
            f"true gain {n['true'][0]:.4f}, offset {n['true'][1]:.6f}.",
            "",
            f"Cubic: {r['cubic']['psnr']:.2f} dB, SSIM {r['cubic']['ssim']:.4f}.",
            "",
            "| a (output = cubic + a x correction) | check MSE, bp 0 | truth, bp 0 (dB / SSIM) | check MSE, bp 1 | truth, bp 1 |",
            "|---|---|---|---|---|",
        ]
        for e in r["scales"]:
            lines.append(
                f"| {e['a']} | {e['bp0']['check_mse']:.6g} | {e['bp0']['psnr']:.2f} / {e['bp0']['ssim']:.4f} "
                f"| {e['bp1']['check_mse']:.6g} | {e['bp1']['psnr']:.2f} / {e['bp1']['ssim']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "noisy_check.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    for name, kind in CASES:
        print(f"{name}: training one x2 stage ...", file=sys.stderr, flush=True)
        rows.append(run_case(name, kind))
    print(markdown(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"machine": Q.machine(), "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}, fh, indent=1)
    print(f"total {time.perf_counter() - t0:.0f} s; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
