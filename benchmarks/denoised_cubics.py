"""Which cubic after the blind denoiser, and how strong a filter (docs/fidelity.md, section 3b).

For every matrix case the tool denoises at its defaults: the denoiser followed by Keys cubic and by the
cubic B-spline, with the filter at full strength and weakened (its correction scaled by 0.75, 0.5,
0.25), each scored against the truth as the gain in fit-PSNR over the better plain cubic (real cases
also against the truth binned 2x2 laterally). The choice the tool made is in each row.

    python benchmarks/denoised_cubics.py                 # about 3 min on 2 cores
    python benchmarks/denoised_cubics.py CASE [CASE...]  # some cases (names as in quality.py --list)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import matrix  # noqa: E402
import quality  # noqa: E402
import svision_big  # noqa: E402
from svision_big import harmcheck  # noqa: E402
from svision_big.model import Model, StageRecord  # noqa: E402

DENOISED = [
    "beads-integrate-psf2.0-p1000-x2",
    "beads-cubic-psf1.5-p50-x211",
    "filaments-integrate-psf1.5-p200r1-x2",
    "nuclei-sample-psf2.5-p1000-x211",
    "nuclei-integrate-psf2.0-p50-x4",
    "nuclei-cubic-psf1.5-p1000-x411",
    "texture-cubic-psf1.5-p1000-x4",
    "texture-sample-psf2.0-p200r1-x211",
    "texture-integrate-nopsf-p50-x2",
    "texture-sample-nopsf-clean-x2",
    "real-cells3d_nuclei-sample-x2",
    "real-cells3d_nuclei-integrate-x211",
    "real-cells3d_nuclei-sample-x211",
    "real-rbc_lattice-sample-x211",
]
STRENGTHS = (1.0, 0.75, 0.5, 0.25)


def weakened(model: Model, a: float) -> Model:
    """The denoiser's correction (filter minus identity) scaled by ``a``: its last layer is linear."""
    s = model.stages[0]
    state = {k: (v * a if k.startswith("expand") else v.clone()) for k, v in s.state.items()}
    rec = StageRecord(s.config, state, s.degradation, s.bp_iters, s.ensemble, s.report, s.kind)
    return Model(stages=[rec, *model.stages[1:]], norm=model.norm, factors=model.factors, info=model.info)


def gain(truth: np.ndarray, y: np.ndarray, lr: np.ndarray, f, post=lambda v: v) -> float:
    """fit-PSNR of ``y`` over the better plain cubic, both after ``post`` (and the truth too)."""
    t = post(truth)
    dr = float(t.max() - t.min())
    fit = [
        quality.scores(t, post(fn(lr, f)), dr, with_ssim=False)["fit_psnr"] for fn in quality.CUBIC_VARIANTS.values()
    ]
    return round(quality.scores(t, post(y), dr, with_ssim=False)["fit_psnr"] - max(fit), 3)


def run(name: str, case) -> dict | None:
    inp = quality.make_inputs(case)
    truth, lr, f = inp["truth"], inp["lr"], case.factors
    model = svision_big.fit(lr, factor=f, seed=0, quiet=True)
    if not model.info.get("denoiser"):
        return None
    row = {"case": name, "chosen": model.info["baseline"]["safe"], "check": model.info["baseline"]["scores"]}
    for a in STRENGTHS:
        m = model if a == 1.0 else weakened(model, a)
        for interp in ("keys", "bspline"):
            y = np.asarray(harmcheck.cubic_baseline(m, interp).enhance(lr), dtype=np.float32)
            row[f"{interp}@{a}"] = gain(truth, y, lr, f)
            if inp["kind"] == "real":
                row[f"{interp}@{a} binned"] = gain(truth, y, lr, f, quality.binned)
    return row


def main(argv: list[str]) -> int:
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    cases = {c.name: c for c in [*matrix.CASES, *quality.REAL_CASES]}
    rows = []
    print("| case | chosen | Keys | B-spline | Keys 0.5 | B-spline 0.5 | check B-spline/Keys |")
    print("|---|---|---|---|---|---|---|")
    for name in argv or DENOISED:
        t0 = time.perf_counter()
        row = run(name, cases[name])
        if row is None:
            print(f"| {name} | not denoised | | | | | |", flush=True)
            continue
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        ratio = row["check"]["denoised B-spline"] / row["check"]["denoised cubic"]
        print(
            f"| {name} | {row['chosen']} | {row['keys@1.0']:+.2f} | {row['bspline@1.0']:+.2f} | "
            f"{row['keys@0.5']:+.2f} | {row['bspline@0.5']:+.2f} | {ratio:.3f} |",
            flush=True,
        )
    out = HERE / "results" / "denoised_cubics.json"
    out.write_text(json.dumps({"command": ["python", *sys.argv], "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
