"""Quality benchmark: does the Self-Vision operator beat cubic upsampling on data with a known truth?

One command, no downloads. For each case it simulates a volume (beads / filaments / mixed,
blurred by an anisotropic Gaussian PSF, block-averaged to low resolution, plus noise), trains a
model on the low-res observation only (``svision_big.fit``, default training budget unless
``--steps``), and compares with the high-res truth:

* PSNR and SSIM over the whole volume (data range = the truth's max - min) for cubic upsampling
  (clamped at 0), the network alone (no ensemble, no back-projection), the network + 8-variant
  ensemble (no back-projection), and the full operator (``model.enhance``);
* bead FWHM, lateral (x) and axial (z), for bead cases: input (measured on the low-res
  observation and converted to high-res voxels), cubic, full operator, truth;
* training seconds and the settings the model chose from its own data (back-projection
  iterations per stage and for the closing full-factor back-projection, noise matching).

Targets (reported, not asserted): the full operator beats cubic by >= 1 dB PSNR and in SSIM.

    python benchmarks/quality.py                       # full default run (~25 min on 2 cores)
    python benchmarks/quality.py --extended            # + noisy x4 and x4x2x2 cases
    python benchmarks/quality.py --quick               # smoke test (< 1 min)
    python benchmarks/quality.py --steps 300 --only x2 # a subset, shorter training

Writes a markdown table to stdout and JSON (machine description + rows) to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# On a shared machine, OpenMP worker threads that spin-wait for each other get descheduled by the
# other tenants' processes, and every parallel region then costs milliseconds: we measured a 3D
# convolution 10-20x slower with 2 threads than with 1 on 2 busy cores. A passive wait policy
# avoids that (and costs nothing on an idle machine). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import svision_big  # noqa: E402
from svision_big.degrade import resize  # noqa: E402
from svision_big.metrics import bead_fwhm, psnr, ssim  # noqa: E402
from svision_big.operator import OperatorSpec, StageOp, enhance_array  # noqa: E402
from svision_big.synthetic import make_volume  # noqa: E402

TARGET_DB = 1.0  # the full operator should beat cubic by at least this much PSNR (and in SSIM)

# Acquisition conditions. "clean": 0.2% Gaussian read noise (of the clean maximum), a
# high-SNR recording. "noisy": Poisson shot noise with 100 photons at the brightest voxel
# (10% std there) plus 1% Gaussian read noise, a typical dim two-photon recording.
CONDITIONS = {
    "clean": {"noise": 0.002, "poisson_peak": None},
    "noisy": {"noise": 0.01, "poisson_peak": 100.0},
}

# PSF: lateral FWHM 1.5 low-res voxels, i.e. the recording is *under*-sampled laterally (the
# paper's simulated beads: 6.7 high-res px at x4, 1.7 low-res px), axial FWHM 2.5x the lateral
# (in high-res voxels, as in make_volume's default). make_volume's own default (2 low-res voxels)
# is close to Nyquist sampling, where cubic interpolation already recovers nearly everything.
PSF_LATERAL_LR = 1.5
PSF_AXIAL_RATIO = 2.5


def psf_for(factors: tuple[int, ...]) -> tuple[float, ...]:
    lat = [PSF_LATERAL_LR * f for f in factors[1:]]
    return (PSF_AXIAL_RATIO * float(np.mean(lat)), *lat)

# (name, kind, factor, low-res shape, condition). Low-res lateral size 96 lets training hold
# aside a validation slab disjoint from its training crops (it needs >= 3 patches of 32 high-res
# voxels along the longest lateral axis at the first stage). Training time is set by the step
# budget, not the volume: 20-30 s per x2 stage on 2 cores at the default 500 steps (every stage,
# the z-only (2, 1, 1) one included, trains on 16^3 low-res patches). The default run covers each
# factor once on clean beads plus one noisy x2 case (198 s in session 3), and --extended adds the
# noisy x4 and x4x2x2 cases.
DEFAULT_CASES = [
    ("x2-beads-clean", "beads", 2, (24, 96, 96), "clean"),
    ("x2-mixed-noisy", "mixed", 2, (24, 96, 96), "noisy"),
    ("x4-beads-clean", "beads", 4, (16, 96, 96), "clean"),
    ("x422-beads-clean", "beads", (4, 2, 2), (16, 96, 96), "clean"),
]
EXTENDED_CASES = [
    ("x4-mixed-noisy", "mixed", 4, (16, 96, 96), "noisy"),
    ("x422-filaments-noisy", "filaments", (4, 2, 2), (16, 96, 96), "noisy"),
]
QUICK_CASES = [
    ("x2-beads-clean", "beads", 2, (12, 48, 48), "clean"),
    ("x422-mixed-noisy", "mixed", (4, 2, 2), (8, 16, 16), "noisy"),  # two stages, anisotropic, noise
]
QUICK_STEPS = 100


# --------------------------------------------------------------------------- machine


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    commit = None
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": affinity, "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_avg_1min_at_start": load,
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "svision_big": svision_big.__version__, "git": commit,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- methods


def factors_of(factor, ndim: int = 3) -> tuple[int, ...]:
    return (int(factor),) * ndim if np.ndim(factor) == 0 else tuple(int(f) for f in factor)


def cubic(observed: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """The baseline: the same antialiased-cubic (MATLAB imresize) kernel the method uses, clamped at 0."""
    up = resize(torch.from_numpy(np.ascontiguousarray(observed, dtype=np.float32)), factors, up=True)
    return up.clamp(min=0).numpy()


def partial_spec(model, ensemble: bool) -> OperatorSpec:
    """The trained networks without back-projection (and, if not ``ensemble``, on one variant only)."""
    spec = model.spec()
    stages = tuple(StageOp(s.net, s.degradation, 0, ensemble) for s in spec.stages)
    return OperatorSpec(stages, spec.norm, spec.final, 0)


def quality(truth: np.ndarray, test: np.ndarray, data_range: float) -> dict:
    return {"psnr": round(psnr(truth, test, data_range), 3), "ssim": round(ssim(truth, test, data_range), 4)}


def fwhm(volume: np.ndarray, scale: tuple[int, ...] = (1, 1, 1)) -> dict:
    """Median bead FWHM along x (lateral) and z (axial), in high-res voxels (``scale`` converts low-res)."""
    lat = bead_fwhm(volume, axis=-1, n_beads=20) * scale[-1]
    ax = bead_fwhm(volume, axis=0, n_beads=20) * scale[0]
    return {"lateral": None if math.isnan(lat) else round(lat, 2), "axial": None if math.isnan(ax) else round(ax, 2)}


def chosen_settings(model) -> dict:
    stages = []
    for rec in model.stages:
        rep = rec.report
        stages.append({
            "factors": list(rec.degradation.factors), "bp_iters": rec.bp_iters,
            "noise_matching": rec.degradation.noise is not None,
            "noise_model": None if rec.degradation.noise is None else [round(float(v), 6) for v in rec.degradation.noise],
            "bp_val_mse": rep.get("bp_val_mse"), "best_step": rep.get("best_step"), "steps": rep.get("steps"),
            "val_loss": rep.get("val_loss"), "val_disjoint": rep.get("val_disjoint"), "seconds": rep.get("seconds"),
            "parameters": rep.get("parameters"),
        })
    return {"stages": stages, "final_bp_iters": model.final_bp_iters,
            "final_bp_val_mse": model.info.get("final_bp_val_mse")}


# --------------------------------------------------------------------------- one case


def run_case(name: str, kind: str, factor, shape_lr: tuple[int, ...], condition: str, steps: int | None,
             seed: int, verbose: bool) -> dict:
    factors = factors_of(factor)
    acq = make_volume(kind, shape_lr, factor, psf_fwhm=psf_for(factors), seed=seed, **CONDITIONS[condition])
    truth, obs = acq.truth, acq.observed
    dr = float(truth.max() - truth.min())

    t0 = time.perf_counter()
    model = svision_big.fit(obs, factor=factor, steps=steps, seed=seed, quiet=not verbose)
    fit_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    full = model.enhance(obs, dtype="float32")
    enhance_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    full16 = model.enhance(obs, dtype="float32", precision="bfloat16")
    enhance16_s = time.perf_counter() - t0
    net = enhance_array(obs, partial_spec(model, ensemble=False), dtype="float32")
    ens = enhance_array(obs, partial_spec(model, ensemble=True), dtype="float32")
    cub = cubic(obs, factors)

    q = {"cubic": quality(truth, cub, dr), "network": quality(truth, net, dr),
         "ensemble": quality(truth, ens, dr), "full": quality(truth, full, dr),
         "full_bfloat16": quality(truth, full16, dr)}
    gain_db = q["full"]["psnr"] - q["cubic"]["psnr"]
    gain_ssim = q["full"]["ssim"] - q["cubic"]["ssim"]
    row = {
        "case": name, "kind": kind, "factor": list(factors), "condition": condition, **CONDITIONS[condition],
        "psf_fwhm_hr": [round(p, 2) for p in acq.psf_fwhm], "shape_lr": list(obs.shape), "shape_hr": list(truth.shape),
        "seed": seed, "steps": model.info.get("steps"), "fit_seconds": round(fit_s, 1),
        "enhance_seconds": round(enhance_s, 1), "enhance_bfloat16_seconds": round(enhance16_s, 1), "quality": q,
        "bfloat16_max_abs_diff_of_range": float(np.abs(full16 - full).max()) / dr,
        "gain_db": round(gain_db, 3), "gain_ssim": round(gain_ssim, 4),
        "target_met": bool(gain_db >= TARGET_DB and gain_ssim > 0),
        "settings": chosen_settings(model),
    }
    if kind == "beads":
        row["bead_fwhm"] = {"input": fwhm(obs, factors), "cubic": fwhm(cub), "full": fwhm(full), "truth": fwhm(truth)}
    return row


# --------------------------------------------------------------------------- report


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def settings_text(row: dict) -> str:
    s = row["settings"]
    bp = "/".join(str(st["bp_iters"]) for st in s["stages"])
    nm = "/".join("on" if st["noise_matching"] else "off" for st in s["stages"])
    out = f"bp {bp}"
    if len(s["stages"]) > 1:
        out += f", final {s['final_bp_iters']}"
    return out + f"; noise {nm}"


def _bf16_text(r: dict) -> str:
    q = r["quality"].get("full_bfloat16")
    if q is None:
        return "-"
    return (f"{q['psnr'] - r['quality']['full']['psnr']:+.3f} dB, {q['ssim'] - r['quality']['full']['ssim']:+.4f}, "
            f"{r['bfloat16_max_abs_diff_of_range']:.1e} of range")


def factor_text(f: list[int]) -> str:
    return f"x{f[0]}" if len(set(f)) == 1 else "x" + "x".join(map(str, f))


def markdown(rows: list[dict]) -> str:
    head = ("| case | factor | data | low-res shape | PSNR cubic / net / ens / full (dB) | gain (dB) "
            "| SSIM cubic / net / ens / full | target | chosen settings | fit (s) | bfloat16: PSNR, SSIM, max diff |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        q = r["quality"]
        psnrs = " / ".join(f"{q[k]['psnr']:.2f}" for k in ("cubic", "network", "ensemble", "full"))
        ssims = " / ".join(f"{q[k]['ssim']:.3f}" for k in ("cubic", "network", "ensemble", "full"))
        lines.append(f"| {r['case']} | {factor_text(r['factor'])} | {r['kind']}, {r['condition']} "
                     f"| {'x'.join(map(str, r['shape_lr']))} | {psnrs} | {r['gain_db']:+.2f} | {ssims} "
                     f"| {'met' if r['target_met'] else 'MISSED'} | {settings_text(r)} | {r['fit_seconds']:.0f} "
                     f"| {_bf16_text(r)} |")
    beads = [r for r in rows if "bead_fwhm" in r]
    if beads:
        lines += ["", "Bead FWHM (median of the 20 brightest isolated beads, high-res voxels; input measured on the "
                  "low-res observation x factor):", "",
                  "| case | lateral input / cubic / full / truth | axial input / cubic / full / truth |",
                  "|---|---|---|"]
        for r in beads:
            b = r["bead_fwhm"]
            lat = " / ".join(_f(b[k]["lateral"]) for k in ("input", "cubic", "full", "truth"))
            ax = " / ".join(_f(b[k]["axial"]) for k in ("input", "cubic", "full", "truth"))
            lines.append(f"| {r['case']} | {lat} | {ax} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per stage (default: the package default)")
    p.add_argument("--quick", action="store_true", help=f"tiny volumes, {QUICK_STEPS} steps (smoke test, < 1 min)")
    p.add_argument("--extended", action="store_true", help="also run the noisy x4 and x4x2x2 cases")
    p.add_argument("--only", default=None, help="run only cases whose name contains this text (e.g. x2, beads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality.json"))
    p.add_argument("--verbose", action="store_true", help="show training progress")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cases = QUICK_CASES if args.quick else DEFAULT_CASES + (EXTENDED_CASES if args.extended else [])
    if args.only:
        cases = [c for c in cases if args.only in c[0]]
        if not cases:
            p.error(f"no case name contains '{args.only}'")
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else None)

    info = machine()
    print(f"# quality benchmark: {len(cases)} cases, steps {steps or 'default'}, {info['cpu']}, "
          f"{info['usable_cores']} cores, torch {info['torch']} ({info['torch_threads']} threads)", flush=True)
    t_all = time.perf_counter()
    rows = []
    for c in cases:
        t0 = time.perf_counter()
        row = run_case(*c, steps=steps, seed=args.seed, verbose=args.verbose)
        row["case_seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        q = row["quality"]
        print(f"{row['case']}: PSNR cubic {q['cubic']['psnr']:.2f}, net {q['network']['psnr']:.2f}, "
              f"ens {q['ensemble']['psnr']:.2f}, full {q['full']['psnr']:.2f} dB ({row['gain_db']:+.2f}); "
              f"SSIM {q['cubic']['ssim']:.3f} -> {q['full']['ssim']:.3f}; {settings_text(row)}; "
              f"target {'met' if row['target_met'] else 'MISSED'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    total = time.perf_counter() - t_all

    table = markdown(rows)
    print()
    print(table)
    print(f"\ntotal {total:.0f} s; target: full operator >= cubic + {TARGET_DB:g} dB PSNR and higher SSIM "
          f"({sum(r['target_met'] for r in rows)}/{len(rows)} met)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "quality", "machine": info, "quick": args.quick, "steps": steps or "default",
              "conditions": CONDITIONS, "target_db": TARGET_DB, "total_seconds": round(total, 1), "rows": rows,
              "table": table}
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
