"""When self-similarity cannot tell the acquisitions apart: every offer, every check, the truth.

For each clean case of the quality matrix that ``selfsim`` estimates (synthetic and real), this fits
the package at its defaults and captures the trained operator before ``do_no_harm`` judges it. Then it
scores every operator the check could pick (the two cubics, the network with 1/4/8 ensemble variants,
each cubic back-projected 2/5/10 times under each of the three acquisitions) on the held-aside check
under each acquisition (each with the blur ``selfsim`` found for it), and against the truth. Policies
for choosing an operator from check scores can then be replayed offline (``--replay``), with every
case's truth gain in view. Rows are cached under ``benchmarks/.cache/ambiguity/<code version>/``.

    python benchmarks/acquisition_ambiguity.py --jobs 2          # compute (~20 min on 2 cores)
    python benchmarks/acquisition_ambiguity.py --replay          # policies from the cached rows
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import quality  # noqa: E402
import svision_big  # noqa: E402
from svision_big import harmcheck, selfsim, train  # noqa: E402
from svision_big.degrade import ACQUISITIONS, Degradation  # noqa: E402


def cases() -> list:
    """Every case; those the denoiser takes (no self-similarity estimate) are recorded as skipped."""
    return list(quality.matrix.CASES) + list(quality.REAL_CASES)


def offers(model, acqs=ACQUISITIONS) -> dict:
    """Every operator the check could choose, by name."""
    m = dict(harmcheck.baselines(model))
    for k in harmcheck.ENSEMBLES:
        m[f"ensemble {k}"] = harmcheck._with_ensemble(model, k)
    for a in acqs:
        probe = harmcheck._with_stages(
            model,
            [
                train.StageRecord(
                    s.config, s.state, Degradation(s.degradation.factors, None, None, a), 0, s.ensemble, s.report
                )
                for s in model.stages
            ],
        )
        for n, op in harmcheck.projected_baselines(probe).items():
            m[f"{n} [{a}]"] = op
    return m


def run(case) -> dict:
    t0 = time.perf_counter()
    inp = quality.make_inputs(case)
    truth, lr = inp["truth"], inp["lr"]
    factors = case.factors
    captured = {}
    original = harmcheck.do_no_harm

    def spy(model, deg, v, cfg, denoiser=0, full_scale=None):
        captured.update(model=model, deg=deg, cfg=cfg, full=full_scale)
        return original(model, deg, v, cfg, denoiser, full_scale)

    harmcheck.do_no_harm = spy
    try:
        chosen = svision_big.fit(lr, factor=factors, seed=0, quiet=True)
    finally:
        harmcheck.do_no_harm = original
    dr = float(truth.max() - truth.min())
    row = {"case": case.name, "true_acquisition": case.acquisition, "factors": list(factors)}
    ss = (chosen.info.get("acquisition") or {}).get("self_similarity")
    row["self_similarity"] = ss
    row["chosen_verdict"] = chosen.info.get("baseline", {}).get("verdict")
    if not captured or ss is None:
        row["skipped"] = "no self-similarity estimate (denoised input)"
        return row
    model, cfg, v, noise = captured["model"], captured["cfg"], captured["full"], captured["deg"].noise
    row["check_noise"] = None if noise is None else list(noise)  # refused noise: the check carries it
    v = v[train.sample_box(v.shape, v, 8_000_000)]
    ops = offers(model)
    cub = max(
        quality.scores(truth, fn(lr, factors), dr, with_ssim=False)["fit_psnr"]
        for fn in quality.CUBIC_VARIANTS.values()
    )
    row["chosen_gain"] = round(
        quality.scores(truth, np.asarray(chosen.enhance(lr), np.float32), dr, with_ssim=False)["fit_psnr"] - cub, 3
    )
    row["truth_gain"] = {
        n: round(
            quality.scores(truth, np.asarray(op.enhance(lr), np.float32), dr, with_ssim=False)["fit_psnr"] - cub, 3
        )
        for n, op in ops.items()
    }
    row["checks"] = {}
    for a in ACQUISITIONS:
        blur = tuple(ss["blurs"][a])
        vc = train.blurred(v, selfsim.pair_blur(blur, factors))
        s, _ = harmcheck.check_scores(ops, Degradation(factors, None, noise, a), vc, cfg)
        row["checks"][a] = {n: float(x) for n, x in s.items()}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def compute(jobs: int, only: str | None) -> None:
    version = quality.code_version()
    cache = HERE / ".cache" / "ambiguity" / version
    cache.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cases() if (only is None or only in c.name) and not (cache / f"{c.name}.json").exists()]
    todo = [c for c in todo if not isinstance(c, quality.RealCase) or quality.real_volumes.load(c.volume) is not None]
    print(f"# code {version}: {len(todo)} cases to run", flush=True)
    with ProcessPoolExecutor(jobs) as ex:
        for c, row in zip(todo, ex.map(_run_one, todo)):
            (cache / f"{c.name}.json").write_text(json.dumps(row))
            print(f"{c.name}: {row.get('seconds')} s {row.get('skipped', '')}", flush=True)


def _run_one(case) -> dict:
    import torch

    torch.set_num_threads(1)
    return run(case)


def rows(version: str | None = None) -> list[dict]:
    version = version or quality.code_version()
    return [json.loads(f.read_text()) for f in sorted((HERE / ".cache" / "ambiguity" / version).glob("*.json"))]


# --------------------------------------------------------------------------- replay


def _ratio(row: dict, acq: str, name: str, safe: str = "B-spline") -> float:
    c = row["checks"][acq]
    return c[name] / c[safe]


def policy_current(row: dict) -> str:
    """What do_no_harm does: the found acquisition's check; the network, or the B-spline back-projected
    under the found acquisition where clearly better (or the network loses)."""
    a = row["self_similarity"]["acquisition"]
    nets = [n for n in row["truth_gain"] if n.startswith("ensemble")]
    best = min(_ratio(row, a, n) for n in nets)
    net = min(int(n.split()[1]) for n in nets if _ratio(row, a, n) <= best * 1.005)
    net = f"ensemble {net}"
    bps = [f"B-spline + back-projection {k} [{a}]" for k in (2, 5, 10)]
    low = min(_ratio(row, a, n) for n in bps)
    bp = next(n for n in bps if _ratio(row, a, n) <= low * 1.005)
    pick = bp if (_ratio(row, a, bp) < _ratio(row, a, net) * 0.95 or _ratio(row, a, net) >= 0.98) else net
    order = [pick, net if pick == bp else bp]
    return next((n for n in order if _ratio(row, a, n) < 0.98), "B-spline")


def plausible(row: dict, r: float) -> list[str]:
    s = row["self_similarity"]["scores"]
    low = min(s.values())
    return [a for a in s if s[a] <= low * r]


def policy_minimax(row: dict, r: float, bp_all: bool = True) -> str:
    """The offer whose worst check ratio over the plausible acquisitions is lowest; it must win under
    every one of them."""
    acqs = plausible(row, r)
    nets = [n for n in row["truth_gain"] if n.startswith("ensemble")]
    found = row["self_similarity"]["acquisition"]
    bps = [n for n in row["truth_gain"] if n.startswith("B-spline + back") and (bp_all or n.endswith(f"[{found}]"))]
    worst = {n: max(_ratio(row, a, n) for a in acqs) for n in nets + bps}
    pick = min(worst, key=worst.get)
    return pick if worst[pick] < 0.98 else "B-spline"


def replay(version: str) -> None:
    rs = [r for r in rows(version) if "checks" in r]
    pols = {
        "current": policy_current,
        **{f"minimax r{r}": (lambda row, r=r: policy_minimax(row, r)) for r in (1.0, 1.1, 1.25, 1.5, 99)},
        **{f"minimax-found-bp r{r}": (lambda row, r=r: policy_minimax(row, r, False)) for r in (1.1, 1.25, 99)},
    }
    print(f"{'case':42s} {'true':9s} {'found':9s} {'oracle':>7s} " + " ".join(f"{p[:14]:>14s}" for p in pols))
    tot = {p: [] for p in pols}
    for r in rs:
        g = r["truth_gain"]
        picks = {p: f(r) for p, f in pols.items()}
        for p in pols:
            tot[p].append(g[picks[p]])
        print(
            f"{r['case']:42s} {r['true_acquisition']:9s} {r['self_similarity']['acquisition']:9s} {max(g.values()):7.2f} "
            + " ".join(f"{g[picks[p]]:14.2f}" for p in pols)
        )
    print(f"{'mean':42s} {'':9s} {'':9s} {'':7s} " + " ".join(f"{np.mean(tot[p]):14.2f}" for p in pols))
    print(f"{'worst':42s} {'':9s} {'':9s} {'':7s} " + " ".join(f"{np.min(tot[p]):14.2f}" for p in pols))
    print(
        f"{'below -0.05':42s} {'':9s} {'':9s} {'':7s} "
        + " ".join(f"{sum(x < -0.05 for x in tot[p]):14d}" for p in pols)
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--only", default=None)
    p.add_argument("--replay", nargs="?", const="", default=None, help="replay policies on the cached rows of VERSION")
    args = p.parse_args()
    if args.replay is not None:
        replay(args.replay or quality.code_version())
    else:
        compute(args.jobs, args.only)
