"""Issue 26's lateral-to-axial method, measured on the anisotropic group before it is built into the tool.

A z-stack's lateral planes show its structure at full resolution. Degraded along y (or x) as z was
acquired -- the extra axial blur, point samples or block means at the z spacing -- they give training
pairs at exactly the scale the z axis needs, with no cross-scale assumption. A small 2D residual
network learns to undo that degradation; it then runs along z in the (z, y) and (z, x) planes and the
two are averaged.

Every quantity the method needs is given here from the case (oracle): the z spacing in lateral voxels
(the tool would read it from the voxel sizes), the extra axial blur (``--psf-fwhm``; the tool would
estimate it from the spectra) and the acquisition (``--acquisition``). ``--acquisition found`` uses the
one ``selfsim.estimate`` finds instead. Scores: fit-PSNR gain over the better of the cubics, as
``quality.py`` computes it, beside the tool's own gain on the same case (``results/quality_anisotropic.json``).

    python benchmarks/lateral_axial.py                 # the 4 clean anisotropic cases
    python benchmarks/lateral_axial.py --all           # all 8 (noisy inputs taken as they are)
    python benchmarks/lateral_axial.py --steps 600 --cases texture,nuclei

Prints a markdown table, appends JSON rows to ``results/lateral_axial.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import matrix  # noqa: E402
import quality  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
Z_SPACING = 4  # the anisotropic group's low-res plane spacing, in lateral voxels (matrix.ANISOTROPIC_CASES)


def gaussian_1d(x: np.ndarray, axis: int, fwhm: float) -> np.ndarray:
    if fwhm <= 0:
        return x
    return ndimage.gaussian_filter1d(x, fwhm / math.sqrt(8 * math.log(2)), axis=axis, mode="mirror")


def pairs(lr: np.ndarray, factor: int, z_spacing: int, extra_fwhm: float, acquisition: str):
    """(target, input upsampled by the B-spline) stacks from the lateral planes of ``lr``, degraded
    along their first axis as z was: extra blur, truth planes every z_spacing/factor voxels, then the
    acquisition by ``factor``. Both orientations (y and x degraded)."""
    step = z_spacing // factor
    targets, inputs = [], []
    for plane in (lr, np.swapaxes(lr, 1, 2)):
        b = gaussian_1d(plane.astype(np.float64), 1, extra_fwhm).astype(np.float32)
        t = matrix.acquire(b, (1, step, 1), "sample") if step > 1 else b
        n = t.shape[1] - t.shape[1] % factor
        t = t[:, :n]
        low = matrix.acquire(t, (1, factor, 1), acquisition)
        up = ndimage.zoom(low, (1, factor, 1), order=3, grid_mode=True, mode="grid-mirror")
        targets.append(t)
        inputs.append(up.astype(np.float32))
    return np.concatenate(targets), np.concatenate(inputs)


def degraded_lateral(lr: np.ndarray, factor: int, z_spacing: int, extra_fwhm: float, acquisition: str) -> np.ndarray:
    """The lateral planes of ``lr`` degraded along y as z was: what z would look like if the scene's
    structure were the same along z as along y."""
    step = z_spacing // factor
    b = gaussian_1d(lr.astype(np.float64), 1, extra_fwhm).astype(np.float32)
    t = matrix.acquire(b, (1, step, 1), "sample") if step > 1 else b
    n = t.shape[1] - t.shape[1] % factor
    return matrix.acquire(t[:, :n], (1, factor, 1), acquisition)


def spectrum_mismatch(z_ref: np.ndarray, lat: np.ndarray) -> float:
    """Variance of the log ratio of the power spectra along z of the input and along y of the
    degraded lateral planes, both per own voxel (the same spacing): 0 when they differ by a gain."""
    from svision_big.selfsim import MIN_FREQUENCY, power_spectrum

    kx, px = power_spectrum(z_ref, 0)
    ky, py = power_spectrum(lat, 1)
    keep = ky > MIN_FREQUENCY
    r = np.log(py[keep] + 1e-30) - np.interp(ky[keep], kx, np.log(px + 1e-30))
    return float(np.var(r))


def estimate_axial(lr: np.ndarray, factor: int, z_spacing: int) -> dict:
    """Extra axial blur (FWHM, lateral voxels) and acquisition whose degraded lateral planes have the
    input's own spectrum along z."""
    grid = np.arange(0.0, 12.01, 0.25)
    found = {}
    for acq in ("cubic", "integrate", "sample"):
        m = [(spectrum_mismatch(lr, degraded_lateral(lr, factor, z_spacing, float(b), acq)), float(b)) for b in grid]
        found[acq] = min(m)
    best = min(found, key=lambda a: found[a][0])
    return {
        "acquisition": best,
        "extra_fwhm": found[best][1],
        "scores": {a: round(v[0], 5) for a, v in found.items()},
        "blurs": {a: v[1] for a, v in found.items()},
    }


class Net2D(torch.nn.Module):
    """Residual 2D CNN on the B-spline-upsampled plane."""

    def __init__(self, width: int = 32, depth: int = 6):
        super().__init__()
        layers = [torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU()]
        for _ in range(depth - 2):
            layers += [torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU()]
        layers += [torch.nn.Conv2d(width, 1, 3, padding=1)]
        self.body = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def train(t: np.ndarray, u: np.ndarray, steps: int, patch: int, batch: int, seed: int) -> tuple[Net2D, list]:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    lo, hi = float(np.percentile(u, 0.1)), float(np.percentile(u, 99.9))
    scale = 1.0 / max(hi - lo, 1e-6)
    net = Net2D()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    n, h, w = t.shape
    ph, pw = min(patch, h), min(patch, w)
    losses = []
    for _ in range(steps):
        i = rng.integers(0, n, batch)
        y0 = rng.integers(0, h - ph + 1, batch)
        x0 = rng.integers(0, w - pw + 1, batch)
        xb = np.stack([u[a, b : b + ph, c : c + pw] for a, b, c in zip(i, y0, x0)])
        yb = np.stack([t[a, b : b + ph, c : c + pw] for a, b, c in zip(i, y0, x0)])
        flip = rng.random(batch) < 0.5
        xb[flip] = xb[flip, :, ::-1]
        yb[flip] = yb[flip, :, ::-1]
        flip = rng.random(batch) < 0.5
        xb[flip] = xb[flip, ::-1]
        yb[flip] = yb[flip, ::-1]
        xt = torch.from_numpy((np.ascontiguousarray(xb) - lo) * scale)[:, None]
        yt = torch.from_numpy((np.ascontiguousarray(yb) - lo) * scale)[:, None]
        loss = torch.nn.functional.l1_loss(net(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    net.lo, net.scale = lo, scale
    return net, losses


@torch.no_grad()
def apply(net: Net2D, lr: np.ndarray, factor: int, flips: bool) -> np.ndarray:
    """The net along z in the (z, y) and the (z, x) planes, averaged (and over in-plane flips)."""
    up = ndimage.zoom(lr, (factor, 1, 1), order=3, grid_mode=True, mode="grid-mirror").astype(np.float32)
    outs = []
    for planes in (np.transpose(up, (2, 0, 1)), np.transpose(up, (1, 0, 2))):  # (x: z, y), (y: z, x)
        x = torch.from_numpy((np.ascontiguousarray(planes) - net.lo) * net.scale)[:, None]
        variants = [(), (2,), (3,), (2, 3)] if flips else [()]
        acc = 0
        for d in variants:
            xi = torch.flip(x, d) if d else x
            yi = net(xi)
            acc = acc + (torch.flip(yi, d) if d else yi)
        outs.append((acc / len(variants))[:, 0].numpy() / net.scale + net.lo)
    a = np.transpose(outs[0], (1, 2, 0))
    b = np.transpose(outs[1], (1, 0, 2))
    return np.maximum(0.5 * (a + b), 0.0).astype(np.float32)


def tool_gains() -> dict:
    p = RESULTS / "quality_anisotropic.json"
    if not p.exists():
        return {}
    return {r["case"]: r["gain_db"] for r in json.loads(p.read_text())["rows"]}


def svnet_lateral(lr: np.ndarray, f: int, extra: float, acq: str, steps: int, flips: bool):
    """The tool's own pieces: ``lateral.train_lateral`` (the stage trainer on a mosaic of lateral
    planes) and the embedded 3D net, run by the operator with its ensemble."""
    from svision_big import lateral
    from svision_big.degrade import Degradation
    from svision_big.intensity import measure_normalisation
    from svision_big.operator import OperatorSpec, StageOp, enhance_array
    from svision_big.settings import TrainConfig

    norm = measure_normalisation(lr)
    v = norm.forward_array(lr).numpy()
    am = lateral.AxialModel(Z_SPACING, extra, acq)
    cfg = TrainConfig(steps=steps, quiet=True, batch=16, patch=64)
    net3, _, _, report = lateral.train_lateral(v, f, am, cfg)
    deg = Degradation((f, 1, 1), None, None, acq)
    op = StageOp(net3, deg, 0, ensemble=4 if flips else 1, zflip=True)
    out = enhance_array(lr, OperatorSpec((op,), norm))
    return np.maximum(np.asarray(out, np.float32), 0), [report["val_loss"]] * 20


def run(
    case: matrix.Case,
    steps: int,
    acq_mode: str,
    flips: bool,
    blur_scale: float,
    estimate_only: bool = False,
    net_kind: str = "cnn",
) -> dict:
    t0 = time.perf_counter()
    syn = matrix.simulate(case)
    truth, lr = syn.truth, syn.observed
    f = case.factors[0]
    dr = float(truth.max() - truth.min())
    acq = case.acquisition
    extra = blur_scale * case.psf_lr * math.sqrt(matrix.PSF_AXIAL_RATIO**2 - 1.0)
    est = estimate_axial(lr, f, Z_SPACING)
    if acq_mode == "found":
        from svision_big import selfsim

        acq = selfsim.estimate(lr / max(float(lr.max()), 1e-6), case.factors).acquisition
    elif acq_mode == "lateral":
        acq, extra = est["acquisition"], est["extra_fwhm"]
    if estimate_only:
        return {"case": case.name, "true": [case.acquisition, round(extra, 3)], "estimate": est}
    if net_kind == "svnet":
        out, losses = svnet_lateral(lr, f, extra, acq, steps, flips)
    else:
        t, u = pairs(lr, f, Z_SPACING, extra, acq)
        net, losses = train(t, u, steps, 48, 16, 0)
        out = apply(net, lr, f, flips)
    cubics = {
        k: quality.scores(truth, fn(lr, case.factors), dr, with_ssim=False)["fit_psnr"]
        for k, fn in quality.CUBIC_VARIANTS.items()
    }
    best = max(cubics.values())
    res = quality.scores(truth, out, dr, with_ssim=False)["fit_psnr"]
    return {
        "case": case.name,
        "acquisition_used": acq,
        "estimate": est,
        "extra_fwhm": round(extra, 3),
        "steps": steps,
        "net": net_kind,
        "flips": flips,
        "loss_first_last": [round(float(np.mean(losses[:20])), 5), round(float(np.mean(losses[-20:])), 5)],
        "cubics": cubics,
        "result": res,
        "gain_db": round(res - best, 3),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def speed(factor: int, shape: tuple[int, int, int], repeats: int = 2) -> dict:
    """Output voxels/s of the in-memory operator, one process: the 3D stages at ensemble 8 against the
    lateral stage (``lateral.LATERAL_NET``, run on planes, ensemble 4 and 1; and at ensemble 4 as the
    embedded 3D net it is stored as), random weights, alternating."""
    from svision_big import lateral
    from svision_big.degrade import Degradation
    from svision_big.intensity import Normalisation
    from svision_big.model import Model
    from svision_big.network import NetConfig, SVNet
    from svision_big.stages import LateralStage, NetworkStage
    from svision_big.testing import make_model

    torch.manual_seed(0)
    net2d = SVNet(NetConfig((factor, 1), interpolation="bspline", **lateral.LATERAL_NET))
    models = {"3d, ensemble 8": make_model((factor, 1, 1), bp=0, ensemble=8)}
    for e in (4, 1):
        rec = LateralStage(lateral.embed(net2d), Degradation((factor, 1, 1)), 0, {}, e).record()
        models[f"lateral, ensemble {e}"] = Model(
            stages=[rec], norm=Normalisation(0.0, 1.0, 0.0), factors=(factor, 1, 1)
        )
    # the same weights as a plain network stage: the embedded 3D net with its zero taps (before planar inference)
    rec = NetworkStage(lateral.embed(net2d), Degradation((factor, 1, 1)), 0, {}, 4).record()
    models["lateral embedded in 3D, ensemble 4"] = Model(
        stages=[rec], norm=Normalisation(0.0, 1.0, 0.0), factors=(factor, 1, 1)
    )
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    best = {k: float("inf") for k in models}
    for m in models.values():
        m.enhance(x[:8, :32, :32], dtype="float32")
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            m.enhance(x, dtype="float32")
            best[k] = min(best[k], time.perf_counter() - t0)
    n = x.size * factor
    return {k: {"seconds": round(t, 2), "M_output_voxels_per_s": round(n / t / 1e6, 3)} for k, t in best.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="all 8 anisotropic cases (default: the 4 clean ones)")
    ap.add_argument("--cases", default="", help="comma-separated structure names to keep")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--acquisition", choices=("true", "found", "lateral"), default="true")
    ap.add_argument("--no-flips", action="store_true")
    ap.add_argument("--blur-scale", type=float, default=1.0, help="multiply the extra axial blur (robustness)")
    ap.add_argument("--net", choices=("cnn", "svnet"), default="cnn", help="a wider 2D CNN, or the tool's SVNet")
    ap.add_argument("--estimate-only", action="store_true", help="print the lateral spectral estimate only")
    ap.add_argument("--speed", action="store_true", help="time the operators (3D ensemble 8 vs lateral) and exit")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.speed:
        for f in (2, 4):
            r = {"factor": f, "shape": [32, 128, 128], "threads": args.threads, **speed(f, (32, 128, 128))}
            print(json.dumps(r), flush=True)
            with open(RESULTS / "lateral_axial_speed.jsonl", "a") as fh:
                fh.write(json.dumps(r) + "\n")
        return 0
    cases = [c for c in matrix.ANISOTROPIC_CASES if args.all or not c.noisy]
    if args.cases:
        keep = set(args.cases.split(","))
        cases = [c for c in cases if c.structure in keep]
    tool = tool_gains()
    print("| case | acquisition | extra blur | lateral stage (dB) | tool today (dB) | s |")
    print("|---|---|---|---|---|---|")
    for c in cases:
        r = run(c, args.steps, args.acquisition, not args.no_flips, args.blur_scale, args.estimate_only, args.net)
        if args.estimate_only:
            print(json.dumps(r), flush=True)
            continue
        r["tool_gain_db"] = tool.get(c.name)
        with open(RESULTS / "lateral_axial.jsonl", "a") as fh:
            fh.write(json.dumps(r) + "\n")
        print(
            f"| {r['case']} | {r['acquisition_used']} | {r['extra_fwhm']} | {r['gain_db']:+.2f} | "
            f"{r['tool_gain_db']} | {r['seconds']} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
